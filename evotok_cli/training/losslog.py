"""The loss log of a fine-tune: loss_log.jsonl (one line per optimizer step, appended as the run goes, so
a crash loses at most the line being written) and its picture, loss.png."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evotok_cli.base.files import atomic_open, atomic_write_text

NAME = "loss_log.jsonl"


def append(out: Path, record: dict[str, Any]) -> None:
    with (out / NAME).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def rewrite(out: Path, history: list[dict[str, Any]]) -> None:
    """The log as `history` (a resumed run's steps up to its checkpoint), written atomically."""
    atomic_write_text(out / NAME, "".join(json.dumps(r) + "\n" for r in history))


def read(out: Path, up_to: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The logged steps up to step `up_to` (the checkpoint's). A line torn by a crash mid-append (or
    otherwise unreadable) is dropped with a note: the log is rewritten from what is kept."""
    path = out / NAME
    if not path.is_file():
        return []
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            dropped += 1
        elif rec["step"] <= up_to:
            kept.append(rec)
    if dropped:
        log(f"{NAME}: dropped {dropped} unreadable line(s) (torn by an interruption?)")
    return kept


def plot(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss per optimizer step (and per pass, for multi-pass objectives) on a log scale; None without
    matplotlib or without steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    passes = len(history[-1]["pass_losses"])
    if passes > 1:
        for j in range(passes):
            ax.plot(steps, [r["pass_losses"][j] if len(r["pass_losses"]) > j else float("nan") for r in history],
                    lw=0.8, label=f"pass {j + 1}")
    ax.plot(steps, [r["loss"] for r in history], lw=1.2, color="black", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:  # a full disk leaves no half picture
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path
