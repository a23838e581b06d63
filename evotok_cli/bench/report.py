"""`evotok bench report`: results.json files as a Markdown table and a PNG plot.

The plot has one panel per task and one line per decoder: accuracy (± standard error) against the swept
option when the runs swept one, else against a training setting that tells the runs' adapters apart
(CTS's `trajectory_steps` over adapters trained with K = 1, 2, 4, 8), else against the mean NFE (so runs
at several --steps budgets, in one folder each, line up as an accuracy-vs-compute curve).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.base.files import atomic_write_bytes, atomic_write_text, output_file, read_text

SCHEMA = "evotok.bench/1"


def read_json(file: Path, what: str, *, unreadable: str, fix: str) -> Any:
    """A JSON file's document, or one DataError line naming `what` the file is: unreadable (the fix
    `unreadable`) or not JSON (`fix`)."""
    text = read_text(file, what=what, fix=unreadable)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} is not JSON ({exc.msg}, line {exc.lineno})", where=str(file), fix=fix) from None


def load_results(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in paths:
        p = path.expanduser()
        file = p / "results.json" if p.is_dir() else p
        if p.is_dir() and not file.is_file():
            raise DataError("no results.json in the folder", where=str(p),
                            fix="pass a bench --out folder or its results.json")
        document = read_json(file, "results file", unreadable="pass a bench --out folder or its results.json",
                             fix="pass a results.json written by evotok bench")
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise DataError(f"not a results file of schema {SCHEMA}", where=str(file), fix="pass a bench results.json")
        check_document(document, str(file))
        documents.append((file, document))
    return documents


# what the report reads of a results document, with the JSON types bench writes ("?": may be null or absent)
_ROW = {"task": "text", "decoder": "text", "label": "text?", "n": "count", "accuracy": "number?",
        "accuracy_stderr": "number?", "mean_nfe": "number?", "tokens_per_nfe": "number?",
        "tokens_per_second": "number?", "settings": "object", "sweep": "object?", "scores": "object?"}
_SETTINGS = {"gen_length": "count", "block_length": "count", "steps": "count"}
_BEST = {"task": "text", "decoder": "text", "label": "text?", "swept": "object", "accuracy": "number?",
         "accuracy_stderr": "number?"}


def _fits(value: Any, kind: str) -> bool:
    if kind.endswith("?") and value is None:
        return True
    kind = kind.rstrip("?")
    if isinstance(value, bool):
        return False
    if kind == "count":
        return isinstance(value, int) and value >= 0
    if kind == "number":
        return isinstance(value, (int, float))
    return isinstance(value, {"text": str, "object": dict, "list": list}[kind])


def _check(item: Any, spec: dict[str, str], path: str, where: str) -> None:
    from evotok_cli.bench.samples import json_type

    if not isinstance(item, dict):
        raise DataError(f"{path} is {json_type(item)}, expected an object", where=where,
                        fix="pass a results.json written by evotok bench")
    for name, kind in spec.items():
        value = item.get(name)
        if (name in item or not kind.endswith("?")) and not _fits(value, kind):
            wanted = {"count": "an integer >= 0", "number": "a number", "text": "text", "object": "an object",
                      "list": "a list"}[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
            if name not in item:
                got = "missing"
            elif isinstance(value, int) and not isinstance(value, bool):
                got = str(value)  # a negative count
            else:
                got = json_type(value)
            raise DataError(f"{path}.{name} is {got}, expected {wanted}", where=where,
                            fix="pass a results.json written by evotok bench, or repair that field")


def check_document(document: dict[str, Any], where: str) -> None:
    """Every field the report reads has the type bench writes: a hand-edited or damaged results.json is
    one line naming the field, not a TypeError in the middle of the table."""
    _check(document, {"results": "list", "model": "object?", "best_over_sweep": "list?"}, "results.json", where)
    for i, row in enumerate(document["results"]):
        _check(row, _ROW, f"results[{i}]", where)
        _check(row["settings"], _SETTINGS, f"results[{i}].settings", where)
        for key, value in (row.get("sweep") or {}).items():  # a swept value: a number, a name or a switch
            if not _fits(value, "number") and not isinstance(value, (str, bool)):
                _check({key: value}, {key: "number"}, f"results[{i}].sweep", where)
        for name, score in (row.get("scores") or {}).items():
            _check(score, {"accuracy": "number?"}, f"results[{i}].scores.{name}", where)
    for i, best in enumerate(document.get("best_over_sweep") or []):
        _check(best, _BEST, f"best_over_sweep[{i}]", where)
        for key, values in best["swept"].items():
            _check({key: values}, {key: "list"}, f"best_over_sweep[{i}].swept", where)
    adapter = (document.get("model") or {}).get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        _check({"adapter": adapter}, {"adapter": "text?"}, "model", where)


def adapter_name(document: dict[str, Any]) -> str | None:
    """The adapter a run was made with, by its folder name (`cts`), or None."""
    adapter = (document.get("model") or {}).get("adapter")
    return Path(adapter).name if adapter else None


def rows_of(documents: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for file, document in documents:
        for row in document["results"]:
            training = (document.get("model") or {}).get("adapter_training")
            rows.append({**row, "source": str(file.parent), "adapter": adapter_name(document),
                         "training": training if isinstance(training, dict) else {}})
    return rows


def method_of(row: dict[str, Any], *, skip: tuple[str, ...] = ("steps",)) -> str:
    """What was compared: the decoder, the adapter it ran with and any swept option but the skipped ones."""
    name = row["decoder"] + (f" + {row['adapter']}" if row.get("adapter") else "")
    other = {k: v for k, v in (row.get("sweep") or {}).items() if k not in skip}
    return name + (" " + ",".join(f"{k}={v}" for k, v in other.items()) if other else "")


def budget_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per task and method, one column per step budget: the comparison at a glance. A cell whose
    mean NFE differs from its budget (threshold decoding, d2f) says so."""
    budgets = sorted({r["settings"]["steps"] for r in rows}, reverse=True)
    gen = sorted({r["settings"]["gen_length"] for r in rows})
    head = " | ".join(f"steps {b}" for b in budgets)
    lines = [f"Accuracy % by forward-pass budget (gen length {', '.join(map(str, gen))}):", "",
             f"| task | method | {head} |", "|---|---|" + "---|" * len(budgets)]
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in rows:
        cell = _fmt(r["accuracy"], 1)
        nfe = r.get("mean_nfe")
        if nfe is not None and abs(nfe - r["settings"]["steps"]) >= 0.5:  # threshold decoders stop early
            cell += f" (NFE {nfe:.1f})"
        cells.setdefault((r["task"], method_of(r)), {})[r["settings"]["steps"]] = cell
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task, method in sorted(cells, key=lambda key: tasks.index(key[0])):  # stable: methods in run order
        by_budget = cells[task, method]
        lines.append(f"| {task} | {method} | " + " | ".join(by_budget.get(b, "") for b in budgets) + " |")
    return lines


