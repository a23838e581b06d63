"""A GPU's memory running out, simulated on the CPU: the tiny model's network raises CUDA's out-of-memory
error for the forwards a test says do not fit, so the engine's memory handling can be tested here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def out_of_memory_when(model: Any, too_big: Callable[[dict], bool]) -> Iterator[None]:
    """Within the block, a forward whose keyword arguments `too_big` accepts raises `torch.OutOfMemoryError`."""
    original = model.net.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if too_big(kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    model.net.forward = forward
    try:
        yield
    finally:
        del model.net.forward
