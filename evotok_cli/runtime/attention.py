"""Bidirectional scaled-dot-product attention shared by the architectures.

Left-padded batches are attended row by row over each row's real keys only (`pad_offsets`), so a padded
row computes exactly the floating-point operations of the same prompt decoded alone: batched and single
runs then agree bit for bit, which a padding mask cannot promise (masked keys change the reductions'
length and order). The price is one kernel call per row once any row of the batch is padded; batches of
equal-length prompts keep a single call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, mask):
    """Grouped-query attention without copying keys: SDPA repeats the K/V heads itself."""
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           pad_offsets: list[int] | None = None, start: int = 0) -> torch.Tensor:
    """q: (B, H, Lq, D) for canvas positions [start, start + Lq); k, v: (B, Hkv, Lk, D) for [0, Lk) (or
    for the fed positions when Lk == Lq and start == 0). mask: bool (B, 1, Lq, Lk), True = may attend."""
    if not pad_offsets or not any(pad_offsets):
        return _sdpa(q, k, v, mask)
    out = torch.zeros_like(q)
    for b, off in enumerate(pad_offsets):
        q_off = max(0, off - start)  # queries that are padding stay zero: nothing reads them
        row_mask = None if mask is None else mask[b:b + 1, :, q_off:, off:]
        out[b:b + 1, :, q_off:] = _sdpa(q[b:b + 1, :, q_off:], k[b:b + 1, :, off:], v[b:b + 1, :, off:], row_mask)
    return out
