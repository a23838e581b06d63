"""Paired contrasts of one switch in a bench sweep: how much accuracy moves when only `--switch` changes.

The runs of a sweep decode the same problems, so the difference between two settings is best read item by
item: for each pair of runs that differ only in the switch, each problem contributes d = correct(on) -
correct(off) in {-1, 0, 1}; the mean of d over problems (and over the pairs) is the effect, and its
standard error is that of the mean of the per-problem values (sample sd / sqrt(n)), much smaller than the unpaired
error of two accuracies when the settings agree on most problems. Reads the samples files of bench --out
folders, so it works on partial runs too (only problems both runs finished are compared).

    python examples/experiments/contrast.py runs/experiments/ablation/nfe48 --switch soft_decoded

`--versus` pairs whole folders instead: each later folder against the first, run by run (same task and
sweep), e.g. the bench runs of CTS adapters trained with K = 4 and K = 1 on the same problems:

    python examples/experiments/contrast.py runs/experiments/trajectory/bench-k1 \
        runs/experiments/trajectory/bench-k4 --versus
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


def _paired(diffs_per_doc: dict[int, list[int]]) -> tuple[int, float, float | None]:
    """n problems, the mean of their (averaged) differences and its standard error, in accuracy points."""
    means = [sum(d) / len(d) for d in diffs_per_doc.values()]
    n = len(means)
    mean = sum(means) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1)) if n > 1 else float("nan")
    return n, 100 * mean, 100 * sd / math.sqrt(n) if n > 1 else None


def versus(table: dict[tuple[str, tuple], dict[int, bool]], base: Path, other: Path) -> list[dict]:
    """Per task and sweep setting that both folders ran: paired difference other - base, in points."""
    rows = []
    for (key, sweep), theirs in table.items():
        folder, _, task = key.rpartition(":")
        mine = table.get((f"{base}:{task}", sweep))
        if folder != str(other) or mine is None or not mine.keys() & theirs.keys():
            continue
        n, effect, stderr = _paired({d: [int(theirs[d]) - int(mine[d])] for d in mine.keys() & theirs.keys()})
        label = ",".join(f"{k}={v}" for k, v in sweep)
        names = (other.name, base.name) if other.name != base.name else (
            f"{other.parent.name}/{other.name}", f"{base.parent.name}/{base.name}")  # two runs/x/bench-k1
        rows.append({"task": task, "folder": folder, "switch": " - ".join(names) + (f" ({label})" if label else ""),
                     "pairs": 1, "n": n, "effect": effect, "stderr": stderr})
    return rows


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
        n, effect, stderr = _paired(per_doc)
        folder, _, name = task.rpartition(":")
        rows.append({"task": name, "folder": folder, "switch": switch, "pairs": pairs, "n": n, "effect": effect,
                     "stderr": stderr})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="bench --out folders of one sweep")
    p.add_argument("--switch", action="append", default=[], help="a boolean swept option (repeatable)")
    p.add_argument("--versus", action="store_true", help="pair each later folder's runs with the first folder's")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.switch and not (args.versus and len(args.folders) > 1):
        p.error("give --switch NAME, or --versus with two folders or more")
    table = outcomes(args.folders)
    rows = [row for switch in args.switch for row in contrast(table, switch)]
    if args.versus:
        rows += [row for other in args.folders[1:] for row in versus(table, args.folders[0], other)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| task | switch on - off (or folder - first) | accuracy points | ± s.e. (paired) | problems | pairs of runs "
          "| folder |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        se = "-" if r["stderr"] is None else f"{r['stderr']:.1f}"
        print(f"| {r['task']} | {r['switch']} | {r['effect']:+.1f} | {se} | {r['n']} | {r['pairs']} | {r['folder']} |")


if __name__ == "__main__":
    main()
