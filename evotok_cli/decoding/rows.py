"""The shared forward: the passes of many programs run as ONE model call, each row over its own slot of
the K/V pool (`make_pool`: per-row caches, `run_rows`; or one paged pool, `run_paged`). Why rows stay exact
when packed together is told in decoding/engine.py."""
from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import torch

from evotok_cli.decoding.passes import ForwardPass, RowWindow
from evotok_cli.runtime.attention import resolved_mode
from evotok_cli.runtime.cache import KVPool, PagedRows, RowBatch, SlotPool, bucket


def run_pass(model: Any, p: ForwardPass) -> torch.Tensor:
    """A pass on its own, as the model's plain forward (also the older interface's own cache objects)."""
    logits = model(**p.inputs, position_ids=p.position_ids, pad_offsets=p.pad_offsets, cache=p.cache,
                   start=p.start, attention_mask=p.attention_mask, logits_slice=p.logits_slice)
    return p.combine(logits) if p.combine is not None else logits


class Layout(NamedTuple):
    """A pass's rows as the shared forward feeds them: each row's window, the flat index of the fed columns
    of its (B, L) inputs (on the host; None: every column) and how many logits it gets back."""

    windows: tuple[RowWindow, ...]
    fed: torch.Tensor | None
    logits: tuple[int, int]  # (rows, positions) of the pass's logits


def _layout(p: ForwardPass) -> Layout:
    """The pass's own `windows`, else the whole window less a padded row's leading padding columns where
    they can be left out (`_padding_fed`). Made once per pattern (a merged program's every full pass has
    the same): host work per pass, not per row."""
    length = p.length
    if p.windows is not None:
        return _windowed_layout(tuple(p.windows), length)
    drop = _padding_fed(p, length)
    return _plain_layout(None if drop is None else tuple(drop), p.rows, length, p.logits_slice)


@functools.lru_cache(maxsize=256)
def _plain_layout(drop: tuple[int, ...] | None, rows: int, length: int, logits: tuple[int, int]) -> Layout:
    a, b = logits
    windows = tuple(RowWindow(drop[i] if drop else 0, length, a, b) for i in range(rows))
    return Layout(windows, None if drop is None else _fed_on_host(windows, length), (rows, b - a))


@functools.lru_cache(maxsize=256)
def _windowed_layout(windows: tuple[RowWindow, ...], length: int) -> Layout:
    full = True
    for w in windows:  # a loop, not a generator: a call per row otherwise
        if w.lo != 0 or w.hi != length:
            full = False
            break
    return Layout(windows, None if full else _fed_on_host(windows, length),
                  (1, sum([w.logits_hi - w.logits_lo for w in windows])))


def _fed_on_host(windows: tuple[RowWindow, ...], length: int) -> torch.Tensor:
    """Made on the host: a bool mask would make the host wait for the device."""
    return torch.tensor([i * length + c for i, w in enumerate(windows) for c in range(w.lo, w.hi)], dtype=torch.long)


