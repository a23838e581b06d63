"""What a decoder's program yields to the step engine, and what the engine runs for it: a `ForwardPass`
(the inputs of one forward over the program's rows), a `HostRead` (tensors it needs on the host) and an
`Update` (its decoder update, run for a group of rows as one call: `run_updates`). Kept apart from the
loop so that a plugin's program depends on these types alone (see decoding/engine.py for the whole story)."""
from __future__ import annotations

from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationResult

Program = Generator["ForwardPass | HostRead", Any, GenerationResult]


class RowWindow(NamedTuple):
    """One row's part of a pass whose rows feed windows of their own (`ForwardPass.windows`): the fed
    columns [lo, hi) and the columns [logits_lo, logits_hi) whose logits it needs, both counted from the
    pass's `start`. lo == hi: the row sits this pass out."""

    lo: int
    hi: int
    logits_lo: int
    logits_hi: int


@dataclass
class ForwardPass:
    """One forward a program asks for, over its B rows and the fed canvas window [start, start + L).

    kv_length: the program wants a KV cache: each of its rows gets an engine slot of this many positions
    (its canvas length), the fed window's keys and values are written there and attention sees every
    position written so far. None: attention sees the fed positions only. `kv_memory` names the canvas
    the slots hold: a program that decodes several canvases in turn (d2f's rows) starts each on fresh
    slots by naming a new one. `cache` (a cache object the program holds) is the older interface: such a
    pass runs alone.

    windows: rows that feed windows of their own (a merged program's d2f rows, each at its own place in
    its pipeline): row i feeds only columns windows[i].lo:hi of the inputs and gets the logits of
    windows[i].logits_lo:logits_hi; the pass's logits are then those of every row end to end, (1, N, V).
    `attention_mask`'s key axis then counts canvas columns from 0, which the engine cuts for each row."""

    inputs: dict[str, Any]  # input_ids=(B, L) or soft_inputs=((B, L, K) ids, (B, L, K) weights)
    position_ids: torch.Tensor | None  # (B, L); None: start + arange(L)
    logits_slice: tuple[int, int]  # fed positions whose logits the program needs
    pad_offsets: list[int] | None = None  # left padding of each row's own canvas (a padded cohort)
    cache: Any = None
    start: int = 0
    attention_mask: torch.Tensor | None = None  # bool (B or 1, 1, L, K), True = may attend
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. classifier-free guidance's mix
    kv_length: int | None = None
    kv_memory: Hashable = 0
    windows: list[RowWindow] | None = None
    first_row: int = 0  # the index of row 0 among the program's rows (its KV slot): a pass split by rows

    def __post_init__(self) -> None:
        if isinstance(self.cache, int) and not isinstance(self.cache, bool):  # an older BlockwiseDecoder.forward
            raise ConfigError(f"a decoder passed ForwardPass(cache={self.cache}), the older interface",
                              where="decoder plugin",
                              fix="BlockwiseDecoder.forward's `cache` is now the canvas length: write "
                                  "ForwardPass(kv_length=cache), see examples/third_party_decoder/README.md")
        if self.windows is not None:
            _check_windows(self.windows, self.rows, self.length)

    @property
    def rows(self) -> int:
        return self._ids.shape[0]

    @property
    def length(self) -> int:
        return self._ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self._ids.device

    @property
    def _ids(self) -> torch.Tensor:
        ids = self.inputs.get("input_ids")
        return ids if ids is not None else self.inputs["soft_inputs"][0]

    @property
    def shareable(self) -> bool:
        """Whether the pass can join other rows in the step's forward: all can, except one that holds a
        cache object of its own (the engine cannot batch memory it does not own)."""
        return self.cache is None


def _check_windows(windows: list[RowWindow], rows: int, length: int) -> None:
    """A window that reaches outside its row would hand a row another row's logits: refused at once."""
    if len(windows) != rows:
        raise ValueError(f"ForwardPass has {rows} rows but {len(windows)} windows: give one RowWindow per row")
    for i, (lo, hi, a, b) in enumerate(windows):
        if not (0 <= lo <= hi <= length and lo <= a <= b <= hi):
            raise ValueError(f"ForwardPass windows[{i}] = {windows[i]} is not 0 <= lo <= logits_lo <= logits_hi "
                             f"<= hi <= {length} (the pass's window length)")


@dataclass
class HostRead:
    """A program asks for device values on the host (`yield HostRead(tensor)` returns `tensor.tolist()`):
    the engine reads the step's requests of every live row in ONE device-to-host copy, before the step's
    forward, so the host waits for the device once per step however many rows there are."""

    tensor: torch.Tensor


