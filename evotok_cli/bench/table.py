"""The results document as a terminal table: one row per task and swept value, decoders side by side."""

from __future__ import annotations

from typing import Any


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(row: dict[str, Any]) -> str:
    lines = [f"{_number(row['accuracy'])} ± {_number(row['accuracy_stderr'])}  (n={row['n']})"]
    for name, score in (row.get("scores") or {}).items():
        lines.append(f"{name.replace('_', '-')}: {_number(score['accuracy'])}")
    tps = row.get("tokens_per_second")
    lines.append(f"NFE {_number(row['mean_nfe'], 1)} · {_number(tps, 1)} tok/s · "
                 f"{_number(row['tokens_per_nfe'])} tok/NFE")
    if not row.get("complete", True):
        lines.append(f"incomplete: {row['n']} of {row['expected']}")
    return "\n".join(lines)


def grid(document: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, dict[str, str]]]]:
    """(decoders, [(task, setting, {decoder: cell text})]) for any table renderer."""
    decoders = list(dict.fromkeys(r["decoder"] for r in document["results"]))
    lines: dict[tuple[str, str], dict[str, str]] = {}
    for row in document["results"]:
        lines.setdefault((row["task"], row["label"] or "-"), {})[row["decoder"]] = cell(row)
    for best in document.get("best_over_sweep", []):
        setting = f"best over {', '.join(best['swept'])} (chosen on test set)"
        text = f"{_number(best['accuracy'])} ± {_number(best['accuracy_stderr'])}  at {best['label']}"
        lines.setdefault((best["task"], setting), {})[best["decoder"]] = text
    ordered = sorted(lines.items(), key=lambda kv: [t for t, _ in lines].index(kv[0][0]))
    return decoders, [(task, setting, cells) for (task, setting), cells in ordered]


def render(document: dict[str, Any]) -> Any:
    from rich.table import Table

    decoders, rows = grid(document)
    table = Table(title="evotok bench: accuracy % ± standard error",
                  caption="tok/s: answer tokens up to EOS over decode wall time (spec 6.5); "
                          "NFE: forward passes per item",
                  show_lines=True)
    table.add_column("task")
    table.add_column("setting")
    for name in decoders:
        table.add_column(name)
    for task, setting, cells in rows:
        table.add_row(task, setting, *(cells.get(d, "") for d in decoders))
    return table
