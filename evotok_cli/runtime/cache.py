"""A key/value cache shared by the decoders, allocated once per generation (gpt-fast style).

The cache is the K/V memory of the whole canvas (prompt + generated positions). A forward over the canvas
slice [start, start + L) writes that slice's keys and values (after RoPE, i.e. at absolute positions) and
attends to every position written so far. That one rule covers all cache policies:
- prefix cache (Fast-dLLM): a full forward at each block start, then feed [block_start, end);
- dual cache (Fast-dLLM): a full forward at each block start, then feed only the current block, which
  overwrites its own K/V in place while the prefix and suffix stay as they were;
- D2F: feed from the first block not cached yet; finished blocks are exact because attention is
  block-causal.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, length, head_dim)  # (B, Hkv, Lmax, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = length
        self.filled = 0  # positions [0, filled) hold keys/values written by some forward

    def span_after(self, start: int, length: int) -> int:
        """How many key positions a forward over [start, start + length) attends to."""
        return max(self.filled, start + length)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        span = self.span_after(start, k.shape[2])
        if layer == len(self.k) - 1:
            self.filled = span
        return self.k[layer][:, :, :span], self.v[layer][:, :, :span]
