"""`evotok bench score`: rescore stored generations with the protocol's parsers, without a model.

Two inputs: our sample logs (one JSON line per item, with task, generation and target), and the files of
the official EvoToken / d1 evaluation (`{dataset}_{gen_length}_{steps}_{rank}_generations.json` holding
`{"generations": [{"question", "generations", "ground_truth"}, ...]}`). Files of one setup are summed
(get_acc.py's aggregation); the same setup in several folders (one per alpha) also gets a best-folder
line, chosen on the test set as the paper does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.base.files import input_file
from evotok_cli.bench.report import read_json
from evotok_cli.bench.results import accuracy
from evotok_cli.bench.samples import json_type

SCHEMA = "evotok.bench.score/1"
_OFFICIAL = re.compile(r"(.+)_\d+_generations\.json")
_OURS_RANK = re.compile(r"(.+)\.rank\d+\.jsonl")
# the official scripts' dataset names, and the order get_acc.py tests for them
_OFFICIAL_TASKS = (("gsm", "gsm8k"), ("svamp", "svamp"), ("math", "math500"), ("countdown", "countdown"))


@dataclass
class Setup:
    folder: str
    name: str
    task: str
    kind: str  # "official" | "samples"
    files: list[str] = field(default_factory=list)
    outcomes: list[bool] = field(default_factory=list)
    extra: dict[str, list[bool]] = field(default_factory=dict)
    stored: list[bool] = field(default_factory=list)  # our logs: the verdict written at generation time
    seen: dict[Any, str] = field(default_factory=dict)  # our logs: doc_id -> the file:line that holds it


def expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        p = path.expanduser()
        if p.is_dir():
            found = sorted(p.glob("*_generations.json")) + sorted(p.glob("samples_*.jsonl"))
            if not found:
                raise DataError("no *_generations.json or samples_*.jsonl files in the folder", where=str(p),
                                fix="pass generation files or a bench --out folder")
            files += found
        else:
            files.append(input_file(p, what="generations file", fix="pass existing generation files or folders"))
    return files


def official_task(filename: str) -> str | None:
    match = _OFFICIAL.fullmatch(filename)
    setup = match.group(1) if match else filename
    return next((task for marker, task in _OFFICIAL_TASKS if marker in setup), None)


def _load_task(name: str, where: str) -> Any:
    from evotok_cli.bench.tasks import registry
    try:
        return registry.get(name)
    except ConfigError as exc:
        raise ConfigError(exc.what, where=where, fix=exc.fix) from None


def score_paths(paths: list[Path], task: str | None = None) -> dict[str, Any]:
    """The score document; its `notes` say what was left out (an unfinished last line of a killed run)."""
    setups: dict[tuple[str, str], Setup] = {}
    notes: list[str] = []
    for path in expand(paths):
        if path.suffix == ".jsonl":
            _score_samples(path, task, setups, notes.append)
        else:
            _score_official(path, task, setups)
    rows = [_summary(s) for s in setups.values()]
    return {"schema": SCHEMA, "setups": rows, "best_over_folders": _best(rows), "notes": notes}


def _score_official(path: Path, task_name: str | None, setups: dict[tuple[str, str], Setup]) -> None:
    name = task_name or official_task(path.name)
    if name is None:
        raise ConfigError("cannot tell the task from the file name", where=str(path),
                          fix="pass --task gsm8k|math500|svamp|countdown")
    task = _load_task(name, str(path))
    document = read_json(path, "generations file", unreadable="pass a UTF-8 JSON file",
                         fix="pass the JSON file the official evaluation wrote")
    items = document.get("generations") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise DataError('no "generations" list', where=str(path),
                        fix='expected {"generations": [{"question", "generations", "ground_truth"}, ...]}')
    match = _OFFICIAL.fullmatch(path.name)
    setup = setups.setdefault((str(path.parent), match.group(1) if match else path.stem),
                              Setup(str(path.parent), match.group(1) if match else path.stem, task.name, "official"))
    setup.files.append(path.name)
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"generation {number} is not an object", where=str(path), fix="check the file")
        generation = item.get("generations")
        if generation is not None and not isinstance(generation, str):
            raise DataError(f'generation {number}: "generations" is {json_type(generation)}, expected text',
                            where=str(path), fix="repair that item or pass the file the official evaluation wrote")
        try:
            target = task.reference_target(item)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise DataError(f"generation {number} has an unusable ground_truth ({exc})", where=str(path),
                            fix="check the file's task (--task)") from None
        _add(setup, task, generation or "", target, f"{path}: generation {number}")


def _score_samples(path: Path, task_name: str | None, setups: dict[tuple[str, str], Setup],
                   note: Callable[[str], None]) -> None:
    from evotok_cli.bench import samples

    match = _OURS_RANK.fullmatch(path.name)
    name = match.group(1) if match else path.stem
    tasks: dict[str, Any] = {}
    for number, record in samples.read_numbered(path, note):
        where = f"{path}:{number}"
        current = task_name or record.get("task")
        if not current:
            raise DataError("sample line has no task", where=where, fix="pass --task NAME")
        if current not in tasks:
            tasks[current] = _load_task(current, str(path))
        setup = setups.setdefault((str(path.parent), name), Setup(str(path.parent), name, current, "samples"))
        if path.name not in setup.files:
            setup.files.append(path.name)
        _count_once(setup, record["doc_id"], where)
        _add(setup, tasks[current], str(record.get("generation", "")), record.get("target"), where)
        if "correct" in record:
            setup.stored.append(bool(record["correct"]))


def _count_once(setup: Setup, doc_id: int, where: str) -> None:
    """Each item of a setup counts once: a doc_id that two lines (or two rank files) hold would weigh
    twice in the accuracy, so it is refused with both places."""
    first = setup.seen.setdefault(doc_id, where)
    if first != where:
        raise DataError(f"doc_id {doc_id} is scored twice (first at {first})", where=where,
                        fix="delete the repeated line, or score the files separately")


def _add(setup: Setup, task: Any, generation: str, target: Any, where: str) -> None:
    try:
        _, correct = task.score(generation, target)
        extra = task.extra_scores(generation, target)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise DataError(f'"target" {_short(target)} cannot be scored as a {task.name} answer ({exc})', where=where,
                        fix="check the file's task (--task) or repair that line") from None
    setup.outcomes.append(bool(correct))
    for key, verdict in extra.items():
        setup.extra.setdefault(key, []).append(bool(verdict))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _summary(setup: Setup) -> dict[str, Any]:
    row = {"folder": setup.folder, "setup": setup.name, "task": setup.task, "kind": setup.kind, "files": setup.files,
           **accuracy(setup.outcomes), "scores": {k: accuracy(v) for k, v in setup.extra.items()}}
    if setup.stored and len(setup.stored) == len(setup.outcomes):
        row["stored_correct"] = sum(setup.stored)
        row["disagreements"] = sum(a != b for a, b in zip(setup.stored, setup.outcomes))
    return row


def _best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_setup: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_setup.setdefault(row["setup"], []).append(row)
    best = []
    for name, group in by_setup.items():
        folders = {r["folder"] for r in group}
        if len(folders) < 2:
            continue
        winner = max(group, key=lambda r: -1.0 if r["accuracy"] is None else r["accuracy"])
        best.append({"setup": name, "task": winner["task"], "folders": len(folders), "folder": winner["folder"],
                     "accuracy": winner["accuracy"], "n": winner["n"], "chosen_on": "test set"})
    return best


def table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="evotok bench score: accuracy % (protocol parsers)")
    for col in ("folder", "setup", "task", "files", "n", "correct", "accuracy", "± s.e.", "other"):
        t.add_column(col)
    for row in document["setups"]:
        other = [f"{k.replace('_', '-')}: {v['accuracy']:.2f}" for k, v in row["scores"].items()
                 if v["accuracy"] is not None]
        if "disagreements" in row:
            other.append(f"stored verdicts differ on {row['disagreements']}")
        t.add_row(row["folder"], row["setup"], row["task"], str(len(row["files"])), str(row["n"]), str(row["correct"]),
                  "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}",
                  "-" if row["accuracy_stderr"] is None else f"{row['accuracy_stderr']:.2f}", "; ".join(other))
    for best in document["best_over_folders"]:
        t.add_row(f"best of {best['folders']} folders (chosen on test set)", best["setup"], best["task"], "",
                  str(best["n"]), "", f"{best['accuracy']:.2f}", "", best["folder"])
    return t
