"""Per-sample logs: one JSON line per scored item, appended and flushed batch by batch.

They are the run's state: a rerun with the same --out skips every doc_id they hold, so a killed run
resumes where it stopped. Each process writes its own file (`.rank{r}` before `.jsonl` under torchrun);
readers take the union. A line cut short by a kill is ignored and trimmed before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import DataError
from evotok_cli.base.files import read_text
from evotok_cli.base.provenance import jsonable

SCHEMA = "evotok.bench.sample/1"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def stem(task: str, decoder: str, label: str = "") -> str:
    """`samples_<task>_<decoder>[_<sweep>]`."""
    return safe_name(f"samples_{task}_{decoder}" + (f"_{label}" if label else ""))


def path_for(out: Path, name: str, rank: int, world: int) -> Path:
    return out / (f"{name}.jsonl" if world == 1 else f"{name}.rank{rank}.jsonl")


def paths_of(out: Path, name: str) -> list[Path]:
    """Every file of one run: the single-process file, then the rank files in rank order."""
    pattern = re.compile(re.escape(name) + r"\.rank(\d+)\.jsonl")
    ranked = sorted(((int(m.group(1)), p) for p in out.glob(f"{name}.rank*.jsonl")
                     if (m := pattern.fullmatch(p.name))), key=lambda t: t[0])
    single = out / f"{name}.jsonl"
    return ([single] if single.is_file() else []) + [p for _, p in ranked]


def fingerprint(setup: dict[str, Any]) -> str:
    """A short id of everything that decides a sample's content; resuming under another setup is refused."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read(path: Path, note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The complete lines of a samples file (a final line without its newline was cut by a kill; `note`
    hears that it was dropped)."""
    return [record for _, record in read_numbered(path, note)]


def read_numbered(path: Path, note: Callable[[str], None] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """`read`, each record with its line number (for messages that point at a line)."""
    text = read_text(path, what="samples file", fix="pass a samples_*.jsonl file written by evotok bench")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty or unfinished
    if lines[-1].strip() and note is not None:
        note(f"{path}: dropped its unfinished last line (line {len(lines)}, cut by an interrupted run)")
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError("corrupt line in the samples file", where=f"{path}:{number}",
                            fix="delete that line (it is then generated again) or the file") from None
        if not isinstance(record, dict) or "doc_id" not in record:
            raise DataError("not a sample line (no doc_id)", where=f"{path}:{number}",
                            fix="use a fresh --out folder for bench runs")
        check_fields(record, f"{path}:{number}")
        records.append((number, record))
    return records


# the JSON types of a sample line's fields, as `record` in runner.py writes them (None: may be null)
_INT, _NUMBER, _TEXT, _BOOL, _OBJECT = "an integer", "a number", "text", "true or false", "an object"
FIELD_TYPES: dict[str, tuple[str, bool]] = {
    "doc_id": (_INT, False), "index": (_INT, True), "task": (_TEXT, False), "decoder": (_TEXT, False),
    "generation": (_TEXT, False), "correct": (_BOOL, False), "nfe": (_INT, False),
    "tokens": (_INT, False), "seconds": (_NUMBER, False), "rank": (_INT, True), "scores": (_OBJECT, True),
    "sweep": (_OBJECT, True), "setup": (_OBJECT, True),
}


def _is(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return {_INT: isinstance(value, int), _NUMBER: isinstance(value, (int, float)), _TEXT: isinstance(value, str),
            _OBJECT: isinstance(value, dict)}[kind]


def json_type(value: Any) -> str:
    """How JSON names a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "text", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def check_fields(record: dict[str, Any], where: str) -> None:
    """A sample line's known fields have the JSON types bench writes (a hand-edited or foreign line with
    `"correct": "yes"` or `"doc_id": "7"` is one line here, not a TypeError in the sums of results)."""
    for name, (kind, nullable) in FIELD_TYPES.items():
        if name not in record or (nullable and record[name] is None):
            continue
        value = record[name]
        if not _is(value, kind) or (kind == _INT and value < 0):
            shown = json_type(value) if not _is(value, kind) else f"{value}"
            raise DataError(f'"{name}" is {shown}, expected {kind}{" >= 0" if kind == _INT else ""}', where=where,
                            fix="repair or delete that line (bench generates a deleted line again)")
    if isinstance(record.get("doc_id"), int) and record["doc_id"] >= 2**63:
        raise DataError(f'"doc_id" {record["doc_id"]} is too large', where=where,
                        fix="repair or delete that line (bench generates a deleted line again)")
    if isinstance(record.get("target"), dict):  # every task's target is a number, text, a list or null
        raise DataError('"target" is an object, expected a number, text or a list', where=where,
                        fix="repair or delete that line (bench generates a deleted line again)")
    for name, verdict in (record.get("scores") or {}).items():
        if verdict is not None and not isinstance(verdict, bool):
            raise DataError(f'"scores.{name}" is {json_type(verdict)}, expected true, false or null', where=where,
                            fix="repair or delete that line (bench generates a deleted line again)")


def trim_partial_tail(path: Path) -> None:
    """Cut an unfinished last line so the next append starts on a line of its own."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)


class Writer:
    """Append sample lines; each batch is flushed and synced before the next one starts."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.handle is None:  # opened at the first batch: a run that fails before it writes nothing
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trim_partial_tail(self.path)
            self.handle = self.path.open("a", encoding="utf-8")
        self.handle.write("".join(json.dumps(jsonable(r), ensure_ascii=False) + "\n" for r in records))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
