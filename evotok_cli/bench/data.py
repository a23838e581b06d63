"""Benchmark items from a file, a folder or the Hugging Face hub, as a list of plain dicts.

Reads the original formats (JSON lines, a JSON list such as SVAMP.json) and the Hugging Face layouts of
the same sets (JSON lines written by `to_json`, parquet shards, `save_to_disk` folders). Which file a
folder holds is the task's business: it names sub-folders and file patterns to look for.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from evotok_cli.base.errors import DataError

Record = dict[str, Any]


class DataSource(Protocol):
    """What the reader asks of a task (`DatasetTask` has it): where its items may be, and its name and an
    example path for messages."""

    name: str
    hub: tuple[str, str | None, str] | None  # (path, config, split) for load_dataset
    folders: tuple[str, ...]  # sub-folders of a --data folder to look in first
    patterns: tuple[str, ...]  # file globs, in order of preference
    example: str  # what to pass to --data


def task_records(task: DataSource, data: Path | None) -> tuple[list[Record], str]:
    """The task's items and a description of where they came from."""
    if data is None:
        return hub_records(task)
    path = Path(data).expanduser()
    if path.is_dir():
        files = find_task_files(task, path)
    elif path.is_file():
        files = [path]
    else:
        raise DataError("data path does not exist", where=str(path),
                        fix=f"pass --data with the {task.name} file or a folder holding it, e.g. {task.example}")
    records = [record for f in files for record in read_records(f)]
    if not records:
        raise DataError(f"no {task.name} items in the data", where=str(files[0]), fix=f"e.g. --data {task.example}")
    shown = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    return records, shown


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (one split or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def find_task_files(task: DataSource, folder: Path) -> list[Path]:
    """The task's files in `folder`: first in its named sub-folders (so the folder of all sets works),
    then in the folder itself; parquet shards of one split come back together."""
    bases = [folder / name for name in task.folders] + [folder]
    for base in bases:
        if not base.is_dir():
            continue
        if is_saved_dataset(base):
            return [base]
        for pattern in task.patterns:
            found = sorted(p for p in base.glob(pattern) if p.is_file() or is_saved_dataset(p))
            if found:
                return found
    raise DataError(f"no {task.name} data found in the folder (looked for {', '.join(task.patterns)} in "
                    f"{', '.join(task.folders)} or the folder itself)", where=str(folder),
                    fix=f"pass the file itself, e.g. --data {task.name}={task.example}")


def read_records(path: Path) -> list[Record]:
    """Every item of one data file (or saved-dataset folder) as a dict."""
    if path.is_dir():
        return _saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return _json_lines(path)
    if suffix == ".json":
        return _json_document(path)
    raise DataError(f"unknown data format {suffix or '(no suffix)'!r}", where=str(path),
                    fix="use a .jsonl, .json or .parquet file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the data file ({exc})", where=str(path),
                        fix="pass a readable UTF-8 file") from None


def _json_lines(path: Path, text: str | None = None) -> list[Record]:
    records = []
    for number, line in enumerate((text if text is not None else _read_text(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", where=f"{path}:{number}",
                            fix="one JSON object per line") from None
        records.append(_as_record(item, f"{path}:{number}"))
    return records


def _json_document(path: Path) -> list[Record]:
    """A JSON list of objects (SVAMP.json), an object holding one such list ({"data": [...]}), columns of
    equal length ({"question": [...], "answer": [...]}), or JSON lines under a .json name (`to_json`)."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return _json_lines(path, text)
        raise DataError(f"invalid JSON ({exc.msg}, line {exc.lineno})", where=str(path),
                        fix="repair the file") from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(x, dict) for x in lists[0]):
            doc = lists[0]
        elif lists and len(lists) == len(doc) and len({len(v) for v in lists}) == 1:
            doc = [dict(zip(doc, row)) for row in zip(*doc.values())]
        else:
            doc = [doc]
    if not isinstance(doc, list):
        raise DataError("expected a list of objects", where=str(path), fix="write a JSON list or JSON lines")
    return [_as_record(item, f"{path}[{i}]") for i, item in enumerate(doc)]


def _as_record(item: Any, where: str) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"expected an object, got {type(item).__name__}", where=where, fix="one JSON object per item")
    return item


def _imported(module: str, needs: str, *, where: str | Path, fix: str) -> Any:
    """`module`, one of the bench extra's packages (imported only when a task reads such data), or one
    line saying what `needs` it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(needs, where=str(where), fix=fix) from None


def _parquet(path: Path) -> list[Record]:
    pq = _imported("pyarrow.parquet", "reading parquet needs pyarrow", where=path,
                   fix="pip install 'evotok[bench]' (datasets brings pyarrow), or convert to .jsonl")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"cannot read parquet ({exc})", where=str(path), fix="pass a valid parquet file") from None


def _saved_dataset(folder: Path) -> list[Record]:
    datasets = _imported("datasets", "reading a saved dataset folder needs `datasets`", where=folder,
                         fix="pip install 'evotok[bench]'")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"cannot load the saved dataset ({exc})", where=str(folder),
                        fix="pass a jsonl or parquet file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "test" not in loaded:
            raise DataError(f"the saved dataset has no 'test' split (has {', '.join(loaded)})", where=str(folder),
                            fix="pass the folder of the test split")
        loaded = loaded["test"]
    return loaded.to_list()


def _offline_requested() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in flags)


def _hub_resolvable() -> bool:
    """Whether the hub's host name resolves: without it, `datasets` would spend half a minute on retries
    before failing. A name lookup only, no connection."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_records(task: DataSource) -> tuple[list[Record], str]:
    """The task's Hugging Face dataset through `datasets` (online, or from the user's cache)."""
    fix = f"pass --data {task.example} (or a folder holding it)"
    if task.hub is None:
        raise DataError(f"{task.name} has no Hugging Face dataset", where=f"evotok bench {task.name}", fix=fix)
    path, config, split = task.hub
    shown = f"{path}{'/' + config if config else ''}:{split}"
    if not _offline_requested() and not _hub_resolvable():
        raise DataError(f"cannot load the Hugging Face dataset {shown}: the hub is not reachable from here",
                        where=f"evotok bench {task.name}",
                        fix=f"{fix}; or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache")
    datasets = _imported("datasets", f"loading {shown} needs the `datasets` package", where=f"evotok bench {task.name}",
                         fix=f"pip install 'evotok[bench]', or {fix}")
    try:
        loaded = datasets.load_dataset(path, config, split=split)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise DataError(f"cannot load the Hugging Face dataset {shown} ({type(exc).__name__}: {reason})",
                        where=f"evotok bench {task.name}", fix=fix) from None
    return loaded.to_list(), f"hf:{shown}"
