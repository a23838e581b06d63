"""Decoding speed: tokens/s, NFE and peak memory for each decoder x cache mode x batch size.

Runs on a randomly initialised LLaDA-layout checkpoint with the real 126464-token vocabulary (written on
the fly with `evotok init-model --real-vocab`), at gen 256 / block 32 / steps 128 by default, and writes
benchmarks/results/decode_speed-<device>.json and .md.

    python benchmarks/decode_speed.py                 # the full grid (tens of minutes on a laptop CPU)
    python benchmarks/decode_speed.py --quick         # batch 1 and 4, fewer repeats
    python benchmarks/decode_speed.py --device cuda   # on a GPU
    python benchmarks/decode_speed.py --checkout /tmp/evotok-before   # the same grid on an older commit's code

`--checkout DIR` measures another checkout (e.g. `git worktree add /tmp/evotok-before e177cff`, the commit
before the batched engine) with this script: it runs itself again in a child whose `import evotok_cli` and
`import evotok_plugins` load DIR's code (serve_load.py's PYTHONPATH shim), so a "before" number is the same
measurement. The child checks where its code came from, and the files are named with DIR's commit
(decode_speed-<device>-<commit>.json) so that they never replace this checkout's results.

Targets (issue 3): evotoken <= 5% slower than hard-mask at equal NFE; prefix cache >= 2.5x and dual >= 4x
the tokens/s of no cache; batch 16 >= 4x the tokens/s of batch 1. On a tiny model the 126k-row LM head
dominates a forward pass (it is ~6% of an 8B model's), which inflates every per-position cost; the report
prints the share of the LM head in the model's FLOPs so the numbers can be read for what they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD = "EVOTOK_DECODE_SPEED_CHECKOUT"  # set in the re-run child: the checkout whose code it must import
if CHILD not in os.environ:  # the child's evotok_cli comes from the shim on PYTHONPATH, not from ROOT
    sys.path.insert(0, str(ROOT))

from evotok_cli.decoding.api import GenerationRequest  # noqa: E402
from evotok_cli.runtime.init import create_model  # noqa: E402
from evotok_cli.runtime.model import load_model  # noqa: E402

if importlib.util.find_spec("evotok_cli.generation") is not None:  # a --checkout from before the layer folders
    from evotok_cli.generation import make_decoder  # noqa: E402 (e.g. e177cff, issue 25's "before")
else:
    from evotok_cli.jobs.generation import make_decoder  # noqa: E402

GRID = [("hard-mask", "none"), ("hard-mask", "prefix"), ("hard-mask", "dual"),
        ("evotoken", "none"), ("evotoken", "prefix"), ("evotoken", "dual"), ("d2f", "block-cache")]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def run_one(lm, name: str, cache: str, batch: int, args) -> dict:
    options = {"block_size": args.block_length} if name == "d2f" else {"cache": cache}
    decoder = make_decoder(name, options)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 120000, (args.prompt_length,), generator=g).tolist() for _ in range(batch)]
    request = GenerationRequest(prompts=prompts, gen_length=args.gen_length, block_length=args.block_length,
                                steps=args.steps)
    decoder.generate(lm, GenerationRequest(prompts=prompts[:1], gen_length=args.block_length,
                                           block_length=args.block_length, steps=2))  # warm-up
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    times, nfe = [], 0
    for _ in range(args.repeats):
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        t0 = time.perf_counter()
        out = decoder.generate(lm, request)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        times.append(time.perf_counter() - t0)
        nfe = max(r.nfe for r in out.rows)
    seconds = min(times)
    tokens = batch * args.gen_length
    return {"decoder": name, "cache": cache, "batch": batch, "nfe": nfe, "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 2), "tokens_per_nfe": round(tokens / batch / nfe, 3),
            "peak_memory_mb": round(peak_memory_mb(lm.device), 1)}


def head_share(lm, length: int) -> float:
    cfg = lm.config
    body = cfg.n_layers * (4 * cfg.d_model**2 + 3 * cfg.d_model * cfg.mlp_hidden_size)
    head = cfg.d_model * cfg.vocab_size
    return head / (body + head)


def markdown(rows: list[dict], meta: dict) -> str:
    base = {(r["batch"]): r["tokens_per_s"] for r in rows if r["decoder"] == "hard-mask" and r["cache"] == "none"}
    lines = [f"# Decoding speed ({meta['device']}, {meta['model']})", "",
             f"gen {meta['gen_length']} / block {meta['block_length']} / steps {meta['steps']}, prompt "
             f"{meta['prompt_length']} tokens, best of {meta['repeats']}; LM head = {meta['lm_head_share']:.0%} of "
             "the model's weights-FLOPs per position (an 8B LLaDA: ~6%).", "",
             "| decoder | cache | batch | NFE | tokens/s | vs hard-mask/none | tokens/NFE | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        lines.append(f"| {r['decoder']} | {r['cache']} | {r['batch']} | {r['nfe']} | {r['tokens_per_s']:.1f} | "
                     f"{rel:.2f}x | {r['tokens_per_nfe']:.2f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def git_commit(folder: Path) -> str:
    """The commit whose code ran, "-dirty" when its working tree has uncommitted changes."""
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                          cwd=folder).stdout.strip() or "unknown"


def run_in_checkout(checkout: Path) -> int:
    """This script, again, over `checkout`'s code (same arguments); its exit code."""
    from serve_load import plugins_folder, shim  # benchmarks/ is sys.path[0] when a script of it runs

    if not (checkout / "evotok_cli").is_dir() or not plugins_folder(checkout).is_dir():
        sys.exit(f"--checkout {checkout}: not an evotok checkout (no evotok_cli/ and plugins/ in it)")
    env = {**os.environ, "PYTHONPATH": str(shim(checkout)), CHILD: str(checkout.resolve())}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env).returncode