@dataclass
class Update:
    """A program asks for a decoder update over its rows, to run in ONE call with the same request of every
    other live row this step (`yield Update(...)` returns the results that are its own rows).

    The engine groups the step's requests by `group` (the function, `key`, and the tensors' shapes past
    dim 0 and dtypes), stacks each positional tensor of a group along dim 0, concatenates each per-row
    list of `rows`, calls `fn(*tensors, **shared, **rows)` once, and hands each program its rows of every
    result (a tuple of tensors, split along dim 0). Why: host work per step then grows with the number of
    groups, not of rows. `fn` must treat rows independently (row i of the results depends on row i of the
    inputs only, per-row random generators included) and must not modify its inputs, so that a row's
    results are those of the same call on that row alone (what `drive` does). `key` names everything in
    `shared` that changes the outcome (its values must not matter beyond it). `into` {i: j}: result i is
    also copied into input tensor j (a view of the program's own state), by the engine, for all rows of
    the group in one call, rather than by each program."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    key: Hashable
    tensors: tuple[torch.Tensor, ...]
    rows: dict[str, list[Any]] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    into: dict[int, int] = field(default_factory=dict)

    @property
    def group(self) -> Hashable:
        return (self.fn, self.key, tuple(self.into.items()),
                tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in self.tensors))

    def run(self) -> tuple[torch.Tensor, ...]:
        """This request alone."""
        results = tuple(self.fn(*self.tensors, **self.shared, **self.rows))
        for i, j in self.into.items():
            self.tensors[j].copy_(results[i])
        return results


def run_updates(requests: list[Update]) -> list[tuple[torch.Tensor, ...]]:
    """One call for `requests` (one group: see `Update`), each request's rows of the results back."""
    if len(requests) == 1:
        return [requests[0].run()]
    first = requests[0]
    tensors = [torch.cat(parts) for parts in zip(*(r.tensors for r in requests))]
    rows = {name: [v for r in requests for v in r.rows[name]] for name in first.rows}
    sizes = [r.tensors[0].shape[0] for r in requests]
    results = [torch.split(t, sizes) for t in first.fn(*tensors, **first.shared, **rows)]
    for i, j in first.into.items():  # one call for every row's write-back, not one per row
        torch._foreach_copy_([r.tensors[j] for r in requests], list(results[i]))
    return [tuple(parts[i] for parts in results) for i in range(len(requests))]


def read_all(tensors: list[torch.Tensor]) -> list[Any]:
    """`[t.tolist() for t in tensors]` in one device-to-host copy (values as float64, which holds every
    flag, count and token id exactly), converted back to each tensor's kind of number."""
    if len(tensors) == 1:
        return [tensors[0].tolist()]
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).tolist() if tensors else []
    out, at = [], 0
    for t in tensors:
        kind = bool if t.dtype == torch.bool else float if t.is_floating_point() else int
        values = [kind(v) for v in flat[at:at + t.numel()]]
        at += t.numel()
        out.append(_shaped(values, list(t.shape)))
    return out


def _shaped(values: list[Any], shape: list[int]) -> Any:
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    step = len(values) // shape[0] if shape[0] else 0
    return [_shaped(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def split_rows(p: ForwardPass) -> tuple[ForwardPass, ForwardPass] | None:
    """The pass as two passes over its first and its last rows (each row is attended on its own, so the
    halves' logits joined by `join_rows` are the pass's), or None when it cannot be split: one row, paired
    rows (`combine`: guidance), or a cache object of its own. Why: a merged program is one job, and a step
    that runs out of memory with it alone is retried over fewer rows rather than failing all of them. With
    `windows`, the fed rows are halved: a half whose rows all sit the pass out would be a forward of no
    column (it fails), and a row that feeds nothing frees no memory."""
    if p.rows < 2 or p.combine is not None or p.cache is not None:
        return None
    fed = range(p.rows) if p.windows is None else [i for i, w in enumerate(p.windows) if w.hi > w.lo]
    if len(fed) < 2:
        return None
    h = fed[len(fed) // 2]  # both halves hold fed rows

    def part(rows: slice, first: int) -> ForwardPass:
        mask = p.attention_mask
        return replace(p, inputs={k: _rows_of(v, rows) for k, v in p.inputs.items()},
                       position_ids=None if p.position_ids is None else p.position_ids[rows],
                       pad_offsets=None if p.pad_offsets is None else p.pad_offsets[rows],
                       attention_mask=mask if mask is None or mask.shape[0] == 1 else mask[rows],
                       windows=None if p.windows is None else p.windows[rows], first_row=p.first_row + first)
    return part(slice(0, h), 0), part(slice(h, None), h)


def join_rows(p: ForwardPass, halves: list[torch.Tensor]) -> torch.Tensor:
    """The logits of `split_rows`'s two passes as the whole pass's: rows (dim 0), or with `windows` every
    row's logits end to end (dim 1)."""
    return torch.cat(halves, dim=1 if p.windows is not None else 0)


def _rows_of(value: Any, rows: slice) -> Any:
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows) for v in value)
    return value[rows] if isinstance(value, torch.Tensor) else value


def kept_copies(passes: list[ForwardPass]) -> list[ForwardPass]:
    """The passes with their inputs copied (what the engine keeps to rebuild a preempted job's KV slots: a
    program may reuse its tensors in place)."""
    return [replace(p, inputs={k: _copied(v) for k, v in p.inputs.items()}, position_ids=_copied(p.position_ids),
                    attention_mask=_copied(p.attention_mask), combine=None) for p in passes]


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    return value
