"""Key/value memory: one cache per generation (gpt-fast style), and the engine's pool of per-row slots.

A cache is the K/V memory of a whole canvas (prompt + generated positions). A forward over the canvas
slice [start, start + L) writes that slice's keys and values (after RoPE, i.e. at absolute positions) and
attends to every position written so far. That one rule covers all cache policies:
- prefix cache (Fast-dLLM): a full forward at each block start, then feed [block_start, end);
- dual cache (Fast-dLLM): a full forward at each block start, then feed only the current block, which
  overwrites its own K/V in place while the prefix and suffix stay as they were;
- D2F: feed from the first block not cached yet; finished blocks are exact because attention is
  block-causal.

The step engine owns the memory (`KVPool`): a program does not hold a cache, it asks for "my rows, this
window" (`ForwardPass.kv_length`) and the engine hands each row a slot of its own, a batch-1 `KVCache`
of the row's canvas length, kept until the program ends. Rows of different programs, windows and cache
states then share one forward (`RowBatch`): their activations are packed end to end, and each row's
attention reads and writes its own slot, so a row computes exactly what it computes alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch


class KVCache:
    rows = slice(None)  # the batch rows this cache writes and reads (`row`: one row of a batched cache)

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, length, head_dim)  # (B, Hkv, Lmax, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = length
        self.filled = 0  # positions [0, filled) hold keys/values written by some forward

    def row(self, r: int) -> KVCache:
        """Row r as a batch-1 cache of its own (its own `filled`) over this cache's memory: the rows of a
        merged program (several requests' rows as one program) get their slots in ONE allocation per layer
        instead of one per row."""
        view = copy.copy(self)
        view.rows, view.filled = slice(r, r + 1), 0
        return view

    @property
    def nbytes(self) -> int:
        return sum(t[self.rows].numel() * t.element_size() for t in (*self.k, *self.v))

    def span_after(self, start: int, length: int) -> int:
        """How many key positions a forward over [start, start + length) attends to."""
        return max(self.filled, start + length)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked to write up to {end}")
        self.k[layer][self.rows, :, start:end] = k
        self.v[layer][self.rows, :, start:end] = v
        span = self.span_after(start, k.shape[2])
        if layer == len(self.k) - 1:
            self.filled = span
        return self.k[layer][self.rows, :, :span], self.v[layer][self.rows, :, :span]


class KVPool:
    """The engine's K/V memory: one batch-1 `KVCache` per row of an owner (a job), made on the row's first
    cached pass and dropped when the owner leaves, or when it names a new memory (`memory`: a program that
    decodes several canvases in turn, like d2f's, starts each on fresh slots). `tokens` counts the
    positions held."""

    def __init__(self, new_cache: Callable[[int, int], KVCache]):
        self.new_cache = new_cache
        self.slots: dict[tuple[Hashable, int], KVCache] = {}
        self.memory: dict[Hashable, Hashable] = {}  # owner -> the memory its slots hold

    def slot(self, owner: Hashable, row: int, length: int, memory: Hashable = 0, rows: int = 1) -> KVCache:
        """Row `row`'s slot of `owner`'s canvas (`rows`: how many rows the owner has; a new owner of several
        gets all of them in one allocation)."""
        if self.memory.get(owner, memory) != memory:
            self.free(owner)
        self.memory[owner] = memory
        key = (owner, row)
        cache = self.slots.get(key)
        if cache is None or cache.capacity != length:
            if rows > 1 and not any((owner, r) in self.slots for r in range(rows)):
                batched = self.new_cache(rows, length)
                self.slots.update({(owner, r): batched.row(r) for r in range(rows)})
                return self.slots[key]
            cache = self.slots[key] = self.new_cache(1, length)
        return cache

    def free(self, owner: Hashable) -> None:
        for key in [k for k in self.slots if k[0] == owner]:
            del self.slots[key]
        self.memory.pop(owner, None)

    @property
    def tokens(self) -> int:
        return sum(c.capacity for c in self.slots.values())


@dataclass
class RowBatch:
    """The rows of one exact shared forward over a `KVPool`, passed to the model as its `cache`. The rows
    are packed end to end in ONE batch row (no padding: the linear layers, most of a step's work, run over
    real positions only, not every row padded to the longest): row r's fed positions are packed columns
    spans[r] = [begin, end), canvas columns [starts[r], ...) of its own canvas, whose first key_pads[r]
    columns are padding (a padded cohort's canvas), and attend through `slots[r]` (a batch-1 cache: write
    the window, attend to everything written) or, without one, over the fed keys alone; `masks[r]`
    restricts them (d2f's block-causal mask): its (L_r, K_r) part from `mask_at[r]` (query row, key column;
    default (0, 0)), so that rows cut from one shared mask need no tensor of their own. Each row is attended
    on its own (`attention.attend_rows`): bit for bit the row alone."""

    spans: list[tuple[int, int]]
    starts: list[int]
    slots: list[KVCache | None]
    masks: list[torch.Tensor | None]
    key_pads: list[int]
    mask_at: list[tuple[int, int]] | None = None


def bucket(n: int, floor: int = 2) -> int:
    """`n` rounded up to a power of two (at least `floor`): the batch, window and key sizes of a compiled
    forward come from a few buckets, so a mixed load meets graphs it has already built."""
    size = floor
    while size < n:
        size *= 2
    return size


class SlotPool:
    """The engine's K/V memory as ONE tensor per layer, (slots, Hkv, columns, D): slot 0 is scratch (where
    padding columns write), every other slot holds one row's canvas. A forward writes and reads it through
    index tensors (`PagedRows`), so it has no Python state per row: a compiled forward (and the one
    masked attention call per layer of a GPU) sees the same graph whatever the rows are. Rows without a
    cache take a slot for the step only. The pool grows when rows or canvases outgrow it."""

    def __init__(self, new_cache: Callable[[int, int], KVCache]):
        probe = new_cache(1, 1)
        self.layers, (_, self.heads, _, self.dim) = len(probe.k), probe.k[0].shape
        self.dtype, self.device = probe.k[0].dtype, probe.k[0].device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity, self.columns = 0, 0
        self.owned: dict[tuple[Hashable, int], int] = {}  # (owner, row) -> slot
        self.memory: dict[Hashable, Hashable] = {}
        self.filled: dict[int, int] = {}  # slot -> positions written
        self.free_slots: list[int] = []

    def reserve(self, slots: int, columns: int) -> None:
        """Room for `slots` more rows and canvases of `columns` positions."""
        need = len(self.owned) + slots + 1
        if need <= self.capacity and columns <= self.columns:
            return
        # rounded up (slots to 8, positions to 64), not doubled: the pool is most of a GPU's free memory
        capacity, width = max(-(-need // 8) * 8, self.capacity), max(-(-columns // 64) * 64, self.columns)
        shape = (capacity, self.heads, width, self.dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for old, new in ((self.k, k), (self.v, v)):
            for a, b in zip(old, new):
                b[:a.shape[0], :, :a.shape[2]] = a
        self.free_slots = sorted(set(self.free_slots) | set(range(max(1, self.capacity), capacity)), reverse=True)
        self.k, self.v, self.capacity, self.columns = k, v, capacity, width

    def slot(self, owner: Hashable, row: int, memory: Hashable = 0) -> tuple[int, bool]:
        """The row's slot, and whether it is new (nothing written yet)."""
        if self.memory.get(owner, memory) != memory:
            self.free(owner)
        self.memory[owner] = memory
        key = (owner, row)
        if key in self.owned:
            return self.owned[key], False
        self.owned[key] = slot = self.free_slots.pop()
        self.filled[slot] = 0
        return slot, True

    def scratch(self) -> int:
        slot = self.free_slots.pop()
        self.filled[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.filled.pop(slot, None)
        self.free_slots.append(slot)

    def free(self, owner: Hashable) -> None:
        for key in [k for k in self.owned if k[0] == owner]:
            self.release(self.owned.pop(key))
        self.memory.pop(owner, None)

    @property
    def tokens(self) -> int:
        return sum(self.filled.get(s, 0) for s in self.owned.values())


@dataclass
class PagedRows:
    """The rows of one shared forward over a `SlotPool`, as tensors only (no Python value per row, so a
    compiled forward never recompiles for a new mix of rows): fed column j of batch row r writes its K/V
    at (write_slot[r, j], write_pos[r, j]) of every layer's pool tensor, then row r attends over its slot
    `read_slot[r]`'s first `mask.shape[-1]` positions where `mask` (R, 1, L, K) allows."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    write_slot: torch.Tensor  # (R, L) long
    write_pos: torch.Tensor  # (R, L) long
    read_slot: torch.Tensor  # (R,) long
    mask: torch.Tensor  # (R, 1, L, K) bool
