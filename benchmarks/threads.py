"""How fast `evotok generate` decodes the README's sudoku with 1, 2, ... CPU threads, on a quiet machine and
with competing busy processes, and what evotok's default (`evotok info --system`) picks (issue 31).

Each measurement is one `evotok generate --threads N` process (a fresh torch, as a user runs it); its wall
time comes from the summary line (decode only: the model load is excluded). "busy" starts --busy
processes that spin a core each (a plain Python loop, as another user's job would) for the duration of
the measurement. Rows are interleaved over repeats so that drift hits every thread count alike.
Writes benchmarks/results/threads-<device>.json and .md.

    python benchmarks/threads.py                          # threads 1..cores, quiet and 1 busy, best of 3
    python benchmarks/threads.py --threads 1,2 --repeats 1 --busy 1,2
    python benchmarks/threads.py --quick                  # one repeat, a short decode: checks that it works

The default rule is right when, in every condition, the default's time is within 1.3x of the fastest and
never the oversubscribed 3x case (the table's last column says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evotok_cli.base.threads import choose  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SUMMARY = re.compile(r"NFE (\d+), (\d+) answer tokens in ([0-9.]+)s")
SUDOKU = "Sudoku 4x4 (0 = blank):\n0012|0230|4320|0103"
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def decode_seconds(threads: int, extra: list[str]) -> float:
    """One `evotok generate` process with `threads` threads; the decode's wall time from its summary."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EVOTOK_THREADS")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, "-m", "evotok_cli", "generate", "-p", SUDOKU, "--threads", str(threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    match = SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"evotok generate failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return float(match.group(3))


def with_busy(count: int, run: callable) -> float:
    """`run()` while `count` processes spin a core each; they are stopped afterwards."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=900)]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them take their cores
        return run()
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = choose().cores
    parser.add_argument("--threads", default=",".join(str(n) for n in range(1, max(cores, 2) + 1)),
                        help="thread counts to measure (default: 1..physical cores)")
    parser.add_argument("--busy", default="0,1", help="competing busy processes per condition (default 0,1)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell; the best is kept")
    parser.add_argument("--quick", action="store_true", help="one repeat of a short decode (checks the script)")
    parser.add_argument("--out", default=None, help="file stem under benchmarks/results (default threads-cpu)")
    args = parser.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    busy = [int(x) for x in args.busy.split(",")]
    repeats = 1 if args.quick else args.repeats
    extra = ["--gen-length", "16", "--steps", "8", "--block-length", "16"] if args.quick else []
    default = choose()
    times: dict[tuple[int, int], list[float]] = {}
    for rep in range(repeats):
        for b in busy:
            for n in counts:
                seconds = with_busy(b, lambda n=n: decode_seconds(n, extra))
                times.setdefault((b, n), []).append(seconds)
                print(f"repeat {rep + 1}/{repeats}: busy {b}, threads {n}: {seconds:.2f}s", file=sys.stderr)
    rows = []
    for b in busy:
        best = {n: min(times[(b, n)]) for n in counts}
        fastest = min(best.values())
        for n in counts:
            rows.append({"busy": b, "threads": n, "seconds": best[n], "all": times[(b, n)],
                         "vs_fastest": best[n] / fastest, "default": n == default.threads})
    document = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                "cores": default.cores, "affinity": default.affinity, "default_threads": default.threads,
                "default_reason": default.reason, "repeats": repeats, "quick": args.quick,
                "command": "evotok generate -p SUDOKU --threads N " + " ".join(extra), "rows": rows}
    stem = args.out or "threads-cpu" + ("-quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [f"# CPU threads: `evotok generate` on the README's sudoku ({default.cores} physical cores)", "",
             f"`python benchmarks/threads.py{' --quick' if args.quick else ''}`: best of {repeats}, decode seconds "
             "(the model load excluded). busy = processes spinning a core each during the run.", "",
             f"evotok's default here: {default.threads} ({default.reason}).", "",
             "| busy | threads | seconds | vs fastest | default |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['busy']} | {r['threads']} | {r['seconds']:.2f} | {r['vs_fastest']:.2f}x | "
                     f"{'yes' if r['default'] else ''} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
