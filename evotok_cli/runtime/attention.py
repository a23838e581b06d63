"""Bidirectional scaled-dot-product attention shared by the architectures.

The step engine's shared forward (`decoding/engine.py`) attends its rows in one of two ways, chosen once
when the engine is made (an argument of the forward, never read inside it): `attend_rows` (a `RowBatch`:
rows packed end to end, one call per row over its own KV slot: bit for bit each row alone; the CPU
default) or `attend_paged` (`PagedRows`: one pool tensor per layer, written and read through index
tensors, one masked call per layer; the GPU default and any compiled forward). What follows is the
direct call with `pad_offsets` (a library caller's padded batch, and passes of the older interface that
hold a cache of their own).

A left-padded batch (rows of different lengths in one forward, `pad_offsets`) is attended in one of two
ways, chosen per model (`load_model(padded_attention=...)`, `--padded-attention`; the model hands it to
its forward as an argument, so two models in one process keep their own, and the forward reads no
module-level state):

- "masked": ONE SDPA call per layer with a key-padding mask. Each row sees its own real keys only, so its
  output is the row's alone up to float rounding, not bit for bit: the fused kernels sum the same terms
  in another order and over a longer row (~1e-7 relative in fp32 on CPU), which is enough to flip a
  near-tie, and EvoToken's revisions amplify such flips (several batch == solo token tests differ).
- "rowwise": one call per padded row over its real keys, exactly the floating-point operations of the
  row decoded alone, so batched and single runs agree bit for bit; B calls per layer.
- "auto" (the default): rowwise on CPU, masked elsewhere. On CPU a forward is bound by its matmuls and
  the per-row calls cost nothing measurable (benchmarks/padded_batch.py, batch 8, prompts 20..200, the
  bundled model: masked 0.95x the per-row tokens/s on a busy 2-core CPU), while the per-row path
  attends over fewer keys and keeps tokens exact; on a GPU each of the B x layers calls is a launch.

Padding queries (masked mode) attend to their row's real keys too: a query with no key gives a NaN
softmax row, and a NaN there would reach real rows through the next layer (masked weights are 0, and
0 * NaN is NaN). Their outputs are never read.

Grouped-query heads (Dream): the CPU fused kernel takes `enable_gqa` with a mask; on CUDA the fused
kernel that takes a mask (memory-efficient) does not take grouped heads, and SDPA would fall back to the
math path, so off CPU a masked call expands the K/V heads first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evotok_cli.runtime.cache import KVCache, PagedRows, RowBatch

PADDED_MODES = ("auto", "masked", "rowwise")


def check_padded_mode(mode: str) -> str:
    """`--padded-attention`'s one-line error for a mode that is not one of PADDED_MODES."""
    from evotok_cli.base.errors import ConfigError

    if mode not in PADDED_MODES:
        raise ConfigError(f"unknown padded attention mode {mode!r}", where="--padded-attention",
                          fix="use auto, masked (one call per layer: fast on a GPU) or rowwise (bit-exact per row)")
    return mode


def resolved_mode(device: torch.device, mode: str | None = None) -> str:
    """What `mode` (a model's padded-attention mode; None is "auto") means on `device`: "auto" is rowwise on
    CPU, masked elsewhere. A pure function: the mode is the caller's, never a process-wide setting."""
    mode = mode or "auto"
    if mode not in PADDED_MODES:
        raise ValueError(f"padded attention mode {mode!r}: one of {', '.join(PADDED_MODES)}")
    if mode == "auto":
        return "rowwise" if device.type == "cpu" else "masked"
    return mode


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on a fused kernel for multi-head and grouped-query heads, masked or not."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask is not None and q.device.type != "cpu":  # CUDA: no fused kernel takes a mask and grouped heads
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Lk, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # no K/V copy


def real_keys(pad_offsets: list[int], lk: int, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, Lk) bool, True at each row's real keys [off, Lk). Building it copies the offsets to the
    device (a GPU stall), so a forward builds it once (`forward_keys`) and hands it to every layer."""
    off = torch.tensor(pad_offsets, device=device)[:, None]  # (B, 1)
    return (torch.arange(lk, device=device) >= off)[:, None, None, :]


def forward_keys(pad_offsets: list[int] | None, cache: KVCache | RowBatch | PagedRows | None, start: int,
                 length: int, mode: str, device: torch.device) -> torch.Tensor | None:
    """The real-keys mask every layer of one forward over `length` fed positions shares, or None where no
    layer reads one: nothing padded, the engine's rows (they carry their own), or the per-row path. Every
    layer writes the same window, so the key count is known before the first: the cache's span after the
    write, or the fed positions."""
    if not pad_offsets or not any(pad_offsets) or isinstance(cache, (RowBatch, PagedRows)):
        return None
    if resolved_mode(device, mode) == "rowwise":
        return None
    lk = cache.span_after(start, length) if cache is not None else length
    return real_keys(pad_offsets, lk, device)


def padding_mask(pad_offsets: list[int], lq: int, lk: int, start: int, mask: torch.Tensor | None,
                 device: torch.device, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask, True = may attend: each row's real keys, combined with `mask` for real queries.

    Without `mask` it is (B, 1, 1, Lk) and every query, padding included, sees its row's real keys. With
    one it is (B, 1, Lq, Lk): real queries keep `mask` restricted to real keys, padding queries get the
    real keys alone (their row of `mask` may allow padding keys only, which would leave them none).
    `keys`: the forward's `real_keys` (built here when not given).
    """
    keys = real_keys(pad_offsets, lk, device) if keys is None else keys
    if mask is None:
        return keys
    real_queries = keys[..., start:start + lq].transpose(-1, -2)  # (B, 1, Lq, 1): queries sit among the keys
    return torch.where(real_queries, mask & keys, keys)


