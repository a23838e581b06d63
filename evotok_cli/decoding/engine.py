"""The step engine: a set of live jobs, one forward per step over every row that needs one.

A decoder writes its decoding as a *program*: a generator that yields a `ForwardPass` (the inputs of one
forward over its rows), receives that pass's logits, updates its own state, and finally returns its
`GenerationResult`. The engine owns the loop and the K/V memory: each step it collects the pending pass
of every live job and runs them all as ONE batched forward, whatever their decoder, options, prompt
length, block, window or cache state (uncached, prefix- and dual-cached windows, d2f's block-causal
pipeline, guidance's paired rows), then hands each program its logits. A program that wants a KV cache
does not hold one: its pass says `kv_length` (its canvas length) and `start` (where the fed window sits),
and the engine gives each of its rows a slot of the pool (`runtime/cache.py: KVPool`), writes the
window's keys and values there and attends over everything written so far (refresh what is fed, reuse
the rest). Jobs join at any step and leave when their program returns or is cancelled; their rows and
slots are refilled from the queue at once.

Why this keeps tokens exact: the shared forward packs the rows' input embeddings end to end into one batch row, and
the runtime attends each row over its own keys (its slot, or its fed positions) with its own mask. Two
pools (`make_pool`, chosen once per engine): per-row caches attended one row at a time (`RowBatch`,
`attention.attend_rows`: bit for bit the row alone; the CPU default, `--padded-attention rowwise`), or
one pool tensor per layer written and read through index tensors with one masked call per layer
(`PagedRows`, `attention.attend_paged`: the row alone up to float rounding; the GPU default and any
compiled forward, whose graphs then never depend on the mix of rows: sizes come in buckets). The LM head
runs only at the positions each row asks for (a per-row gather). Each program then updates from its own
logits with its own random generator: every row is a program of its own (`make_jobs`), so every row has
its own stream. The built-in decoders ask for that update as an `Update`: the engine runs the step's
requests of every group of rows that share a decoder, options and window shape as ONE call on stacked
tensors (the function the row alone runs; per-row generators and counts as lists), and writes each row's
results back in one call, so that the decoders' host work per step grows with the groups, not the rows.

Host work per step: the engine makes at most one device-to-host copy per step, for every row that asked
(`HostRead`: threshold liveness, d2f's block progress and EOS, finished rows' tokens). Capacity: rows
(`max_rows`) and, when given, canvas positions in flight (`max_tokens`, `default_tokens_in_flight`); a
step that runs out of memory is retried split in two before any row fails.

A pass that still carries a cache object of its own (`cache=`, the interface before the pool) runs alone,
as before; `drive(model, program)` runs one program alone: what `decoder.generate` does for library
callers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from evotok_cli.decoding.api import GenerationResult
from evotok_cli.errors import ConfigError
from evotok_cli.runtime.attention import resolved_mode
from evotok_cli.runtime.cache import KVPool, PagedRows, RowBatch, SlotPool, bucket

Program = Generator["ForwardPass | HostRead", Any, GenerationResult]


@dataclass
class ForwardPass:
    """One forward a program asks for, over its B rows and the fed canvas window [start, start + L).

    kv_length: the program wants a KV cache: each of its rows gets an engine slot of this many positions
    (its canvas length), the fed window's keys and values are written there and attention sees every
    position written so far. None: attention sees the fed positions only. `kv_memory` names the canvas
    the slots hold: a program that decodes several canvases in turn (d2f's rows) starts each on fresh
    slots by naming a new one. `cache` (a cache object the program holds) is the older interface: such a
    pass runs alone."""

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

    def __post_init__(self) -> None:
        if isinstance(self.cache, int) and not isinstance(self.cache, bool):  # an older BlockwiseDecoder.forward
            raise ConfigError(f"a decoder passed ForwardPass(cache={self.cache}), the older interface",
                              where="decoder plugin",
                              fix="BlockwiseDecoder.forward's `cache` is now the canvas length: write "
                                  "ForwardPass(kv_length=cache), see examples/third_party_decoder/README.md")

    @property
    def rows(self) -> int:
        ids = self.inputs.get("input_ids")
        return (ids if ids is not None else self.inputs["soft_inputs"][0]).shape[0]

    @property
    def length(self) -> int:
        ids = self.inputs.get("input_ids")
        return (ids if ids is not None else self.inputs["soft_inputs"][0]).shape[1]

    @property
    def shareable(self) -> bool:
        """Whether the pass can join other rows in the step's forward: all can, except one that holds a
        cache object of its own (the engine cannot batch memory it does not own)."""
        return self.cache is None


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
    # packed end to end in one batch row, not left-padded to the longest: padding would cost every linear
    # layer its share of padding columns (guidance's full-canvas pairs of mixed lengths: 1.4x the work)
    x = torch.cat([e.reshape(-1, e.shape[-1]) for e in embeds])[None]  # (1, N, D)
    positions = torch.cat([(p.position_ids if p.position_ids is not None else
                            torch.arange(p.start, p.start + e.shape[1], device=x.device).expand(e.shape[0], -1))
                           .reshape(-1) for (_, p), e in zip(items, embeds)])[None]  # (1, N)
    spans, starts, slots, masks, key_pads, index, counts = [], [], [], [], [], [], []
    at = 0
    for (owner, p), e in zip(items, embeds):
        rows, fed = e.shape[0], e.shape[1]
        a, b = p.logits_slice
        for i in range(rows):
            spans.append((at, at + fed))
            starts.append(p.start)
            slots.append(None if p.kv_length is None else pool.slot(owner, i, p.kv_length, p.kv_memory))
            mask = p.attention_mask
            masks.append(None if mask is None else mask[i if mask.shape[0] > 1 else 0][None])
            key_pads.append(p.pad_offsets[i] if p.pad_offsets else 0)
            index.extend(range(at + a, at + b))
            at += fed
        counts.append((rows, b - a))
    batch = RowBatch(spans, starts, slots, masks, key_pads)
    gather = torch.tensor(index, dtype=torch.long).to(x.device, non_blocking=True)
    logits = model(inputs_embeds=x, position_ids=positions, cache=batch, start=_common_start(items),
                   logits_slice=gather)[0]  # (N, V)
    out, at = [], 0
    for (_, p), (rows, n) in zip(items, counts):
        part = logits[at:at + rows * n].view(rows, n, -1)
        at += rows * n
        out.append(p.combine(part) if p.combine is not None else part)
    return out


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
        width = min(bucket(max(spans), 16), pool.columns)
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
        gather = torch.tensor(index + [0] * (bucket(len(index), 8) - len(index)), dtype=torch.long)
        batch = PagedRows(pool.k, pool.v, write_slot.to(device), write_pos.to(device), read_slot.to(device), allowed)
        logits = model(inputs_embeds=x, position_ids=positions, cache=batch, start=_common_start(items),
                       logits_slice=gather.to(device))[0]  # (N, V)
    finally:
        for slot in scratch:
            pool.release(slot)
    for slot, span in written:
        pool.filled[slot] = span
    out, at = [], 0
    for (_, p), (n_rows, n) in zip(items, counts):
        part = logits[at:at + n_rows * n].view(n_rows, n, -1)
        at += n_rows * n
        out.append(p.combine(part) if p.combine is not None else part)
    return out


def drive(model: Any, program: Program) -> GenerationResult:
    """Run one program to its end, alone (its KV slots in a pool of its own)."""
    pool, owner = make_pool(model), object()
    try:
        p = next(program)
        while True:
            if isinstance(p, HostRead):
                p = program.send(p.tensor.tolist())
            elif isinstance(p, Update):
                p = program.send(p.run())
            else:
                p = program.send(run_rows(model, [(owner, p)], pool)[0] if p.cache is None else run_pass(model, p))
    except StopIteration as done:
        return done.value


@dataclass(eq=False)  # a job is itself: `job in live` compares identities, not every field (O(rows) per test)
class Job:
    """A program and whoever waits for it. `rows` and `tokens` (the canvas positions its rows hold: prompt
    + generated, the K/V and activations it needs) count against the engine's capacity."""

    program: Program | None
    rows: int
    tokens: int = 0
    on_done: Callable[[Job], None] | None = None
    closed: Callable[[], GenerationResult] | None = None  # a decoder without a program: run it whole
    id: int = field(default_factory=lambda: next(_ids))
    pending: ForwardPass | HostRead | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    admitted: float | None = None  # perf_counter when it joined the live set, and when it left
    finished: float | None = None
    log: list[ForwardPass] = field(default_factory=list)  # its cached passes since its slots were last fed whole
    replay: list[ForwardPass] = field(default_factory=list)  # preempted: passes to run again before `pending`
    preempted: bool = False  # waits in the queue without its KV slots

    @property
    def seconds(self) -> float:
        """Time from joining the running batch to leaving it (0 for a job that never ran)."""
        return 0.0 if self.admitted is None or self.finished is None else self.finished - self.admitted

    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step (thread-safe: a flag the loop reads)."""
        self.cancelled = True


_ids = itertools.count()


class Engine:
    """Live jobs and a queue. `step()` advances every live job by one pass; single-threaded by design:
    one thread calls `step`, any thread may `submit` and `cancel`."""

    def __init__(self, model: Any, max_rows: int = 8, max_tokens: int | None = None):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.model, self.max_rows, self.max_tokens = model, max_rows, max_tokens
        self.queue: deque[Job] = deque()
        self.live: list[Job] = []
        self.lock = threading.Lock()
        self.pool = make_pool(model)  # the live rows' K/V slots
        self.steps = 0  # engine steps run
        self.passes = 0  # forwards run (the step's shared forward counts once)
        self.retries = 0  # steps split in two after running out of memory
        self.preemptions = 0  # jobs whose KV slots were dropped and requeued, to be recomputed (`_preempt`)

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.lock:
            self.queue.append(job)
        return job

    @property
    def live_rows(self) -> int:
        return sum(j.rows for j in self.live)

    @property
    def live_tokens(self) -> int:
        return sum(j.tokens for j in self.live)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def idle(self) -> bool:
        return not self.live and not self.queue

    def _admit(self) -> None:
        with self.lock:
            while self.queue and (not self.live or self._fits(self.queue[0])):
                job = self.queue.popleft()
                job.admitted = job.admitted or time.perf_counter()  # a preempted job keeps its first admission
                if job.preempted:  # its slots are rebuilt first, from every cached pass it ran (`_preempt`)
                    job.replay, job.preempted = list(job.log), False
                self.live.append(job)

    def _fits(self, job: Job) -> bool:
        """Room for `job` beside the live ones: rows, and tokens in flight when there is a budget (a job
        alone is always admitted: it could never run otherwise)."""
        if self.live_rows + job.rows > self.max_rows:
            return False
        return self.max_tokens is None or self.live_tokens + job.tokens <= self.max_tokens

    def _finish(self, job: Job, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        job.result, job.error, job.pending, job.finished = result, error, None, time.perf_counter()
        job.log, job.replay = [], []
        if job in self.live:
            self.live.remove(job)
        with self.lock:
            if job in self.queue:  # preempted in the step that finished it
                self.queue.remove(job)
        if job.program is not None:
            job.program.close()
        self.pool.free(job.id)
        job.done.set()
        if job.on_done is not None:
            job.on_done(job)

    def _advance(self, job: Job, value: Any) -> None:
        """Send a job its logits or host values (None to start it) and keep its next request, or finish it."""
        try:
            job.pending = next(job.program) if value is None else job.program.send(value)
        except StopIteration as done:
            self._finish(job, result=done.value)
        except Exception as exc:  # the job fails, the engine and every other job go on
            self._finish(job, error=exc)

    # -- the loop --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One step; False when there was nothing to do."""
        for job in [j for j in self.live if j.cancelled]:
            self._finish(job)
        with self.lock:
            for job in [j for j in self.queue if j.cancelled]:
                self.queue.remove(job)
                job.done.set()
                if job.on_done is not None:
                    job.on_done(job)
        self._read()  # before admission: a row that finishes on its read leaves room in this very step
        self._preempt_to_budget()
        self._admit()
        if not self.live:
            return False
        for job in list(self.live):
            if job.closed is not None:  # no program: decode it whole now
                try:
                    self._finish(job, result=job.closed())
                except Exception as exc:
                    self._finish(job, error=exc)
            elif job.pending is None:
                self._advance(job, None)
        self._update()
        ready = [j for j in self.live if isinstance(j.pending, ForwardPass)]
        if not ready:
            return True
        shared = [j for j in ready if j.pending.shareable]
        alone = [j for j in ready if not j.pending.shareable]
        results: list[tuple[Job, torch.Tensor | None, BaseException | None]] = []
        if shared:
            results += self._run_shared(shared)
        for j in alone:
            try:
                results.append((j, run_pass(self.model, j.pending), None))
            except Exception as exc:
                results.append((j, None, exc))
            self.passes += 1
        for job, logits, error in results:
            if error is not None:
                self._finish(job, error=error)
            elif logits is None:  # preempted before its pass ran: it runs when it is admitted again
                continue
            elif job.replay:  # a pass run again to rebuild its slots: its logits were had before
                job.replay.pop(0)
            else:
                self._remember(job, job.pending)
                self._advance(job, logits)
        self._update()
        self.steps += 1
        return True

    def _update(self) -> None:
        """The step's decoder updates (`Update`): one call per group of requests, not one per row. A group
        whose call fails is run request by request, so that only a row whose own update fails gets the error."""
        while True:
            groups: dict[Hashable, list[Job]] = {}
            for job in self.live:
                if isinstance(job.pending, Update):
                    groups.setdefault(job.pending.group, []).append(job)
            if not groups:
                return
            for jobs in groups.values():
                try:
                    results = run_updates([j.pending for j in jobs])
                except Exception:  # again one by one (the calls are pure): the failing rows fail alone
                    results = [self._update_alone(j) for j in jobs]
                for job, value in zip(jobs, results):
                    if value is not None:
                        self._advance(job, value)

    def _update_alone(self, job: Job) -> tuple[torch.Tensor, ...] | None:
        try:
            return job.pending.run()
        except Exception as exc:
            self._finish(job, error=exc)
            return None

    def _read(self) -> None:
        """The step's one device-to-host copy, for every live row that asked (`HostRead`)."""
        reading = [j for j in self.live if isinstance(j.pending, HostRead)]
        if not reading:
            return
        try:
            values = read_all([j.pending.tensor for j in reading])
        except Exception as exc:
            for j in reading:
                self._finish(j, error=exc)
            return
        for j, value in zip(reading, values):
            self._advance(j, value)

    def _run_shared(self, jobs: list[Job]) -> list[tuple[Job, torch.Tensor | None, BaseException | None]]:
        """The step's one forward over `jobs` (a preempted job's next pass is the oldest it must run again).
        When it fails (out of memory, or one job's pass is bad), it is split in two and each half retried,
        so that only a job whose own pass fails gets the error; a job that runs out of memory alone first
        preempts other live jobs holding KV slots (`_preempt`), youngest first. Re-running a pass is
        harmless: its window's keys and values are written again, the same ones."""
        jobs = [j for j in jobs if j in self.live]  # one preempted earlier in this step waits (no logits)
        if not jobs:
            return []
        try:
            self.passes += 1
            logits = run_rows(self.model, [(j.id, j.replay[0] if j.replay else j.pending) for j in jobs], self.pool)
            return [(j, lg, None) for j, lg in zip(jobs, logits)]
        except Exception as exc:
            if not _out_of_memory(exc):
                if len(jobs) == 1:
                    return [(jobs[0], None, exc)]
            else:
                self.retries += 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(jobs) == 1:
                    victims = [j for j in self.live if j is not jobs[0] and j.log]
                    if not victims:
                        return [(jobs[0], None, exc)]
                    self._preempt(victims[-1])  # the youngest: it has done the least work
                    self.max_tokens = max(1, self.live_tokens)  # what did fit: admit no more than that
                    return self._run_shared(jobs)
            half = len(jobs) // 2
            return self._run_shared(jobs[:half]) + self._run_shared(jobs[half:])

    # -- preemption by recompute -----------------------------------------------------------------
    def _remember(self, job: Job, p: ForwardPass) -> None:
        """Keep a cached pass that ran (its inputs copied: a program may reuse its tensors in place), so that
        the job's slots can be rebuilt. A pass that feeds the whole canvas writes every slot position from
        its own inputs alone: the passes before it (or before a new `kv_memory`) are no longer needed."""
        if p.kv_length is None or p.cache is not None:
            return
        if job.log and job.log[-1].kv_memory != p.kv_memory:
            job.log = []
        kept = replace(p, inputs={k: _copied(v) for k, v in p.inputs.items()}, position_ids=_copied(p.position_ids),
                       attention_mask=_copied(p.attention_mask), combine=None)
        job.log = [kept] if p.start == 0 and p.length >= p.kv_length else [*job.log, kept]

    def _preempt(self, job: Job) -> None:
        """Drop a live job's KV slots and put it back at the front of the queue. Diffusion rows are
        recomputed from their inputs: when it is admitted again, the cached passes it ran since its slots
        were last fed whole run again first (one per step, sharing the step's forward, their logits
        dropped), which writes exactly the keys and values it had; then its pending pass runs as if
        nothing happened. Its tokens and NFE are those of an uninterrupted run; it costs those passes."""
        self.pool.free(job.id)
        job.replay, job.preempted = [], True
        if job in self.live:
            self.live.remove(job)
        with self.lock:
            self.queue.appendleft(job)
        self.preemptions += 1

    def _preempt_to_budget(self) -> None:
        """When the live jobs hold more tokens than the budget (it was lowered: by hand, or after running
        out of memory), preempt the youngest until they fit; one job always keeps running."""
        while self.max_tokens is not None and len(self.live) > 1 and self.live_tokens > self.max_tokens:
            self._preempt(self.live[-1])

    def run(self, jobs: list[Job] | None = None, on_step: Callable[[Engine], None] | None = None) -> None:
        """Step until `jobs` (default: everything submitted) are done."""
        def finished() -> bool:
            return self.idle() if jobs is None else all(j.done.is_set() for j in jobs)

        while not finished():
            if not self.step():
                break
            if on_step is not None:
                on_step(self)


CPU_TOKENS_IN_FLIGHT = 1 << 16  # canvas positions in flight on a CPU: RAM is rarely what limits it


def default_tokens_in_flight(model: Any, fraction: float = 0.8) -> int:
    """The token budget when none is given: a fixed number on the CPU; on CUDA what `fraction` of the free
    device memory holds at the bytes a canvas position costs (its K and V in every layer, twice: the
    pool, and the activations and logits of the step's forward around it)."""
    device = getattr(model, "device", torch.device("cpu"))
    if device.type != "cuda":
        return CPU_TOKENS_IN_FLIGHT
    free, _ = torch.cuda.mem_get_info(device)
    per_token = 2 * model.new_cache(1, 1).nbytes
    return max(1, int(free * fraction) // per_token)


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    return value


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def make_jobs(model: Any, decoder: Any, request: Any, *, cohort: int) -> list[tuple[int, Job]]:
    """The jobs that decode `request`'s rows, each with the index of its first row.

    A decoder whose `sequential(request)` is true (rng=reference) gets one job that decodes the rows in
    turn. A decoder with `program` and `split(request)` true (every built-in decoder, cached or not) gets
    one job per row: its own random stream and KV slots, sharing each step's forward with anything; with
    `split` false, cohorts of up to `cohort` consecutive rows (their passes share the forward too). A
    decoder with only `generate` (an older third-party plugin) gets closed jobs of up to `cohort` rows,
    each decoded whole when its turn comes.
    """
    from dataclasses import replace

    from evotok_cli.decoding.api import row_seed

    n = len(request.prompts)
    seeds = [row_seed(request, i) for i in range(n)]
    def tokens(prompts: list[list[int]]) -> int:  # canvas positions: what the rows' K/V and activations hold
        return sum(len(q) + request.gen_length for q in prompts)

    if hasattr(decoder, "program") and getattr(decoder, "sequential", lambda r: False)(request):
        widest = max(request.prompts, key=len, default=[])
        return [(0, Job(decoder.program(model, request), rows=1, tokens=tokens([widest])))]  # one stream
    per_row = hasattr(decoder, "program") and getattr(decoder, "split", lambda r: False)(request)
    size = 1 if per_row else cohort
    jobs = []
    for first in range(0, n, size):
        part = replace(request, prompts=request.prompts[first:first + size], seeds=seeds[first:first + size],
                       seed=None, on_event=shifted_listener(request.on_event, first),
                       on_final=shifted_listener(request.on_final, first))
        if hasattr(decoder, "program"):
            job = Job(decoder.program(model, part), rows=len(part.prompts), tokens=tokens(part.prompts))
        else:
            job = Job(None, rows=len(part.prompts), tokens=tokens(part.prompts),
                      closed=lambda p=part: decoder.generate(model, p))
        jobs.append((first, job))
    return jobs


def decode_together(model: Any, decoder: Any, request: Any) -> GenerationResult:
    """Decode all of `request`'s rows in an engine of their own, each row its own program (own random
    stream, own KV slots) sharing one forward per step: what `decoder.generate` does for a batch."""
    engine = Engine(model, max_rows=max(1, len(request.prompts)))
    t0 = time.perf_counter()
    jobs = [engine.submit(job) for _, job in make_jobs(model, decoder, request, cohort=len(request.prompts))]
    engine.run()
    for job in jobs:
        if job.error is not None:
            raise job.error
    rows = [row for job in jobs for row in job.result.rows]
    return GenerationResult(rows=rows, nfe=max((job.result.nfe for job in jobs), default=0),
                            seconds=time.perf_counter() - t0)


def shifted_listener(listener: Callable[[Any], None] | None, offset: int) -> Callable[[Any], None] | None:
    """A step-event listener that sees row indices of the whole request, not of one job."""
    if listener is None or offset == 0:
        return listener
    from dataclasses import replace

    return lambda event: listener(replace(event, row=event.row + offset))


class BackgroundEngine:
    """An engine stepping in a thread of its own, for a server: any thread submits or cancels jobs; the
    loop sleeps while there is nothing to do. Job callbacks (`on_done`, the request's `on_event`) run in
    the engine's thread: hand their data to your own thread (e.g. `loop.call_soon_threadsafe`)."""

    def __init__(self, engine: Engine, *, on_step: Callable[[Engine], None] | None = None):
        self.engine, self.on_step = engine, on_step
        self.wake = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="evotok-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.engine.submit(job)
        with self.wake:
            self.wake.notify()
        return job

    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.engine.idle() and not self.stopping:
                    self.wake.wait(timeout=0.5)
                if self.stopping and self.engine.idle():
                    return
            try:
                self.engine.step()
            except BaseException as exc:  # a bug in the loop itself: fail every job rather than hang them
                self.error = exc
                for job in [*self.engine.live, *self.engine.queue]:
                    self.engine._finish(job, error=exc)
                self.engine.queue.clear()
                return
            if self.on_step is not None:
                self.on_step(self.engine)

    def stop(self, timeout: float | None = None) -> bool:
        """Finish what is live and queued (cancel jobs first to drop them), then end the thread; True if
        it ended within `timeout`."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)
        return not self.thread.is_alive()
