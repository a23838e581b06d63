"""`evotok generate --show`: the canvas of each prompt redrawn after every forward pass (rich, stderr).

Fed by the decoders' StepEvents through `update(event)`, the same records a trace file holds, so what the
terminal shows and what `evotok trace` draws agree: background = the position's input state in the pass,
text = the token it holds after the pass (bold: committed now, red underline: revised now).
"""

from __future__ import annotations

from typing import Any

from evotok_cli.decoding.api import StepEvent
from evotok_cli.viz.style import PAPER_NAMES, REVISED_COLOUR, STATE_COLOURS, STATES, TEXT_COLOURS
from evotok_cli.viz.tokens import TokenText

PLACEHOLDER = "·"  # a position with no committed token yet


class LiveCanvas:
    """A context manager around rich's Live; `update` is the `on_event` callback of generation."""

    def __init__(self, model: Any, console: Any, refresh_per_second: float = 8):
        self.text = TokenText(getattr(model, "tokenizer", None), model.mask_id)
        self.console, self.refresh_per_second = console, refresh_per_second
        self.rows: dict[int, StepEvent] = {}  # the latest event of each live row, by prompt index
        self.live: Any = None

    def __enter__(self) -> LiveCanvas:
        from rich.live import Live

        self.live = Live(self.render(), console=self.console, refresh_per_second=self.refresh_per_second,
                         transient=False)
        self.live.start()
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
            self.live.stop()
            if not self.console.is_terminal:  # rich ends the last frame with a newline only on terminals
                self.console.line()
        return False

    def update(self, event: StepEvent) -> None:
        """Rows join the live area with their first pass; a row with no [MASK] left is printed above it and
        leaves (the engine refills its place with the next prompt)."""
        self.rows[event.row] = event
        finished = [r for r, e in self.rows.items() if self.text.mask_id not in e.tokens]
        if finished and len(self.rows) > 1 and self.live is not None:
            for row in sorted(finished):
                self.live.console.print(self.render(rows=[row], legend=False))
                del self.rows[row]
        if self.live is not None:
            self.live.update(self.render())

    # -- drawing -----------------------------------------------------------------------------------
    def render(self, rows: list[int] | None = None, legend: bool = True) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = []
        for row in sorted(self.rows) if rows is None else rows:
            event = self.rows[row]
            lo, hi = event.block
            parts.append(Text(f"prompt {row} · step {event.step} · block [{lo}, {hi})", style="bold"))
            parts.append(self.canvas(event))
        if not parts:
            parts.append(Text("waiting for the first forward pass...", style="dim"))
        if legend:
            parts.append(self.legend())
        return Group(*parts)

    def canvas(self, event: StepEvent) -> Any:
        from rich.text import Text

        committed, revised = set(event.committed), set(event.revised)
        line = Text()
        for pos, (state, token) in enumerate(zip(event.states, event.tokens)):
            label = PLACEHOLDER if token == self.text.mask_id else self.text.label(token)
            style = f"{TEXT_COLOURS[state]} on {STATE_COLOURS[state]}"
            if pos in committed:
                style += " bold"
            if pos in revised:
                style += f" underline {REVISED_COLOUR} on {STATE_COLOURS[state]}"
            line.append(label, style=style)
            line.append(" ")
        return line

    @staticmethod
    def legend() -> Any:
        from rich.text import Text

        line = Text()
        line.append("states: ", style="dim")
        for s in STATES:
            line.append(f" {PAPER_NAMES[s]} ", style=f"{TEXT_COLOURS[s]} on {STATE_COLOURS[s]}")
            line.append(" ")
        line.append(" bold = committed now, ", style="dim")
        line.append("underline", style=f"underline {REVISED_COLOUR}")
        line.append(" = revised now", style="dim")
        return line
