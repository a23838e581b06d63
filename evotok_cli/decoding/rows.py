"""The shared forward: the passes of many programs run as ONE model call, each row over its own slot of
the K/V pool (`make_pool`: per-row caches, `run_rows`; or one paged pool, `run_paged`). Why rows stay exact
when packed together is told in decoding/engine.py."""
from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import torch

from evotok_cli.decoding.passes import ForwardPass
from evotok_cli.runtime.attention import resolved_mode
from evotok_cli.runtime.cache import KVPool, PagedRows, RowBatch, SlotPool, bucket


def run_pass(model: Any, p: ForwardPass) -> torch.Tensor:
    """A pass on its own, as the model's plain forward (also the older interface's own cache objects)."""
    logits = model(**p.inputs, position_ids=p.position_ids, pad_offsets=p.pad_offsets, cache=p.cache,
                   start=p.start, attention_mask=p.attention_mask, logits_slice=p.logits_slice)
    return p.combine(logits) if p.combine is not None else logits


def _embed(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    if "soft_inputs" in inputs:
        return model.embed_soft(*inputs["soft_inputs"])
    return model.embed(inputs["input_ids"])


def _embed_all(model: Any, passes: list[ForwardPass]) -> list[torch.Tensor]:
    """Every pass's input embeddings (B_p, L_p, D) from ONE embedding call per kind of input (ids; soft
    inputs of K slots), not one per pass: host work per step that does not grow with the rows. The lookup
    and the soft mixture are computed position by position, so each pass gets what its own call gives."""
    kinds: dict[Hashable, list[int]] = {}
    for i, p in enumerate(passes):
        soft = p.inputs.get("soft_inputs")
        kinds.setdefault(None if soft is None else (soft[0].shape[-1], soft[1].dtype), []).append(i)
    out: list[torch.Tensor] = [None] * len(passes)  # type: ignore[list-item]
    for kind, at in kinds.items():
        if len(at) == 1:
            out[at[0]] = _embed(model, passes[at[0]].inputs)
            continue
        if kind is None:
            parts = [passes[i].inputs["input_ids"] for i in at]
            flat = model.embed(torch.cat([t.reshape(-1) for t in parts])[None])[0]  # (N, D)
        else:
            parts = [passes[i].inputs["soft_inputs"][0] for i in at]
            ids = torch.cat([t.reshape(-1, kind[0]) for t in parts])
            weights = torch.cat([passes[i].inputs["soft_inputs"][1].reshape(-1, kind[0]) for i in at])
            flat = model.embed_soft(ids[None], weights[None])[0]
        for i, t, piece in zip(at, parts, flat.split([t.shape[0] * t.shape[1] for t in parts])):
            out[i] = piece.view(t.shape[0], t.shape[1], -1)
    return out


def run_rows(model: Any, items: list[tuple[Hashable, ForwardPass]], pool: KVPool | SlotPool) -> list[torch.Tensor]:
    """ONE forward for the passes of many programs (`items`: (owner, pass)); each pass gets exactly its
    own logits. Rows are packed end to end into one batch row; a row with `kv_length` reads and writes its slot of
    `pool` (keyed by owner and row): a `KVPool` attends each row on its own (exact), a `SlotPool` all rows
    in one masked call per layer (`run_paged`)."""
    if isinstance(pool, SlotPool):
        return run_paged(model, items, pool)
    if len(items) == 1 and items[0][1].kv_length is None and not items[0][1].pad_offsets:
        return [run_pass(model, items[0][1])]  # alone and uncached: the plain forward
    embeds = _embed_all(model, [p for _, p in items])  # (B_p, L_p, D) each
    drops = [_padding_fed(p, e.shape[1]) for (_, p), e in zip(items, embeds)]
    keeps = [None if drop is None else _kept_columns(drop, e.shape[1], e.device) for e, drop in zip(embeds, drops)]
    # packed end to end in one batch row, not left-padded to the longest: padding would cost every linear
    # layer its share of padding columns (guidance's full-canvas pairs of mixed lengths: 1.4x the work); a
    # padded canvas's own padding columns are left out too (a merged program's rows: decoding/merging.py)
    x = torch.cat([_packed(e, keep) for e, keep in zip(embeds, keeps)])[None]  # (1, N, D)
    positions = torch.cat([_packed(p.position_ids if p.position_ids is not None else
                                   torch.arange(p.start, p.start + e.shape[1], device=x.device).expand(e.shape[0], -1),
                                   keep) for (_, p), e, keep in zip(items, embeds, keeps)])[None]  # (1, N)
    spans, starts, slots, masks, key_pads, index, counts = [], [], [], [], [], [], []
    at = 0
    for (owner, p), e, drop in zip(items, embeds, drops):
        rows, length = e.shape[0], e.shape[1]
        a, b = p.logits_slice
        for i in range(rows):
            skip = drop[i] if drop else 0  # padding columns at the window's start, not fed
            spans.append((at, at + length - skip))
            starts.append(p.start + skip)
            slots.append(None if p.kv_length is None else pool.slot(owner, i, p.kv_length, p.kv_memory, rows))
            mask = p.attention_mask
            masks.append(None if mask is None else mask[i if mask.shape[0] > 1 else 0][None])
            key_pads.append(p.pad_offsets[i] if p.pad_offsets else 0)
            index.extend(range(at + a - skip, at + b - skip))
            at += length - skip
        counts.append((rows, b - a))
    batch = RowBatch(spans, starts, slots, masks, key_pads)
    gather = torch.tensor(index, dtype=torch.long).to(x.device, non_blocking=True)
    logits = model(inputs_embeds=x, position_ids=positions, cache=batch, start=_common_start(items),
                   logits_slice=gather)[0]  # (N, V)
    return _split_logits(items, counts, logits)


def _padding_fed(p: ForwardPass, length: int) -> list[int] | None:
    """How many padding columns each row of a padded pass has at the start of its window [start, start +
    length), when they can be left out of the forward: not under an attention mask (it is indexed by the
    fed columns), and never a column whose logits the pass asks for."""
    if not p.pad_offsets or p.attention_mask is not None:
        return None
    drop = [min(max(pad - p.start, 0), length) for pad in p.pad_offsets]
    return drop if any(drop) and max(drop) <= p.logits_slice[0] else None


def _kept_columns(drop: list[int], length: int, device: Any) -> torch.Tensor:
    """The flat index of a (B, length) window's columns from drop[i] on in row i, made on the host (a bool
    mask would make the host wait for the device), once per padding pattern (a merged program's every
    full pass has the same)."""
    return _kept_on_host(tuple(drop), length).to(device, non_blocking=True)


@functools.lru_cache(maxsize=256)
def _kept_on_host(drop: tuple[int, ...], length: int) -> torch.Tensor:
    return torch.tensor([i * length + c for i, skip in enumerate(drop) for c in range(skip, length)])


def _packed(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """A pass's (B, L, ...) rows end to end, (fed columns, ...): every column, or the `keep` ones."""
    flat = t.reshape(-1, *t.shape[2:])
    return flat if keep is None else flat.index_select(0, keep)


def _common_start(items: list[tuple[Hashable, ForwardPass]]) -> int:
    """The `start` a shared forward states: the window's canvas start when every pass has the same, else 0.
    Under the engine's rows it says where the window sits (what a model wrapper may look at); attention
    reads each row's own start from the rows."""
    starts = {p.start for _, p in items}
    return starts.pop() if len(starts) == 1 else 0


def make_pool(model: Any, mode: str | None = None) -> KVPool | SlotPool:
    """The K/V memory an engine runs its rows over: per-row caches attended one row at a time ("rowwise",
    the CPU default: bit for bit each row alone), or one pool tensor per layer attended with one masked
    call over index tensors ("masked", the GPU default, and any compiled forward: its graphs never depend
    on which rows a step holds). The mode is the model's own (`padded_mode`, from --padded-attention), read
    here, once, never inside the forward."""
    mode = mode or resolved_mode(model.device, getattr(model, "padded_mode", None))
    if getattr(model, "compiled", False) or mode == "masked":
        return SlotPool(model.new_cache)
    return KVPool(model.new_cache)


def _split_logits(items: list[tuple[Hashable, ForwardPass]], counts: list[tuple[int, int]],
                  logits: torch.Tensor) -> list[torch.Tensor]:
    """The shared forward's gathered logits (N, V) cut back into each pass's (rows, positions, V), combined
    as its pass asks (guidance's paired rows)."""
    out, at = [], 0
    for (_, p), (rows, n) in zip(items, counts):
        part = logits[at:at + rows * n].view(rows, n, -1)
        at += rows * n
        out.append(p.combine(part) if p.combine is not None else part)
    return out


def _paged_mask(masks: list[tuple], shape: tuple[int, int, int], total: int, device: Any) -> torch.Tensor:
    """Which keys each query of the paged batch sees (rows, 1, length, width): every row its own keys, a
    dummy row the scratch slot's first position, and each program's own mask where it gave one."""
    rows, length, width = shape
    allowed = torch.zeros((rows, 1, length, width), dtype=torch.bool)
    allowed[total:, :, :, 0] = True  # dummy rows: the scratch slot's first position
    for row, _, _, lo, _, span, _ in masks:
        allowed[row, 0, :, lo:span] = True  # padding queries see the row's keys (never no key: NaN)
    allowed = allowed.to(device)
    for row, off, q_skip, lo, key0, span, mask in masks:  # the programs' masks, on the device
        if mask is not None:
            part = mask[0, q_skip:, lo - key0:span - key0]
            allowed[row, 0, off + q_skip:, lo:span] = False  # keys the mask does not reach: not seen
            allowed[row, 0, off + q_skip:, lo:lo + part.shape[-1]] = part
    return allowed


def run_paged(model: Any, items: list[tuple[Hashable, ForwardPass]], pool: SlotPool) -> list[torch.Tensor]:
    """`run_rows` over a `SlotPool`: the same rows, windows and masks as index and mask tensors, with the
    batch, window, key and logit counts rounded up to buckets (dummy rows attend to the scratch slot)."""
    embeds = _embed_all(model, [p for _, p in items])  # (B_p, L_p, D)
    total = sum(e.shape[0] for e in embeds)
    rows, length = bucket(total), bucket(max(e.shape[1] for e in embeds), 8)
    widest = max(max(p.kv_length or 0, p.start + e.shape[1]) for (_, p), e in zip(items, embeds))
    new = sum(1 for (owner, p), e in zip(items, embeds) for i in range(e.shape[0])
              if p.kv_length is None or (owner, i) not in pool.owned)  # rows that need a slot this step
    pool.reserve(new, max(widest, length))
    device = embeds[0].device
    x = embeds[0].new_zeros((rows, length, embeds[0].shape[-1]))
    positions = torch.zeros((rows, length), dtype=torch.long, device=device)  # device to device: no read-back
    write_slot = torch.zeros((rows, length), dtype=torch.long)  # padding columns write into slot 0
    write_pos = torch.arange(length).repeat(rows, 1)
    read_slot = torch.zeros(rows, dtype=torch.long)
    spans, masks, index, counts, scratch, written = [], [], [], [], [], []
    r = 0
    try:
        for (owner, p), e in zip(items, embeds):
            fed, (a, b) = e.shape[1], p.logits_slice
            off = length - fed
            x[r:r + e.shape[0], off:] = e
            for i in range(e.shape[0]):
                if p.kv_length is not None:
                    slot, _ = pool.slot(owner, i, p.kv_memory)
                    key0, span = 0, max(pool.filled[slot], p.start + fed)
                    written.append((slot, span))
                else:  # keys are the fed positions alone: a slot for this step
                    slot = pool.scratch()
                    scratch.append(slot)
                    key0, span = p.start, p.start + fed
                kp = p.pad_offsets[i] if p.pad_offsets else 0
                mask = p.attention_mask
                masks.append((r + i, off, max(0, kp - p.start), max(key0, kp), key0, span,
                              None if mask is None else mask[i if mask.shape[0] > 1 else 0]))
                spans.append(span)
                write_slot[r + i, off:] = slot
                write_pos[r + i, off:] = torch.arange(p.start, p.start + fed)
                read_slot[r + i] = slot
                positions[r + i, off:] = (p.position_ids[i] if p.position_ids is not None
                                          else torch.arange(p.start, p.start + fed, device=device))
                index.extend(range((r + i) * length + off + a, (r + i) * length + off + b))
            counts.append((e.shape[0], b - a))
            r += e.shape[0]
        allowed = _paged_mask(masks, (rows, length, min(bucket(max(spans), 16), pool.columns)), total, device)
        gather = torch.tensor(index + [0] * (bucket(len(index), 8) - len(index)), dtype=torch.long)
        batch = PagedRows(pool.k, pool.v, write_slot.to(device), write_pos.to(device), read_slot.to(device), allowed)
        logits = model(inputs_embeds=x, position_ids=positions, cache=batch, start=_common_start(items),
                       logits_slice=gather.to(device))[0]  # (N, V)
    finally:
        for slot in scratch:
            pool.release(slot)
    for slot, span in written:
        pool.filled[slot] = span
    return _split_logits(items, counts, logits)