def code_origin() -> Path:
    """The checkout whose evotok_cli this process imported; in a --checkout child it must be that checkout
    (were the installed package found first, the 'before' number would silently be this checkout's)."""
    import evotok_cli

    origin = Path(evotok_cli.__file__).resolve().parents[1]
    wanted = os.environ.get(CHILD)
    if wanted is not None and origin != Path(wanted):
        sys.exit(f"--checkout: imported evotok_cli from {origin}, not from {wanted}")
    return origin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batches 1,4 and one repeat")
    p.add_argument("--only", default=None, help="these decoder:cache pairs, e.g. hard-mask:none,evotoken:dual")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--checkout", type=Path, default=None,
                   help="time another checkout's code with this script (a 'before' number)")
    args = p.parse_args()
    if args.checkout is not None and CHILD not in os.environ:
        sys.exit(run_in_checkout(args.checkout))
    origin = code_origin()
    if args.quick:
        args.batches, args.repeats = "1,4", 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = create_model(Path(tmp) / "m", layers=args.layers, hidden=args.hidden, heads=max(1, args.hidden // 64),
                              kv_heads=None, mlp=None, max_length=4096,
                              vocab_size=512, real_vocab=True, seed=0)  # the real vocab's size wins; e177cff refuses 0
        lm = load_model(folder, device=args.device, dtype=args.dtype, load_tokenizer=False)
        rows = []
        for batch in [int(b) for b in args.batches.split(",")]:
            for name, cache in [g for g in GRID if args.only is None or f"{g[0]}:{g[1]}" in args.only.split(",")]:
                row = run_one(lm, name, cache, batch, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else platform.processor() or "cpu"
    meta = {"device": device, "model": f"LLaDA layout, {args.layers} layers x {args.hidden}, vocab 126464, "
            f"{lm.parameter_count() / 1e6:.1f}M params, {str(lm.dtype).removeprefix('torch.')}",
            "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
            "prompt_length": args.prompt_length, "repeats": args.repeats, "lm_head_share": head_share(lm, 0),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:]),
            "code": str(origin), "git": git_commit(origin)}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if lm.device.type == "cuda" else "cpu"
    if args.checkout is not None:
        tag += f"-{meta['git']}"
    (args.out / f"decode_speed-{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"decode_speed-{tag}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