def _attend_rowwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    pad_offsets: list[int], start: int) -> torch.Tensor:
    """One call per row over its real keys and queries: bit for bit the row decoded alone."""
    out = torch.zeros_like(q)
    for b, off in enumerate(pad_offsets):
        q_off = max(0, off - start)  # queries that are padding stay zero: nothing reads them
        row_mask = None if mask is None else mask[b:b + 1, :, q_off:, off:]
        out[b:b + 1, :, q_off:] = _sdpa(q[b:b + 1, :, q_off:], k[b:b + 1, :, off:], v[b:b + 1, :, off:], row_mask)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           pad_offsets: list[int] | None = None, start: int = 0, mode: str = "auto",
           keys: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, H, Lq, D) for canvas positions [start, start + Lq); k, v: (B, Hkv, Lk, D) for [0, Lk) (or
    for the fed positions when Lk == Lq and start == 0). mask: bool (B, 1, Lq, Lk), True = may attend.
    pad_offsets: left padding per row (keys [0, off) and queries before canvas position off are padding).
    mode: how padded rows are attended (PADDED_MODES); keys: the forward's `real_keys` for masked mode."""
    if not pad_offsets or not any(pad_offsets):
        return _sdpa(q, k, v, mask)
    if resolved_mode(q.device, mode) == "rowwise":
        return _attend_rowwise(q, k, v, mask, pad_offsets, start)
    return _sdpa(q, k, v, padding_mask(pad_offsets, q.shape[2], k.shape[2], start, mask, q.device, keys))


def attend_layer(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache | RowBatch | PagedRows | None, start: int, pad_offsets: list[int] | None,
                 mode: str = "auto", keys: torch.Tensor | None = None) -> torch.Tensor:
    """A block's attention over its fresh q/k/v (after RoPE): through a generation's cache (write the
    window, attend to everything written), through the engine's rows (`RowBatch`: each row its own slot,
    window and mask), or over the fed keys alone. `mode` and `keys` come from the forward (its model's
    padded-attention mode and `forward_keys`)."""
    if isinstance(cache, RowBatch):
        return attend_rows(layer, q, k, v, cache)
    if isinstance(cache, PagedRows):
        return attend_paged(layer, q, k, v, cache)
    if cache is not None:  # keys are cached after RoPE: positions are absolute, so this is exact
        k, v = cache.update(layer, start, k, v)  # (B, Hkv, Lk, D)
    return attend(q, k, v, mask, pad_offsets, start if cache is not None else 0, mode, keys)


def _row_keys(layer: int, r: int, k: torch.Tensor, v: torch.Tensor, rows: RowBatch
              ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row r's first real query column and end in the packed batch, its real keys and values, and its mask
    over them (queries from that column on). Writes the row's window into its slot first."""
    (begin, end), start, kp, slot, mask = rows.spans[r], rows.starts[r], rows.key_pads[r], rows.slots[r], rows.masks[r]
    kr, vr = k[:, :, begin:end], v[:, :, begin:end]  # the fed window: canvas [start, start + L_r)
    if slot is not None:
        kr, vr = slot.update(layer, start, kr, vr)  # keys [0, span) of the row's canvas
        key0 = 0
    else:
        key0 = start  # without a slot the keys are the fed positions themselves
    q_skip = max(0, kp - start)  # queries before the row's own padding ends are padding
    k_skip = max(0, kp - key0)
    if mask is not None:
        q0, k0 = rows.mask_at[r] if rows.mask_at is not None else (0, 0)
        mask = mask[:, :, q0 + q_skip:q0 + end - begin, k0 + k_skip:k0 + kr.shape[2]]
    return begin + q_skip, end, kr[:, :, k_skip:], vr[:, :, k_skip:], mask


def attend_rows(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowBatch) -> torch.Tensor:
    """Attention for the engine's exact shared forward (q, k, v: (1, H(kv), N, D), the rows packed end to
    end): one call per row over its own keys, exactly the row's own floating-point operations."""
    out = torch.zeros_like(q)
    for r in range(len(rows.spans)):
        q0, end, kr, vr, mask = _row_keys(layer, r, k, v, rows)
        out[:, :, q0:end] = _sdpa(q[:, :, q0:end], kr, vr, mask)
    return out


def attend_paged(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PagedRows) -> torch.Tensor:
    """Attention of the engine's shared forward over the slot pool, in tensor operations only: write
    every fed column's K/V into its slot, gather each row's slot, one masked call. Up to float rounding
    the row alone (like "masked"); the engine's exact mode is `attend_rows`."""
    pool_k, pool_v = rows.k[layer], rows.v[layer]  # (S, Hkv, C, D)
    pool_k[rows.write_slot, :, rows.write_pos] = k.transpose(1, 2)  # (R, L, Hkv, D) into their slots
    pool_v[rows.write_slot, :, rows.write_pos] = v.transpose(1, 2)
    width = rows.mask.shape[-1]
    keys = pool_k[:, :, :width].index_select(0, rows.read_slot)  # (R, Hkv, K, D): the rows' first K positions
    values = pool_v[:, :, :width].index_select(0, rows.read_slot)
    return _sdpa(q, keys, values, rows.mask)