def axis_table(rows: list[dict[str, Any]], axis: str) -> list[str]:
    """One line per task and method, one column per value of the study's axis (a swept option or an
    adapter training setting), accuracy ± standard error: a study's table as the plot draws it."""
    on_axis = [r for r in rows if x_value(r, axis) is not None]
    values = sorted({x_value(r, axis) for r in on_axis}, key=lambda v: (type(v).__name__, v))
    several_budgets = len({r["settings"]["steps"] for r in on_axis}) > 1
    cells: dict[tuple[str, str], dict[Any, str]] = {}
    sizes: dict[tuple[str, str], set[int]] = {}
    for r in on_axis:
        trained = axis not in (r.get("sweep") or {})
        method = method_of({**r, "adapter": f"{r['training'].get('objective', 'LoRA')} adapters"} if trained else r,
                           skip=(axis,) if several_budgets else (axis, "steps"))
        if several_budgets and "steps" not in (r.get("sweep") or {}):
            method += f" steps={r['settings']['steps']}"
        key = (r["task"], method)
        cells.setdefault(key, {})[x_value(r, axis)] = f"{_fmt(r['accuracy'], 1)} ± {_fmt(r['accuracy_stderr'], 1)}"
        sizes.setdefault(key, set()).add(r["n"])
    lines = [f"Accuracy % ± standard error by {axis}:", "",
             "| task | method | n | " + " | ".join(f"{axis} {v}" for v in values) + " |",
             "|---|---|---|" + "---|" * len(values)]
    tasks = list(dict.fromkeys(r["task"] for r in on_axis))
    for task, method in sorted(cells, key=lambda key: tasks.index(key[0])):
        n = "/".join(str(v) for v in sorted(sizes[task, method]))
        lines.append(f"| {task} | {method} | {n} | "
                     + " | ".join(cells[task, method].get(v, "") for v in values) + " |")
    return lines


def _differing_training(rows: list[dict[str, Any]]) -> list[str]:
    """Numeric adapter training settings that take more than one value across the runs."""
    keys = {k for r in rows for k, v in r["training"].items() if isinstance(v, (int, float))}
    return sorted(k for k in keys if len({repr(r["training"].get(k)) for r in rows}) > 1)


def x_value(row: dict[str, Any], axis: str) -> Any:
    """The row's value on a swept-option or adapter-training axis (None: the row has none)."""
    value = (row.get("sweep") or {}).get(axis)
    return row["training"].get(axis) if value is None else value


