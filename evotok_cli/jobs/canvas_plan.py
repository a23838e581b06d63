"""The canvas a `max_tokens` cap asks for, and the cut that keeps an answer within it.

A diffusion decoder fills a canvas of fixed length, made of whole blocks, so a token limit cannot be the
canvas length itself (most values do not divide into blocks). The rule: with no cap, or a cap of at least
the default generation length, the canvas is exactly the defaults (the answers are `evotok generate`'s);
a smaller cap decodes the smallest canvas of whole blocks that holds it, with as many steps per block as
the defaults, and the answer is cut to the cap. Pure functions: no model, no decoder object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evotok_cli.base.errors import ConfigError


@dataclass(frozen=True)
class CanvasPlan:
    """The generation settings a request decodes with."""

    gen_length: int
    block_length: int
    steps: int


def block_constraint(decoder: Any) -> int | None:
    """The block size a decoder's options fix, which a canvas must be a whole number of (d2f with
    `block_size` set); None: the generation settings' block length is the unit."""
    return getattr(decoder, "block_constraint", None)


def plan_canvas(*, gen_length: int, block_length: int, steps: int, max_tokens: int | None,
                block: int | None = None) -> CanvasPlan:
    """The canvas for at most `max_tokens` answer tokens, from the default settings (gen_length,
    block_length, steps: a valid layout) and the decoder's `block_constraint` (default: block_length).

    max_tokens None or >= gen_length: the defaults, unchanged. Otherwise the smallest multiple of the block
    that holds max_tokens, in blocks of that size, each with the defaults' steps per block."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", where="max_tokens",
                          fix="e.g. max_tokens 100, or leave it out for the model's default length")
    if max_tokens is None or max_tokens >= gen_length:
        return CanvasPlan(gen_length, block_length, steps)
    unit = block or block_length
    blocks = -(-max_tokens // unit)  # ceil
    steps_per_block = steps // (gen_length // block_length)
    return CanvasPlan(blocks * unit, unit, blocks * steps_per_block)


def cut_answer(token_ids: list[int], max_tokens: int | None, stop_ids: tuple[int, ...]) -> tuple[list[int], bool]:
    """A generated span cut to `max_tokens` answer tokens, and whether it was cut (finish_reason "length").

    The answer is the span up to its first stop id. One of at most max_tokens tokens is returned whole (its
    stop id and what follows included, as `generate` returns spans); a longer one is cut to its first
    max_tokens ids, which then hold no stop id."""
    answer = next((i for i, t in enumerate(token_ids) if t in stop_ids), len(token_ids))
    if max_tokens is None or answer <= max_tokens:
        return list(token_ids), False
    return list(token_ids[:max_tokens]), True
