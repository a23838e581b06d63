"""The step engine: a set of live jobs, one forward pass per step over the rows that can share it.

A decoder writes its decoding as a *program*: a generator that yields a `ForwardPass` (the inputs of one
forward over its rows), receives that pass's logits, updates its own state, and finally returns its
`GenerationResult`. The engine owns the loop: each step it collects the pending pass of every live job,
runs all *shareable* passes (one row, no cache, full bidirectional attention) as one batched forward —
rows of any length, at any block, of any decoder — and every other pass on its own, then hands each
program its logits. Jobs join at any step and leave when their program returns or is cancelled; their
rows are refilled from the queue at once.

Why this keeps tokens exact: a shared forward left-pads the rows' input embeddings into one batch, and the
runtime attends a padded row over its own keys only, so each row's logits are those of the row alone
(`runtime/attention.py`: bit for bit on its per-row path, the CPU default; up to float rounding with its
one masked call per layer, the GPU default); each program then updates from its own logits with its own
random generator.

`drive(model, program)` runs one program alone: what `decoder.generate` does for library callers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from evotok_cli.decoding.api import GenerationResult

Program = Generator["ForwardPass", torch.Tensor, GenerationResult]


@dataclass
class ForwardPass:
    """One forward a program asks for, over its B rows and the fed canvas window [start, start + L)."""

    inputs: dict[str, Any]  # input_ids=(B, L) or soft_inputs=((B, L, K) ids, (B, L, K) weights)
    position_ids: torch.Tensor | None  # (B, L); None: start + arange(L)
    logits_slice: tuple[int, int]  # fed positions whose logits the program needs
    pad_offsets: list[int] | None = None
    cache: Any = None
    start: int = 0
    attention_mask: torch.Tensor | None = None
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. classifier-free guidance's mix

    @property
    def rows(self) -> int:
        ids = self.inputs.get("input_ids")
        return (ids if ids is not None else self.inputs["soft_inputs"][0]).shape[0]

    @property
    def shareable(self) -> bool:
        """A pass that only needs its own inputs: it can join other rows in one batched forward."""
        return (self.rows == 1 and self.cache is None and self.attention_mask is None and self.start == 0
                and self.combine is None and not self.pad_offsets and self.position_ids is not None)


def run_pass(model: Any, p: ForwardPass) -> torch.Tensor:
    logits = model(**p.inputs, position_ids=p.position_ids, pad_offsets=p.pad_offsets, cache=p.cache,
                   start=p.start, attention_mask=p.attention_mask, logits_slice=p.logits_slice)
    return p.combine(logits) if p.combine is not None else logits


def _embed(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    if "soft_inputs" in inputs:
        return model.embed_soft(*inputs["soft_inputs"])
    return model.embed(inputs["input_ids"])


def run_shared(model: Any, passes: list[ForwardPass]) -> list[torch.Tensor]:
    """One batched forward for single-row passes of any lengths; each gets exactly its own logits."""
    if len(passes) == 1:
        return [run_pass(model, passes[0])]
    embeds = [_embed(model, p.inputs) for p in passes]  # (1, L_r, D) each
    length = max(e.shape[1] for e in embeds)
    x = embeds[0].new_zeros((len(passes), length, embeds[0].shape[-1]))  # (B, L, D); pads are never read
    positions = torch.zeros((len(passes), length), dtype=torch.long, device=x.device)  # (B, L)
    offsets = []
    for r, (e, p) in enumerate(zip(embeds, passes)):
        off = length - e.shape[1]  # left padding: every row ends at the last column
        x[r, off:] = e[0]
        positions[r, off:] = p.position_ids[0]
        offsets.append(off)
    a = min(off + p.logits_slice[0] for off, p in zip(offsets, passes))
    b = max(off + p.logits_slice[1] for off, p in zip(offsets, passes))
    logits = model(inputs_embeds=x, position_ids=positions, pad_offsets=offsets if any(offsets) else None,
                   logits_slice=(a, b))  # (B, b - a, V)
    return [logits[r:r + 1, off + p.logits_slice[0] - a:off + p.logits_slice[1] - a]
            for r, (off, p) in enumerate(zip(offsets, passes))]


def drive(model: Any, program: Program) -> GenerationResult:
    """Run one program to its end, alone."""
    try:
        p = next(program)
        while True:
            p = program.send(run_pass(model, p))
    except StopIteration as done:
        return done.value


@dataclass
class Job:
    """A program and whoever waits for it. `rows` counts against the engine's capacity."""

    program: Program | None
    rows: int
    on_done: Callable[[Job], None] | None = None
    closed: Callable[[], GenerationResult] | None = None  # a decoder without a program: run it whole
    id: int = field(default_factory=lambda: next(_ids))
    pending: ForwardPass | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    admitted: float | None = None  # perf_counter when it joined the live set, and when it left
    finished: float | None = None

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

    def __init__(self, model: Any, max_rows: int = 8):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.model, self.max_rows = model, max_rows
        self.queue: deque[Job] = deque()
        self.live: list[Job] = []
        self.lock = threading.Lock()
        self.steps = 0  # engine steps run
        self.passes = 0  # forward passes run (a shared forward counts once)

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.lock:
            self.queue.append(job)
        return job

    @property
    def live_rows(self) -> int:
        return sum(j.rows for j in self.live)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def idle(self) -> bool:
        return not self.live and not self.queue

    def _admit(self) -> None:
        with self.lock:
            while self.queue and (not self.live or self.live_rows + self.queue[0].rows <= self.max_rows):
                job = self.queue.popleft()
                job.admitted = time.perf_counter()
                self.live.append(job)

    def _finish(self, job: Job, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        job.result, job.error, job.pending, job.finished = result, error, None, time.perf_counter()
        if job in self.live:
            self.live.remove(job)
        if job.program is not None:
            job.program.close()
        job.done.set()
        if job.on_done is not None:
            job.on_done(job)

    def _advance(self, job: Job, logits: torch.Tensor | None) -> None:
        """Send a job its logits (None to start it) and keep its next pass, or finish it."""
        try:
            job.pending = next(job.program) if logits is None else job.program.send(logits)
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
        ready = [j for j in self.live if j.pending is not None]
        if not ready:
            return True
        shared = [j for j in ready if j.pending.shareable]
        alone = [j for j in ready if not j.pending.shareable]
        results: list[tuple[Job, torch.Tensor | None, BaseException | None]] = []
        if shared:
            try:
                logits = run_shared(self.model, [j.pending for j in shared])
                results += [(j, lg, None) for j, lg in zip(shared, logits)]
            except Exception as exc:
                results += [(j, None, exc) for j in shared]
            self.passes += 1
        for j in alone:
            try:
                results.append((j, run_pass(self.model, j.pending), None))
            except Exception as exc:
                results.append((j, None, exc))
            self.passes += 1
        for job, logits, error in results:
            if error is not None:
                self._finish(job, error=error)
            else:
                self._advance(job, logits)
        self.steps += 1
        return True

    def run(self, jobs: list[Job] | None = None, on_step: Callable[[Engine], None] | None = None) -> None:
        """Step until `jobs` (default: everything submitted) are done."""
        def finished() -> bool:
            return self.idle() if jobs is None else all(j.done.is_set() for j in jobs)

        while not finished():
            if not self.step():
                break
            if on_step is not None:
                on_step(self)


def make_jobs(model: Any, decoder: Any, request: Any, *, cohort: int) -> list[tuple[int, Job]]:
    """The jobs that decode `request`'s rows, each with the index of its first row.

    A decoder whose `sequential(request)` is true (rng=reference) gets one job that decodes the rows in
    turn. A decoder with `program` and `split(request)` true gets one job per row (those rows share forwards
    with anything); with `split` false, cohorts of up to `cohort` consecutive rows (a KV cache is one
    batch-shaped memory). A decoder with only `generate` (an older third-party plugin) gets closed jobs
    of up to `cohort` rows, each decoded whole when its turn comes.
    """
    from dataclasses import replace

    from evotok_cli.decoding.api import row_seed

    n = len(request.prompts)
    seeds = [row_seed(request, i) for i in range(n)]
    if hasattr(decoder, "program") and getattr(decoder, "sequential", lambda r: False)(request):
        return [(0, Job(decoder.program(model, request), rows=1))]  # one row at a time, one stream
    per_row = hasattr(decoder, "program") and getattr(decoder, "split", lambda r: False)(request)
    size = 1 if per_row else cohort
    jobs = []
    for first in range(0, n, size):
        part = replace(request, prompts=request.prompts[first:first + size], seeds=seeds[first:first + size],
                       seed=None, on_event=shifted_listener(request.on_event, first))
        if hasattr(decoder, "program"):
            job = Job(decoder.program(model, part), rows=len(part.prompts))
        else:
            job = Job(None, rows=len(part.prompts), closed=lambda p=part: decoder.generate(model, p))
        jobs.append((first, job))
    return jobs


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
