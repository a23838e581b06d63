"""left-to-right: commit the leftmost masked positions of the current block, whatever their confidence.

A `BlockwiseDecoder` supplies the block loop as a program for evotok's step engine; a decoder writes only
its step: `update`, from one pass's logits to the committed positions (see the README's decoder API).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evotok_cli.decoding.api import option
from evotok_cli.decoding.blockwise import BlockwiseDecoder
from evotok_cli.decoding.schedule import gumbel_candidates


@dataclass
class LeftToRightConfig:
    tokens_per_step: int = option(1, "masked positions committed per forward pass", min=1)


class LeftToRightDecoder(BlockwiseDecoder):
    name = "left-to-right"
    Config = LeftToRightConfig

    def update(self, model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature):
        a, b = cols
        window = canvas.x[:, a:b]
        x0 = gumbel_candidates(logits, temperature, generator, exclude=model.mask_id)
        chosen = torch.zeros_like(window, dtype=torch.bool)
        for row in open_rows.nonzero().flatten().tolist():  # rows whose block holds a [MASK]
            masked = (window[row] == model.mask_id).nonzero().flatten()
            chosen[row, masked[: max(counts[row], self.config.tokens_per_step)]] = True
        window[chosen] = x0[chosen]
        committed = torch.zeros_like(canvas.x, dtype=torch.bool)
        committed[:, a:b] = chosen
        return committed, torch.zeros_like(committed)
