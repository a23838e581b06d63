"""The hostile-input matrix: one table of bad inputs, every command.

Each area (generate, bench, finetune, ...) lists its cases in a module of this package; the test in
`tests/test_hostile_inputs.py` runs them all through the real entry point and asserts the user-error
contract for each: exit code 2, exactly one `error:` line that names the problem and says how to fix it
(it ends in a parenthesised hint), no traceback, nothing on stdout, and the case's folder byte for byte
as it was before the command (nothing written, truncated, or left half-written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Ctx:
    """What a case can use: its own empty folder and the session's tiny checkpoints (never modified)."""

    tmp: Path
    model: Path  # tiny LLaDA checkpoint with a tokenizer
    dream: Path  # tiny Dream checkpoint
    cli: Callable[..., Any]  # run `evotok ...` in process (for setups that need a real run first)

    def vars(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "model": str(self.model), "dream": str(self.dream)}


@dataclass
class Case:
    id: str
    argv: list[str]  # `{tmp}`, `{model}`, `{dream}` are filled in from the Ctx
    expect: str  # a piece of the error line
    setup: Callable[[Ctx], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def write(rel: str, data: str | bytes) -> Callable[[Ctx], None]:
    """A setup that writes one file (text or raw bytes) under the case's folder."""
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return setup


def both(*setups: Callable[[Ctx], None] | None) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        for s in setups:
            if s is not None:
                s(ctx)
    return setup


BAD_BYTES = b"\xff\xfe caf\xe9 \x80\n"
