"""The canvas: a batch of prompts, left-padded, followed by the generated span full of [MASK].

Left padding puts every row's generated span at the same columns, so blocks line up across the batch.
Pad keys are masked out of attention and each row's positions start at 0 on its first real token, so a
row decodes exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evotok_cli.base.errors import ConfigError


@dataclass
class Canvas:
    x: torch.Tensor  # (B, L) token ids
    real: torch.Tensor  # (B, L) bool: not padding
    positions: torch.Tensor  # (B, L) RoPE positions
    gen_start: int  # first generated column (the same for every row)
    prompt_lengths: list[int]

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def padded(self) -> bool:
        return self.pad_offsets is not None

    @property
    def pad_offsets(self) -> list[int] | None:
        """Left padding per row (None when no row is padded): the model attends each row over its real
        keys only, which keeps a padded row bit-identical to the same prompt decoded alone."""
        offsets = [self.gen_start - n for n in self.prompt_lengths]
        return offsets if any(offsets) else None

    @property
    def gen_length(self) -> int:
        return self.length - self.gen_start

    def key_mask(self, start: int = 0, end: int | None = None, keys: int | None = None) -> torch.Tensor | None:
        """Bool attention mask (B, 1, queries, keys) hiding pad keys; None when nothing is padded."""
        if not self.padded:
            return None
        end = self.length if end is None else end
        keys = self.length if keys is None else keys
        return self.real[:, None, None, :keys].expand(-1, 1, end - start, -1)

    def generated(self) -> torch.Tensor:
        return self.x[:, self.gen_start:]


def widen(part: torch.Tensor, like: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`part`, a bool mask over columns [lo, hi), placed in an all-False mask of `like`'s (B, L) shape:
    decoders update a window of columns, but report what they committed and revised over the canvas."""
    out = torch.zeros_like(like, dtype=torch.bool)
    out[:, lo:hi] = part
    return out


def build_canvas(prompts: list[list[int]], gen_length: int, *, mask_id: int, pad_id: int, max_length: int,
                 device: torch.device) -> Canvas:
    if not prompts:
        raise ConfigError("no prompts given", where="--prompt", fix="pass --prompt TEXT or --prompts-file FILE")
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise ConfigError("a prompt is empty", where="--prompt", fix="give every prompt at least one token")
    total = longest + gen_length
    if total > max_length:
        raise ConfigError(
            f"prompt ({longest} tokens) + gen length ({gen_length}) = {total} exceeds the model's maximum {max_length}",
            where="--gen-length", fix="shorten the prompt or lower --gen-length")
    # one tensor from the padded lists, not a few operations per row (a merged program has many rows)
    x = torch.tensor([[pad_id] * (longest - len(p)) + list(p) + [mask_id] * gen_length for p in prompts],
                     dtype=torch.long)
    real = torch.tensor([[False] * (longest - len(p)) + [True] * (len(p) + gen_length) for p in prompts])
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return Canvas(x.to(device), real.to(device), positions.to(device), longest, [len(p) for p in prompts])
