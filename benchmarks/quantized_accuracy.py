"""Bench accuracy per `--quantize` mode (issue 27, item 5): the three bundled tasks, n items each, every
decoder, with standard errors, and each quantized score's distance from the unquantized one.

Each mode is one `evotok bench` run (the CLI, as a user runs it) into OUT/<mode>; bench resumes an
interrupted run from its sample logs, so this script can be stopped and started again with the same
--out. The table compares every quantized cell with the unquantized cell of the same task and decoder:
delta = acc(mode) - acc(none), in units of the unquantized cell's standard error (target: |delta| <= 2
s.e. for int8). Writes benchmarks/results/quantized_accuracy-<tag>.{json,md}.

    python benchmarks/quantized_accuracy.py --out runs/quantized-accuracy          # n = 200, ~2.5 h on 2 cores
    python benchmarks/quantized_accuracy.py --limit 4 --out /tmp/qa --no-write      # a smoke check
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sudoku4", "arith-small", "countdown3")
DECODERS = ("hard-mask", "evotoken", "d2f")


def bench_command(mode: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "evotok_cli", "bench", *args.tasks.split(","), "--limit", str(args.limit),
               "--quantize", mode, "--out", str(args.out / mode)]
    for decoder in args.decoders.split(","):
        command += ["--decoder", decoder]
    return command


def finished(out: Path) -> bool:
    results = out / "results.json"
    if not results.is_file():
        return False
    rows = json.loads(results.read_text())["results"]
    return bool(rows) and all(row.get("complete") for row in rows)


def cells(out: Path) -> dict[tuple[str, str], dict]:
    rows = json.loads((out / "results.json").read_text())["results"]
    return {(r["task"], r["decoder"]): r for r in rows}


def table(modes: list[str], out: Path) -> tuple[list[dict], list[str]]:
    base = cells(out / modes[0])
    rows, lines = [], ["| task | decoder | mode | n | accuracy | s.e. | delta vs none | delta / s.e. |",
                       "|---|---|---|---|---|---|---|---|"]
    for (task, decoder), ref in base.items():
        for mode in modes:
            cell = cells(out / mode).get((task, decoder))
            if cell is None or cell.get("accuracy") is None:
                continue
            delta = cell["accuracy"] - ref["accuracy"]
            se = ref.get("accuracy_stderr") or 0.0
            ratio = None if mode == modes[0] else (delta / se if se > 0 else (0.0 if delta == 0 else math.inf))
            rows.append({"task": task, "decoder": decoder, "mode": mode, "n": cell["n"],
                         "accuracy": cell["accuracy"], "stderr": cell.get("accuracy_stderr"),
                         "delta": delta, "delta_in_se": ratio, "seconds": cell.get("seconds")})
            shown = "" if ratio is None else f"{ratio:+.2f}"
            lines.append(f"| {task} | {decoder} | {mode} | {cell['n']} | {cell['accuracy']:.3f} | "
                         f"{cell.get('accuracy_stderr') or 0:.3f} | {delta:+.3f} | {shown} |")
    return rows, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="none,int8,int4", help="the first is the reference")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--limit", type=int, default=200, help="items of each task")
    p.add_argument("--out", type=Path, required=True, help="bench runs go to OUT/<mode> (resumable)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()
    modes = args.modes.split(",")
    took = {}
    for mode in modes:
        if finished(args.out / mode):
            print(f"{mode}: finished before, kept", file=sys.stderr)
            continue
        command = bench_command(mode, args)
        print("$ " + shlex.join(command), file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        took[mode] = round(time.perf_counter() - t0, 1)
    rows, lines = table(modes, args.out)
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    results = ROOT / "benchmarks" / "results"
    command = "python benchmarks/quantized_accuracy.py " + shlex.join(sys.argv[1:])
    document = {"schema": "evotok.quantized_accuracy/1", "command": command, "modes": modes, "limit": args.limit,
                "seconds_this_invocation": took, "machine": platform.platform(), "rows": rows}
    (results / f"quantized_accuracy-{args.tag}.json").write_text(json.dumps(document, indent=2) + "\n")
    header = (f"# Bench accuracy per --quantize mode\n\n`{command}`\n\nn = {args.limit} per task and decoder; "
              "delta / s.e.: the difference from the unquantized cell in units of its standard error.\n\n")
    (results / f"quantized_accuracy-{args.tag}.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
