"""The batch size `evotok bench` uses when --batch-size is not given (issue 31, item 2).

At batch 1 the README's bench (4 runs of 50 items) was projected at about 2 hours on 2 CPU cores, against 18
minutes at batch 50. An item samples from seed + its doc_id whatever the batch size, and on the CPU a
batch's rows are attended one by one (bit-exact), so the batch changes the time, never the tokens.

- CPU: `CPU_DEFAULT` rows (batch 16 is where `evotok generate`'s offline throughput on the bundled model
  levels off, benchmarks/results/serve_load.md), fewer where the available memory would not hold them.
- CUDA: as many rows as half the free memory after the model loaded holds, at most `MAX_ROWS`.

A run's items are then split into batches of even size (50 items at most 16 a batch: 13, 13, 12, 12, not
16, 16, 16, 2), so that no batch runs its passes for a handful of rows.
"""

from __future__ import annotations

import math
from typing import Any

CPU_DEFAULT = 16
MAX_ROWS = 64
SHOWN = f"auto: {CPU_DEFAULT} on the CPU (less where memory is short), from free memory on CUDA; 1 is the protocol's"


def row_bytes(model: Any, positions: int) -> int:
    """A generous estimate of what one row of `positions` tokens holds during a decode: the fp32 logits
    over the vocabulary with their softmax and the soft states built from them (x3), and a block's
    activations (about 40 hidden-size vectors per position)."""
    vocab = int(getattr(model, "vocab_size", 0) or 0)
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    return max(1, positions * (vocab * 4 * 3 + hidden * 4 * 40))


def available_bytes(device: Any) -> int | None:
    """Free accelerator memory, or the host's MemAvailable for the CPU; None when unknown."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    from evotok_cli.runtime.device import host_available_bytes  # here: runtime.device imports torch

    return host_available_bytes()


def default_batch_size(model: Any, positions: int) -> int:
    """The rows decoded together when --batch-size is not given, for rows of `positions` tokens."""
    free = available_bytes(model.device)
    on_cuda = getattr(model.device, "type", "cpu") == "cuda"
    ceiling = MAX_ROWS if on_cuda else CPU_DEFAULT
    if free is None:
        return 1 if on_cuda else CPU_DEFAULT
    fits = int(free * 0.5 // row_bytes(model, positions))
    return max(1, min(ceiling, fits))


def even_batches(count: int, largest: int) -> int:
    """The batch size that splits `count` items into the fewest batches of at most `largest`, evenly."""
    if count <= 0:
        return largest
    return math.ceil(count / math.ceil(count / largest))