def x_axis(rows: list[dict[str, Any]], choice: str) -> str:
    """"nfe", or the swept option or adapter training setting to plot against."""
    swept = {k for r in rows for k in (r.get("sweep") or {})}
    trained = _differing_training(rows)
    if choice == "nfe":
        return "nfe"
    if choice != "auto":
        if choice not in swept and choice not in trained:
            known = ", ".join(sorted(swept | set(trained))) or "nothing"
            raise ConfigError(f"no run swept {choice!r} and no adapters differ in it (swept or differing: {known})",
                              where="--x", fix="use --x auto or --x nfe")
        return choice
    if len(swept) == 1:
        key = next(iter(swept))
        if len({(r.get("sweep") or {}).get(key) for r in rows if r.get("sweep")}) > 1:
            return key
    if not swept and len(trained) == 1:
        return trained[0]
    return "nfe"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(documents: list[tuple[Path, dict[str, Any]]], axis: str = "nfe") -> str:
    rows = rows_of(documents)
    lines = (axis_table(rows, axis) + [""] if axis != "nfe" else []) + budget_table(rows) + [
        "", "All runs:", "",
        "| task | decoder | setting | gen / block / steps | n | accuracy % | ± s.e. | mean NFE | tok/s | tok/NFE "
        "| source |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        extra = "".join(f" ({k.replace('_', '-')} {_fmt(v['accuracy'])})" for k, v in (r.get("scores") or {}).items())
        cells = [r["task"], method_of(r, skip=tuple(r.get("sweep") or ())), r["label"] or "-",
                 f"{s['gen_length']} / {s['block_length']} / {s['steps']}",
                 str(r["n"]), _fmt(r["accuracy"]) + extra, _fmt(r["accuracy_stderr"]), _fmt(r["mean_nfe"], 1),
                 _fmt(r.get("tokens_per_second"), 1), _fmt(r["tokens_per_nfe"]), r["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    best = [{**b, "adapter": adapter_name(d)} for _, d in documents for b in d.get("best_over_sweep", [])]
    if best:
        lines += ["", "Best over the swept values, **chosen on the test set** (the paper's protocol; optimistic):", "",
                  "| task | decoder | swept | best at | accuracy % | ± s.e. |", "|---|---|---|---|---|---|"]
        for b in best:
            swept = "; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in b["swept"].items())
            lines.append(f"| {b['task']} | {method_of({**b, 'sweep': None})} | {swept} | {b['label']} | "
                         f"{_fmt(b['accuracy'])} | {_fmt(b['accuracy_stderr'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], axis: str) -> bytes:
    """The PNG's bytes (rendered in memory, so that a failure writes no file)."""
    import io

    try:
        import matplotlib
    except ImportError:
        raise ConfigError("bench report needs matplotlib for its plot", where="evotok bench report",
                          fix="pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    categories = [] if axis == "nfe" else _categories(rows, axis)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines: dict[str, list[tuple[float, float, float]]] = {}
        flat: list[tuple[str, float]] = []  # runs without the swept option: a level for comparison
        for r in rows:
            if r["task"] != task or r["accuracy"] is None:
                continue
            if axis == "nfe":
                x, name = r["mean_nfe"], method_of(r)
            else:
                value = x_value(r, axis)
                if value is None:
                    flat.append((f"{method_of(r)} (no {axis})", r["accuracy"]))
                    continue
                x = categories.index(str(value)) if categories else float(value)
                name = method_of(r, skip=("steps", axis))
                if axis in r["training"]:  # the adapters are the points of one line, not lines of their own
                    objective = r["training"].get("objective", "adapter")
                    name = method_of({**r, "adapter": None}, skip=("steps", axis)) + f" + {objective}"
            lines.setdefault(name, []).append((float(x), r["accuracy"], r["accuracy_stderr"] or 0.0))
        for name, points in lines.items():
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=name)
        for name, level in flat:
            ax.axhline(level, linestyle="--", linewidth=1, color="gray", label=name)
        spans = [(p[1], p[2]) for points in lines.values() for p in points] + [(level, 0.0) for _, level in flat]
        if spans:
            ax.set_ylim(*y_limits(spans))
        if categories:  # a swept name (cache=none,dual): one evenly spaced tick per value
            ax.set_xticks(range(len(categories)), categories)
        ax.set_title(task)
        ax.set_xlabel("mean NFE per item" if axis == "nfe" else axis)
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def y_limits(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """The accuracy axis around (value, standard error) pairs: 5 points of room in [-2, 102], widened so
    that every error bar is whole (a bar's end was cut off where the axis followed the values alone)."""
    low = min(value - error for value, error in spans)
    high = max(value + error for value, error in spans)
    bottom = min(max(-2.0, min(v for v, _ in spans) - 5), low - 1)
    top = max(min(102.0, max(v for v, _ in spans) + 5), high + 1)
    return bottom, top


def _categories(rows: list[dict[str, Any]], axis: str) -> list[str]:
    """The axis's values in run order when some are names rather than numbers (else none: a numeric axis)."""
    values = [x_value(r, axis) for r in rows if x_value(r, axis) is not None]
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return list(dict.fromkeys(str(v) for v in values))
    return []


def write_report(paths: list[Path], out: Path | None, x: str) -> tuple[str, list[Path]]:
    """Markdown text and the files written (PREFIX.md, PREFIX.png)."""
    documents = load_results(paths)
    rows = rows_of(documents)
    axis = x_axis(rows, x)
    prefix = out.expanduser() if out else documents[0][0].parent / "report"
    md, png = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".png")
    for path in (md, png):
        output_file(path, "--out")
    text = markdown(documents, axis)
    picture = plot(rows, axis)
    atomic_write_text(md, text)
    atomic_write_bytes(png, picture)
    return text, [md, png]
