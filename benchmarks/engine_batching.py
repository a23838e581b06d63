"""The step engine under concurrent requests: forwards per engine step, host milliseconds per step and
tokens/s, per decoder and cache mode (issue 25).

N requests (default 16) of mixed prompt lengths are submitted at once, each as `evotok serve` submits a
request (one `make_jobs` call per request), and the engine steps until all are done. Measured per mode:

- forwards per step: calls of the network's forward / engine steps (target: 1 in every mode);
- host ms per step: (wall - time inside the network's forward) / steps, i.e. the engine's and the
  decoders' own Python and tensor work between forwards (on CUDA the forward is timed with a
  synchronize on both sides, so its device time is not counted as host time);
- tokens/s: N * gen_length / wall.

`--scan 8,64` also runs each mode at those request counts and reports host ms per step at each (target:
64 rows at most 1.5x the host time of 8).

On a CPU "host ms" also holds the decoders' tensor maths (a GPU runs it as kernels the host only launches),
which grows with the rows whatever the engine does. `--count` therefore runs each case once more and counts
what the host itself does between forwards, per step: torch operations dispatched (each one kernel launch
on a GPU) and Python function calls (those two do not depend on the device), and the milliseconds spent
inside those operations (on a CPU, the maths; the counting run itself is slower, so read that column
against the same run's other rows, not against "host ms"). `--no-merge` runs the engine
with `merge_rows=False` (each row a program of its own), for a same-sitting comparison.

It runs against the current engine and against an older checkout: the forward is counted by wrapping
`model.net.forward`, and only `Engine(model, max_rows)`, `Engine.step`, `make_jobs` and
`GenerationRequest` are used. For a "before" number, copy this file into a worktree of the old commit
and run it there (it imports `evotok_cli` and the plugins from the folder it sits in):

    git worktree add /tmp/evotok-before e177cff
    cp benchmarks/engine_batching.py /tmp/evotok-before/benchmarks/
    (cd /tmp/evotok-before && python benchmarks/engine_batching.py --tag before)
    python benchmarks/engine_batching.py --tag after

    python benchmarks/engine_batching.py --requests 4 --gen-length 8 --modes hard-mask-dual   # a quick look

Writes benchmarks/results/engine_batching-<device>[-<tag>].json and .md (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the plugins of THIS checkout (installed as evotok_plugins, possibly from another folder)
PLUGINS = ROOT / "plugins" / "evotok_plugins"
PLUGINS = PLUGINS if PLUGINS.is_dir() else ROOT / "plugins"  # a checkout from before the layer folders
_spec = importlib.util.spec_from_file_location("evotok_plugins", PLUGINS / "__init__.py",
                                               submodule_search_locations=[str(PLUGINS)])
sys.modules["evotok_plugins"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["evotok_plugins"])

from evotok_cli.decoding.api import GenerationRequest  # noqa: E402
from evotok_cli.decoding.engine import Engine, make_jobs  # noqa: E402
from evotok_cli.jobs.generation import make_decoder  # noqa: E402
from evotok_cli.runtime.model import load_model  # noqa: E402

MODES = {
    "hard-mask-none": ("hard-mask", {}),
    "hard-mask-prefix": ("hard-mask", {"cache": "prefix"}),
    "hard-mask-dual": ("hard-mask", {"cache": "dual"}),
    "evotoken-none": ("evotoken", {}),
    "evotoken-prefix": ("evotoken", {"cache": "prefix"}),
    "evotoken-dual": ("evotoken", {"cache": "dual"}),
    "d2f": ("d2f", {}),
    "hard-mask-cfg": ("hard-mask", {"cfg_scale": 1.5}),
}


def make_prompts(lm, count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Random ids (no special tokens), lengths evenly spread over [lo, hi], shuffled."""
    g = torch.Generator().manual_seed(seed)
    special = set(lm.stop_ids) | {lm.mask_id}
    lengths = [round(lo + (hi - lo) * i / max(1, count - 1)) for i in range(count)]
    random.Random(seed).shuffle(lengths)
    prompts = []
    for n in lengths:
        ids = torch.randint(3, lm.vocab_size, (n,), generator=g).tolist()
        prompts.append([t if t not in special else 3 for t in ids])
    return prompts


class HostCounter(TorchDispatchMode):
    """Counts torch operations and Python calls outside the network's forward (`paused` inside it)."""

    def __init__(self):
        super().__init__()
        self.ops, self.calls, self.paused, self.op_seconds = 0, 0, False, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        self.ops += 1
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.op_seconds += time.perf_counter() - t0
        return out

    def profile(self, frame, event, arg):
        if event == "call" and not self.paused:
            self.calls += 1


