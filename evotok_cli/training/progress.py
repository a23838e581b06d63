"""Progress of a fine-tune on stderr."""

from __future__ import annotations

import time
from typing import Any


class TrainProgress:
    """A rich progress bar on a terminal; otherwise a plain line every `every` steps, and at least every
    30 s and every 10% of the steps, so a log file shows a slow run is alive."""

    SECONDS = 30.0

    def __init__(self, console: Any, total: int, every: int):
        self.console, self.total, self.every, self.bar, self.task = console, total, every, None, None
        self.tenth = max(1, -(-total // 10))
        self.clock = time.monotonic
        self.last = self.clock()

    def __enter__(self) -> TrainProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, info="")
        return self

    def update(self, step: int, total: int, record: dict[str, Any]) -> None:
        passes = " ".join(f"{x:.3f}" for x in record["pass_losses"]) if len(record["pass_losses"]) > 1 else ""
        info = (f"loss {record['loss']:.4f}{' [' + passes + ']' if passes else ''} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif (step % self.every == 0 or step % self.tenth == 0 or step == total
              or self.clock() - self.last >= self.SECONDS):
            self.console.print(f"step {step}/{total} {info}")
            self.last = self.clock()

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
