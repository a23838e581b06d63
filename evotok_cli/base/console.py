"""The rich consoles every command prints through.

On a terminal rich fits output to the window. Piped into a file or a CI log it would assume 80 columns
and fold table rows and summary lines; there a wide console keeps each row on one line, so logs stay
greppable and tables readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PIPED_WIDTH = 240


def console(*, stderr: bool = False) -> Any:
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out = Console(stderr=stderr, highlight=False, width=PIPED_WIDTH)
    return out


def stderr() -> Any:
    return console(stderr=True)


class PlainProgress:
    """Progress for logs (stderr not a terminal): one plain line at every further tenth of the work, and
    at least every `every_s` seconds while work goes on, so a CI log or a scheduler shows the job is alive."""

    def __init__(self, out: Any, label: str, total: int | None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.label, self.total, self.every_s, self.clock = out, label, total, every_s, clock
        self.started = self.last = self.clock()
        self.next_tenth = 1

    def update(self, done: int, detail: str = "") -> None:
        now = self.clock()
        due = now - self.last >= self.every_s
        if self.total:
            tenth = done * 10 // self.total
            if tenth >= self.next_tenth:
                self.next_tenth, due = tenth + 1, True
        if due:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            self.out.print(f"{self.label}: {done}{of}{' ' + detail if detail else ''} "
                           f"({now - self.started:.0f} s)", soft_wrap=True)