def _on(fed: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return None if fed is None else fed.to(device, non_blocking=True)


def _embed_fed(model: Any, passes: list[ForwardPass], feds: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Every pass's fed columns' input embeddings (N_p, D), from ONE embedding call per kind of input
    (ids; soft inputs of K slots), not one per pass: host work per step that does not grow with the rows.
    Only fed columns are embedded (a soft column costs K lookups). The lookup and the soft mixture are
    computed position by position, so each pass gets what its own call gives."""
    kinds: dict[Hashable, list[int]] = {}
    for i, p in enumerate(passes):
        soft = p.inputs.get("soft_inputs")
        kinds.setdefault(None if soft is None else (soft[0].shape[-1], soft[1].dtype), []).append(i)
    out: list[torch.Tensor] = [None] * len(passes)  # type: ignore[list-item]
    for kind, at in kinds.items():
        if kind is None:
            ids = _joined([_packed(passes[i].inputs["input_ids"], feds[i]) for i in at])
            flat = model.embed(ids[None])[0]  # (N, D)
        else:
            ids = _joined([_packed(passes[i].inputs["soft_inputs"][0], feds[i]) for i in at])
            weights = _joined([_packed(passes[i].inputs["soft_inputs"][1], feds[i]) for i in at])
            flat = model.embed_soft(ids[None], weights[None])[0]
        sizes = [passes[i].rows * passes[i].length if feds[i] is None else feds[i].numel() for i in at]
        for i, piece in zip(at, flat.split(sizes)):
            out[i] = piece
    return out


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_mask(p: ForwardPass, i: int, w: RowWindow, cached: bool) -> tuple[torch.Tensor | None, int, int]:
    """Row i's mask (1, 1, ., .) and where its (L_i, K_i) part starts in it: the pass's row (or its one shared
    mask) from (0, 0); for a pass with `windows`, from the row's first fed query and its first key (0 with
    a slot, else its first fed column). Not cut here: a shared mask costs no tensor operation per row."""
    mask = p.attention_mask
    if mask is None:
        return None, 0, 0
    own = mask if mask.shape[0] == 1 else mask[i:i + 1]  # (1, 1, ., .)
    if p.windows is None:
        return own, 0, 0
    return own, w.lo, 0 if cached else p.start + w.lo


def run_rows(model: Any, items: list[tuple[Hashable, ForwardPass]], pool: KVPool | SlotPool) -> list[torch.Tensor]:
    """ONE forward for the passes of many programs (`items`: (owner, pass)); each pass gets exactly its
    own logits. Rows are packed end to end into one batch row; a row with `kv_length` reads and writes its slot of
    `pool` (keyed by owner and row): a `KVPool` attends each row on its own (exact), a `SlotPool` all rows
    in one masked call per layer (`run_paged`)."""
    if isinstance(pool, SlotPool):
        return run_paged(model, items, pool)
    p0 = items[0][1]
    if len(items) == 1 and p0.kv_length is None and not p0.pad_offsets and p0.windows is None:
        return [run_pass(model, p0)]  # alone and uncached: the plain forward
    # packed end to end in one batch row, not left-padded to the longest: padding would cost every linear
    # layer its share of padding columns (guidance's full-canvas pairs of mixed lengths: 1.4x the work); a
    # padded canvas's own padding columns are left out too (a merged program's rows: decoding/merging.py),
    # and so are the columns a row of a pass with `windows` does not feed
    layouts = [_layout(p) for _, p in items]
    feds = [_on(lay.fed, p.device) for (_, p), lay in zip(items, layouts)]
    x = torch.cat(_embed_fed(model, [p for _, p in items], feds))[None]  # (1, N, D)
    positions = torch.cat([_packed(p.position_ids if p.position_ids is not None else
                                   torch.arange(p.start, p.start + p.length, device=x.device).expand(p.rows, -1),
                                   fed) for (_, p), fed in zip(items, feds)])[None]  # (1, N)
    spans, starts, slots, masks, mask_at, key_pads, index = [], [], [], [], [], [], []
    at = 0
    for (owner, p), lay in zip(items, layouts):
        kv, first, rows, pads, start = p.kv_length, p.first_row, p.rows, p.pad_offsets, p.start
        for i, w in enumerate(lay.windows):  # the rows' bookkeeping: as few calls per row as can be
            lo, hi, a, b = w
            if lo == hi:
                continue  # sits this pass out
            slot = None if kv is None else pool.slot(owner, first + i, kv, p.kv_memory, first + rows)
            spans.append((at, at + hi - lo))
            starts.append(start + lo)
            slots.append(slot)
            if p.attention_mask is None:
                masks.append(None)
                mask_at.append((0, 0))
            else:
                mask, q0, k0 = _row_mask(p, i, w, slot is not None)
                masks.append(mask)
                mask_at.append((q0, k0))
            key_pads.append(pads[i] if pads else 0)
            index.extend(range(at + a - lo, at + b - lo))
            at += hi - lo
    batch = RowBatch(spans, starts, slots, masks, key_pads, mask_at)
    gather = torch.tensor(index, dtype=torch.long).to(x.device, non_blocking=True)
    logits = model(inputs_embeds=x, position_ids=positions, cache=batch, start=_common_start(items),
                   logits_slice=gather)[0]  # (N, V)
    return _split_logits(items, [lay.logits for lay in layouts], logits)


def _padding_fed(p: ForwardPass, length: int) -> list[int] | None:
    """How many padding columns each row of a padded pass has at the start of its window [start, start +
    length), when they can be left out of the forward: not under an attention mask (it is indexed by the
    fed columns), and never a column whose logits the pass asks for."""
    if not p.pad_offsets or p.attention_mask is not None:
        return None
    drop = [min(max(pad - p.start, 0), length) for pad in p.pad_offsets]
    return drop if any(drop) and max(drop) <= p.logits_slice[0] else None


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
    layouts = [_layout(p) for _, p in items]
    embeds = _embed_fed(model, [p for _, p in items], [_on(lay.fed, p.device) for (_, p), lay in zip(items, layouts)])
    fed = [(k, i, w) for k, lay in enumerate(layouts) for i, w in enumerate(lay.windows) if w.hi > w.lo]
    total = len(fed)
    rows, length = bucket(total), bucket(max(w.hi - w.lo for _, _, w in fed), 8)
    widest = max(max(items[k][1].kv_length or 0, items[k][1].start + w.hi) for k, _, w in fed)
    new = sum(1 for k, i, _ in fed
              if items[k][1].kv_length is None or (items[k][0], items[k][1].first_row + i) not in pool.owned)
    pool.reserve(new, max(widest, length))  # rows that need a slot this step
    device = embeds[0].device
    x = embeds[0].new_zeros((rows, length, embeds[0].shape[-1]))
    positions = torch.zeros((rows, length), dtype=torch.long, device=device)  # device to device: no read-back
    write_slot = torch.zeros((rows, length), dtype=torch.long)  # padding columns write into slot 0
    write_pos = torch.arange(length).repeat(rows, 1)
    read_slot = torch.zeros(rows, dtype=torch.long)
    spans, masks, index, scratch, written = [], [], [], [], []
    taken = [0] * len(items)  # each pass's packed embeddings used so far
    try:
        for r, (k, i, w) in enumerate(fed):
            (owner, p), n = items[k], w.hi - w.lo
            off, start = length - n, p.start + w.lo
            x[r, off:] = embeds[k][taken[k]:taken[k] + n]
            taken[k] += n
            if p.kv_length is not None:
                slot, _ = pool.slot(owner, p.first_row + i, p.kv_memory)
                key0, span = 0, max(pool.filled[slot], start + n)
                written.append((slot, span))
            else:  # keys are the fed positions alone: a slot for this step
                slot = pool.scratch()
                scratch.append(slot)
                key0, span = start, start + n
            kp = p.pad_offsets[i] if p.pad_offsets else 0
            mask, q0, k0 = _row_mask(p, i, w, p.kv_length is not None)
            if mask is not None:  # the row's own (L, K) part, its keys from key0
                mask = mask[0, :, q0:q0 + n, k0:k0 + span - key0]
            masks.append((r, off, max(0, kp - start), max(key0, kp), key0, span, mask))
            spans.append(span)
            write_slot[r, off:] = slot
            write_pos[r, off:] = torch.arange(start, start + n)
            read_slot[r] = slot
            positions[r, off:] = (p.position_ids[i, w.lo:w.hi] if p.position_ids is not None
                                  else torch.arange(start, start + n, device=device))
            index.extend(range(r * length + off + w.logits_lo - w.lo, r * length + off + w.logits_hi - w.lo))
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
    return _split_logits(items, [lay.logits for lay in layouts], logits)