class ForwardClock:
    """Counts and times the network's forwards (synchronised on CUDA, so their device time is theirs)."""

    def __init__(self, lm, counter: HostCounter | None = None):
        self.lm, self.calls, self.seconds, self.counter = lm, 0, 0.0, counter
        self.original = lm.net.forward

    def __enter__(self):
        cuda = self.lm.device.type == "cuda"

        def timed(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize(self.lm.device)
            t0 = time.perf_counter()
            if self.counter is not None:
                self.counter.paused = True
            out = self.original(*args, **kwargs)
            if self.counter is not None:
                self.counter.paused = False
            if cuda:
                torch.cuda.synchronize(self.lm.device)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        self.lm.net.forward = timed
        return self

    def __exit__(self, *exc):
        del self.lm.net.forward


def run_mode(lm, name: str, requests: int, args, counter: HostCounter | None = None) -> dict:
    decoder_name, options = MODES[name]
    if decoder_name == "d2f":  # its pipeline blocks the size of the others' blocks (older checkouts: 64)
        options = {"block_size": args.block_length, **options}
    decoder = make_decoder(decoder_name, {k: str(v) for k, v in options.items()})
    prompts = make_prompts(lm, requests, args.min_prompt, args.max_prompt, args.seed)
    # room for every request at once (guidance: 2 rows each)
    engine = Engine(lm, max_rows=4 * requests, **({"merge_rows": False} if args.no_merge else {}))
    jobs = []
    for i, prompt in enumerate(prompts):  # one request per prompt, as the server submits them
        request = GenerationRequest(prompts=[prompt], gen_length=args.gen_length, block_length=args.block_length,
                                    steps=args.steps, temperature=args.temperature, seeds=[args.seed + i])
        jobs += [job for _, job in make_jobs(lm, decoder, request, cohort=1)]
    for job in jobs:
        engine.submit(job)
    with ForwardClock(lm, counter) as clock:
        t0 = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():
            sys.setprofile(counter.profile if counter is not None else None)
            try:
                while engine.step():
                    pass
            finally:
                sys.setprofile(None)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        wall = time.perf_counter() - t0
    errors = [str(j.error) for j in jobs if j.error is not None]
    if errors:
        raise SystemExit(f"{name}: {errors[0]}")
    steps = max(engine.steps, 1)  # steps that ran a forward (a step that only read finished rows back is not one)
    if counter is not None:
        return {"ops_per_step": round(counter.ops / steps, 1), "py_calls_per_step": round(counter.calls / steps, 1),
                "op_ms_per_step": round(1000 * counter.op_seconds / steps, 3)}
    return {"mode": name, "requests": requests, "steps": steps, "forwards": clock.calls,
            "forwards_per_step": round(clock.calls / steps, 3),
            "host_ms_per_step": round(1000 * (wall - clock.seconds) / steps, 3),
            "forward_ms_per_step": round(1000 * clock.seconds / steps, 3),
            "tokens_per_s": round(requests * args.gen_length / wall, 2), "seconds": round(wall, 3)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Engine batching ({meta['device']}, torch {meta['torch']}, {meta['threads']} threads)", "",
             f"`{meta['command']}`", "",
             f"gen {meta['gen_length']} / block {meta['block_length']} / steps {meta['steps']}, prompts "
             f"{meta['min_prompt']}..{meta['max_prompt']} tokens, temperature {meta['temperature']}, one request "
             "per prompt, all submitted at once" + (" (`--no-merge`: each row a program of its own)."
                                                    if meta.get("no_merge") else "."), "",
             "| mode | requests | steps | forwards / step | host ms / step | forward ms / step | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    counted = any("ops_per_step" in r for r in rows)
    if counted:
        lines[-2] += " host torch ops / step | host Python calls / step | host ms in torch ops / step |"
        lines[-1] += "---|---|---|"
    for r in rows:
        lines.append(f"| {r['mode']} | {r['requests']} | {r['steps']} | {r['forwards_per_step']:.2f} | "
                     f"{r['host_ms_per_step']:.2f} | {r['forward_ms_per_step']:.2f} | {r['tokens_per_s']:.1f} |"
                     + (f" {r.get('ops_per_step', '')} | {r.get('py_calls_per_step', '')} | "
                        f"{r.get('op_ms_per_step', '')} |" if counted else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the bundled model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    sizes = {"--requests": 16, "--min-prompt": 8, "--max-prompt": 64, "--gen-length": 32, "--block-length": 8,
             "--steps": 16, "--seed": 0}
    for flag, default in sizes.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--scan", default="", help="also these request counts per mode, e.g. 8,64 (host ms per step)")
    p.add_argument("--count", action="store_true", help="also count host torch ops and Python calls per step")
    p.add_argument("--no-merge", action="store_true", help="each row a program of its own (Engine merge_rows=False)")
    p.add_argument("--tag", default="", help="appended to the results' file names")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    from evotok_cli.assets import default_model_path

    folder = args.model or default_model_path()
    lm = load_model(folder, device=args.device)
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}: one of {', '.join(MODES)}")
    run_mode(lm, names[0], 2, args)  # warm-up
    counts = [args.requests] + [int(n) for n in args.scan.split(",") if n.strip() and int(n) != args.requests]
    rows = []
    for name in names:
        for n in counts:
            rows.append(run_mode(lm, name, n, args))
            if args.count:
                rows[-1].update(run_mode(lm, name, n, args, HostCounter()))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else platform.processor() or "cpu"
    meta = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "device": device,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.steps, "min_prompt": args.min_prompt,
            "max_prompt": args.max_prompt, "temperature": args.temperature, "model": folder.name,
            "no_merge": args.no_merge,
            "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"engine_batching-{'cuda' if lm.device.type == 'cuda' else 'cpu'}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
