"""Decoding speed of this checkout against another, interleaved: is one slower by more than a few percent?

decode_speed.py times each checkout in its own run, minutes apart; on a shared 2-core machine the same code
then reads up to 1.5x apart between runs (session 14: after / after 0.68-1.11x), far more than the 5 % that
issue 25 bounds a regression by. Here two long-lived workers, one per checkout (each imports its checkout's
`evotok_cli` and `evotok_plugins` through serve_load.py's PYTHONPATH shim, as `decode_speed.py --checkout`
does), load the same random real-vocabulary model once and take turns: for every decoder x cache x batch,
round after round, one timed `decoder.generate` each, the order swapped every round (use an even number of
rounds: each side then runs first, and right after itself, equally often). A drift of the machine then hits
both sides of a round alike, and the median of the per-round ratios reads the code's difference.
Each round also checks that both checkouts decoded the same tokens.

    python benchmarks/decode_ab.py --before /tmp/evotok-before            # this checkout against another
    python benchmarks/decode_ab.py --before /tmp/evotok-e177 --rounds 8 --only hard-mask:none,evotoken:dual

Writes decode_ab-<device>.json and .md (tokens/s after / before per configuration: median, lowest and
highest round, and whether the median stays above --bound, default 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHILD = "EVOTOK_DECODE_SPEED_CHECKOUT"  # decode_speed.py's: the checkout a worker must import from


def worker(model: Path, args: argparse.Namespace) -> None:
    """Answer one timed decode per request line ({"decoder", "cache", "batch"}): seconds and the tokens."""
    import hashlib

    import torch
    from decode_speed import GenerationRequest, code_origin, load_model, make_decoder

    torch.manual_seed(0)
    code_origin()  # exits when the imported evotok_cli is not the checkout's
    lm = load_model(model, device=args.device, dtype=args.dtype, load_tokenizer=False)
    warmed: set[tuple] = set()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        options = {"block_size": args.block_length} if ask["decoder"] == "d2f" else {"cache": ask["cache"]}
        decoder = make_decoder(ask["decoder"], options)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, 120000, (args.prompt_length,), generator=g).tolist()
                   for _ in range(ask["batch"])]
        key = (ask["decoder"], ask["cache"], ask["batch"])
        if key not in warmed:
            decoder.generate(lm, GenerationRequest(prompts=prompts[:1], gen_length=args.block_length,
                                                   block_length=args.block_length, steps=2))
            warmed.add(key)
        request = GenerationRequest(prompts=prompts, gen_length=args.gen_length, block_length=args.block_length,
                                    steps=args.steps)
        t0 = time.perf_counter()
        out = decoder.generate(lm, request)
        seconds = time.perf_counter() - t0
        tokens = hashlib.sha256(json.dumps([list(map(int, r.token_ids)) for r in out.rows]).encode()).hexdigest()
        print(json.dumps({"seconds": seconds, "tokens": tokens[:16]}), flush=True)


class Worker:
    def __init__(self, checkout: Path, model: Path, argv: list[str]):
        from serve_load import shim

        env = {**os.environ, "PYTHONPATH": f"{shim(checkout)}{os.pathsep}{ROOT / 'benchmarks'}",
               CHILD: str(checkout.resolve()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(model), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            ready = json.loads(self.proc.stdout.readline() or "{}").get("ready") is True
        except json.JSONDecodeError:
            ready = False
        if not ready:
            self.close()
            raise SystemExit(f"the worker of {checkout} did not start (see its error above)")

    def decode(self, decoder: str, cache: str, batch: int) -> dict:
        self.proc.stdin.write(json.dumps({"decoder": decoder, "cache": cache, "batch": batch}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("a worker ended early (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def compare(after: Worker, before: Worker, grid: list[tuple[str, str, int]], rounds: int, bound: float,
            tokens: int, save: Any) -> list[dict]:
    """Every configuration in turn, `rounds` rounds each; `save(rows)` after each (a stopped run keeps them)."""
    rows: list[dict] = []
    for decoder, cache, batch in grid:
        ratios, same = [], True
        for r in range(rounds):
            order = [("after", after), ("before", before)] if r % 2 == 0 else [("before", before), ("after", after)]
            got = {name: w.decode(decoder, cache, batch) for name, w in order}
            ratios.append(got["before"]["seconds"] / got["after"]["seconds"])  # tokens/s after / before
            same = same and got["before"]["tokens"] == got["after"]["tokens"]
        row = {"decoder": decoder, "cache": cache, "batch": batch, "rounds": rounds,
               "median": round(statistics.median(ratios), 3), "low": round(min(ratios), 3),
               "high": round(max(ratios), 3), "ratios": [round(x, 3) for x in ratios], "same_tokens": same,
               "within_bound": statistics.median(ratios) >= bound, "tokens_per_request": batch * tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Decoding speed, interleaved A/B ({meta['device']})", "",
             f"`{meta['command']}`", "",
             f"after = {meta['after']}, before = {meta['before']}; {meta['model']}; gen {meta['gen_length']} / "
             f"block {meta['block_length']} / steps {meta['steps']}, prompt {meta['prompt_length']} tokens; "
             f"{meta['threads']} thread(s) per worker. Per round one timed decode each, order swapped every round.",
             "", f"| decoder | cache | batch | rounds | tokens/s after / before: median | lowest | highest "
             f"| same tokens | median >= {meta['bound']} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['cache']} | {r['batch']} | {r['rounds']} | {r['median']:.3f} | "
                     f"{r['low']:.3f} | {r['high']:.3f} | {r['same_tokens']} | {r['within_bound']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="the other checkout (e.g. a `git worktree add` of an older commit)")
    p.add_argument("--after", type=Path, default=ROOT, help="this checkout by default")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batches", default="1")
    p.add_argument("--only", default=None, help="decoder:cache pairs, e.g. hard-mask:none,evotoken:dual")
    p.add_argument("--bound", type=float, default=0.95, help="the lowest acceptable median after / before")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker, args)
    if args.before is None:
        p.error("--before DIR is required")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from decode_speed import GRID, create_model

    meta = _meta(args)

    passed = ["--device", args.device, "--dtype", args.dtype, "--gen-length", str(args.gen_length),
              "--block-length", str(args.block_length), "--steps", str(args.steps),
              "--prompt-length", str(args.prompt_length)]
    grid = [(name, cache, int(b)) for b in args.batches.split(",") for name, cache in GRID
            if args.only is None or f"{name}:{cache}" in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(Path(tmp) / "m", layers=args.layers, hidden=args.hidden,
                             heads=max(1, args.hidden // 64), kv_heads=None, mlp=None, max_length=4096,
                             vocab_size=512, real_vocab=True, seed=0)
        after, before = Worker(args.after, model, passed), Worker(args.before, model, passed)
        try:
            rows = compare(after, before, grid, args.rounds, args.bound, args.gen_length, lambda r: save(r, meta, args))
        finally:
            for w in (after, before):
                w.close()
    print(markdown(rows, meta))


def save(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode_ab-{args.device}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))


def _meta(args: argparse.Namespace) -> dict:
    from decode_speed import git_commit

    return {"command": "python benchmarks/decode_ab.py " + " ".join(sys.argv[1:]), "device": args.device,
            "after": git_commit(args.after), "before": git_commit(args.before), "bound": args.bound,
            "model": f"LLaDA layout, {args.layers} layers x {args.hidden}, vocab 126464, random weights",
            "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
            "prompt_length": args.prompt_length, "threads": os.environ.get("OMP_NUM_THREADS", "1")}


if __name__ == "__main__":
    main()
