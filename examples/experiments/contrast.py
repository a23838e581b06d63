"""Paired contrasts of one switch in a bench sweep: how much accuracy moves when only `--switch` changes.

The runs of a sweep decode the same problems, so the difference between two settings is best read item by
item: for each pair of runs that differ only in the switch, each problem contributes d = correct(on) -
correct(off) in {-1, 0, 1}; the mean of d over problems (and over the pairs) is the effect, and its
standard error is that of the mean of the per-problem values (sample sd / sqrt(n)), much smaller than the unpaired
error of two accuracies when the settings agree on most problems. Reads the samples files of bench --out
folders, so it works on partial runs too (only problems both runs finished are compared).

    python examples/experiments/contrast.py runs/experiments/ablation/nfe48 --switch soft_decoded
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def outcomes(folders: list[Path]) -> dict[tuple[str, tuple], dict[int, bool]]:
    """(folder/task, sorted sweep items) -> {doc_id: correct}, from every samples file in the folders (a
    folder is one budget: runs at 48 and 24 passes are never paired with each other)."""
    table: dict[tuple[str, tuple], dict[int, bool]] = defaultdict(dict)
    for folder in folders:
        for path in sorted(folder.glob("samples_*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                key = (f"{folder}:{record['task']}", tuple(sorted((record.get("sweep") or {}).items())))
                table[key][int(record["doc_id"])] = bool(record["correct"])
    return table


def contrast(table: dict[tuple[str, tuple], dict[int, bool]], switch: str) -> list[dict]:
    """Per task: mean paired difference (on - off) in accuracy points, its standard error, n problems, pairs."""
    rows = []
    for task in dict.fromkeys(task for task, _ in table):
        per_doc: dict[int, list[int]] = defaultdict(list)
        pairs = 0
        for (t, sweep), on in table.items():
            settings = dict(sweep)
            if t != task or settings.get(switch) is not True:
                continue
            off = table.get((task, tuple(sorted({**settings, switch: False}.items()))))
            if off is None:
                continue
            pairs += 1
            for doc in on.keys() & off.keys():
                per_doc[doc].append(int(on[doc]) - int(off[doc]))
        if not per_doc:
            continue
        means = [sum(d) / len(d) for d in per_doc.values()]
        n = len(means)
        mean = sum(means) / n
        sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1)) if n > 1 else float("nan")
        folder, _, name = task.rpartition(":")
        rows.append({"task": name, "folder": folder, "switch": switch, "pairs": pairs, "n": n, "effect": 100 * mean,
                     "stderr": 100 * sd / math.sqrt(n) if n > 1 else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="bench --out folders of one sweep")
    p.add_argument("--switch", action="append", required=True, help="a boolean swept option (repeatable)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    table = outcomes(args.folders)
    rows = [row for switch in args.switch for row in contrast(table, switch)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| task | switch on - off | accuracy points | ± s.e. (paired) | problems | pairs of runs | folder |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        se = "-" if r["stderr"] is None else f"{r['stderr']:.1f}"
        print(f"| {r['task']} | {r['switch']} | {r['effect']:+.1f} | {se} | {r['n']} | {r['pairs']} | {r['folder']} |")


if __name__ == "__main__":
    main()
