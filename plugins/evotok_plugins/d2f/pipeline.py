"""A d2f row's pipeline state (its blocks and their progress) and the block-causal masks over it: what a
row decoded alone (decoder.py) and rows decoded as one program (merged.py) both keep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from evotok_cli.decoding.logprobs import LogprobRecorder


@dataclass
class PipelineBlock:
    start: int  # canvas columns [start, end)
    end: int
    state: str = "active"  # active -> to_cache -> in_cache
    full: bool = False  # fully activated
    masks_left: int = 0
    predicted: bool = False  # has been through a forward pass (soft mode needs a prediction)

    @property
    def progress(self) -> float:
        return 1.0 - self.masks_left / (self.end - self.start)

    def describe(self, origin: int) -> dict:
        return {"start": self.start - origin, "end": self.end - origin, "state": self.state,
                "fully_activated": self.full, "progress": round(self.progress, 4)}


@dataclass
class RowRun:
    x: torch.Tensor  # (1, L) canvas
    prompt: PipelineBlock
    size: int  # tokens per pipeline block
    blocks: list[PipelineBlock] = field(default_factory=list)
    eos: bool = False
    nfe: int = 0
    last_output: torch.Tensor | None = None  # shifted logits: output at the last cached position
    logprobs: LogprobRecorder | None = None  # with request.logprobs

    def uncached_start(self, cache: bool, default: int | None = None) -> int:
        """Where the row's next pass starts feeding: its first block not yet in the cache (the prompt's start
        without a cache); `default` when every block is cached."""
        if not cache:
            return self.prompt.start
        if self.prompt.state != "in_cache":
            return self.prompt.start
        for b in self.blocks:  # a loop, not a generator: merged programs ask for every row every step
            if b.state != "in_cache":
                return b.start
        return default

    def mark_cached(self) -> None:
        """The pass that just ran wrote the `to_cache` blocks into the row's KV slot."""
        if self.prompt.state == "to_cache":
            self.prompt.state = "in_cache"
        for b in self.blocks:
            if b.state == "to_cache":
                b.state = "in_cache"


def block_causal_mask(blocks: list[PipelineBlock], lo: int, hi: int, device) -> torch.Tensor:
    """(1, 1, hi - lo, hi) bool: a query in block j sees keys [0, end_j)."""
    mask = torch.zeros(1, 1, hi - lo, hi, dtype=torch.bool, device=device)
    for b in blocks:
        if b.end <= lo or b.start >= hi:
            continue
        q0, q1 = max(b.start, lo) - lo, min(b.end, hi) - lo
        mask[:, :, q0:q1, :b.end] = True
    return mask


def aligned_block_mask(gen_start: int, size: int, lo: int, hi: int, device: Any) -> torch.Tensor:
    """(1, 1, hi - lo, hi) bool, the block-causal mask of every row of a left-padded canvas: a query in
    the prompt (columns before `gen_start`) sees the prompt, one in generated block j sees keys
    [0, gen_start + (j + 1) * size). Padding keys are left out by the engine (the rows' key pads)."""
    cols = torch.arange(lo, hi, device=device)
    ends = torch.where(cols < gen_start, gen_start,
                       gen_start + ((cols - gen_start).div(size, rounding_mode="floor") + 1) * size)
    return (torch.arange(hi, device=device)[None] < ends[:, None])[None, None]
