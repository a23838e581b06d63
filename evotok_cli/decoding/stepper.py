"""The step engine's loop: `Job` (one program and its rows) and `Engine` (admits jobs within the row and token
budgets, merges rows admitted together into one program, runs each step's passes as one forward, the step's
updates and host reads, preempts when memory runs out). decoding/engine.py tells why."""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from evotok_cli.base import stopping
from evotok_cli.decoding import merging
from evotok_cli.decoding.api import GenerationResult
from evotok_cli.decoding.memory import MemoryHandling
from evotok_cli.decoding.merging import Mergeable
from evotok_cli.decoding.passes import ForwardPass, HostRead, Program, Update, read_all, run_updates
from evotok_cli.decoding.rows import make_pool, run_pass


@dataclass(eq=False)  # a job is itself: `job in live` compares identities, not every field (O(rows) per test)
class Job:
    """A program and whoever waits for it. `rows` and `tokens` (the canvas positions its rows hold: prompt
    + generated, the K/V and activations it needs) count against the engine's capacity."""

    program: Program | None
    rows: int
    tokens: int = 0
    on_done: Callable[[Job], None] | None = None
    run_whole: Callable[[], GenerationResult] | None = None  # a decoder without a program: its `generate`, in one go
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
    merge: Mergeable | None = None  # a one-row job that may decode in one program with others (decoding/merging.py)
    members: list[Job] = field(default_factory=list)  # a merged program's jobs, one per row, in row order
    joins: merging.MergedRows | None = None  # a merged program's rows (some programs take more while they run)
    passes: int = 0  # forwards whose logits it received

    @property
    def seconds(self) -> float:
        """Time from joining the running batch to leaving it (0 for a job that never ran)."""
        return 0.0 if self.admitted is None or self.finished is None else self.finished - self.admitted

    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step (thread-safe: a flag the loop reads)."""
        self.cancelled = True


_ids = itertools.count()


class Engine(MemoryHandling):
    """Live jobs and a queue. `step()` advances every live job by one pass; single-threaded by design:
    one thread calls `step`, any thread may `submit` and `cancel`."""

    def __init__(self, model: Any, max_rows: int = 8, max_tokens: int | None = None, *, merge_rows: bool = True):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.model, self.max_rows, self.max_tokens = model, max_rows, max_tokens
        self.merge_rows = merge_rows  # rows admitted together decode as one program (decoding/merging.py)
        self.queue: deque[Job] = deque()
        self.live: list[Job] = []
        self.lock = threading.Lock()
        self.pool = make_pool(model)  # the live rows' K/V slots
        self.steps = 0  # engine steps run
        self.passes = 0  # forwards run (the step's shared forward counts once)
        self.retries = 0  # steps split in two after running out of memory
        self.preemptions = 0  # jobs whose KV slots were dropped and requeued, to be recomputed (`_preempt`)
        self.merged_rows = 0  # one-row jobs that decoded as rows of a merged program (`_merge`)

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
        admitted = []
        with self.lock:
            rows, tokens = self.live_rows, self.live_tokens  # summed once, then kept: not once per queued job
            while self.queue and (not self.live or self._fits(self.queue[0], rows, tokens)):
                job = self.queue.popleft()
                rows, tokens = rows + job.rows, tokens + job.tokens
                job.admitted = job.admitted or time.perf_counter()  # a preempted job keeps its first admission
                if job.preempted:  # its slots are rebuilt first, from every cached pass it ran (`_preempt`)
                    job.replay, job.preempted = list(job.log), False
                self.live.append(job)
                admitted.append(job)
        if not self.merge_rows:
            return
        self._join([job for job in admitted if merging.fresh(job)])  # into running groups first: one program
        for jobs in merging.groups(admitted):
            self._merge(jobs)

    def _merge(self, jobs: list[Job]) -> None:
        """Replace fresh one-row jobs admitted together by ONE job whose program decodes their rows
        (decoding/merging.py tells why and why it is exact); not when its padded canvas breaks the budget."""
        parts = [j.merge for j in jobs]
        tokens = merging.canvas_tokens(parts)
        if self.max_tokens is not None and self.live_tokens - sum(j.tokens for j in jobs) + tokens > self.max_tokens:
            return
        members = list(jobs)  # grows when rows join (`_join`)

        def answer_early(row: int, result: GenerationResult) -> None:  # a row done before the others (d2f)
            if not members[row].done.is_set():  # (a cancelled row was answered already: it decoded on till now)
                self._finish(members[row], result=result)
            group.rows -= 1  # no longer decoding: room for another row (its KV slot stays until the end)

        try:
            program, rows = merging.merged_program(parts, [j.done for j in jobs], answer_early)
        except Exception:  # e.g. a plugin's `program` without `row_streams`: the rows run as they came
            return
        group = Job(program, rows=len(jobs), tokens=tokens, members=members, joins=rows)
        self.merged_rows += len(jobs)
        group.admitted = time.perf_counter()
        self.live.insert(self.live.index(jobs[0]), group)
        for job in jobs:
            self._absorbed(job)

    def _join(self, jobs: list[Job]) -> None:
        """Fresh one-row jobs: each joins a running merged program with
        its key that takes rows (d2f's: `MergedRows.offer`) and has held fewer than `max_rows` rows, as a new
        row, instead of decoding alone; not when its row breaks the budget. A group's rows answered early keep
        their KV slots until it ends: the cap bounds that memory, and a full group drains while new rows start
        another."""
        groups = [g for g in self.live if g.joins is not None and g.joins.accept is not None]
        for job in jobs:
            for group in groups:
                width = group.tokens // len(group.members)  # a row of the group's canvas
                if group.joins.key != job.merge.key or len(group.members) >= self.max_rows or (
                        self.max_tokens is not None and self.live_tokens - job.tokens + width > self.max_tokens):
                    continue
                if group.joins.offer(job.merge.request, job.done) is not None:
                    group.members.append(job)
                    group.rows, group.tokens = group.rows + 1, group.tokens + width
                    self.merged_rows += 1
                    self._absorbed(job)
                    break

    def _absorbed(self, job: Job) -> None:
        """A job whose row now decodes in a merged program: its own program is dropped, it leaves the live set."""
        job.program.close()
        job.program = None
        if job in self.live:
            self.live.remove(job)

    def _fail(self, job: Job, error: BaseException) -> None:
        """A job's program or pass failed. A merged job that failed before its first forward (a row's bad
        input: a prompt too long...) runs its rows again each as a program of its own, first in the queue,
        so that only that row fails; one that failed later fails every row (its rows step together, and a
        rerun would stream their events again)."""
        if not job.members or job.passes:
            return self._finish(job, error=error)
        members, job.members = job.members, []
        self.merged_rows -= len(members)  # they decode as rows of their own after all
        self._finish(job, error=error)
        with self.lock:
            for member in reversed([m for m in members if not m.done.is_set()]):
                part = member.merge
                member.program, member.merge = part.decoder.program(part.model, part.request), None
                self.queue.appendleft(member)

    def _drop_cancelled_members(self) -> None:
        """A merged row whose request was cancelled is answered at once (its row decodes on with the others,
        its events no longer sent); when every row of a merged job is, the job is cancelled."""
        with self.lock:
            queued = list(self.queue)
        for group in [j for j in [*self.live, *queued] if j.members]:
            cancelled = [m for m in group.members if m.cancelled]  # attribute reads: no call per row
            if not cancelled:
                continue
            for member in cancelled:
                if not member.done.is_set():
                    self._finish(member)
            group.cancelled = group.cancelled or all(m.done.is_set() for m in group.members)

    def _fits(self, job: Job, rows: int, tokens: int) -> bool:
        """Room for `job` beside the live ones, which hold `rows` rows and `tokens` tokens: rows, and tokens
        in flight when there is a budget (a job alone is always admitted: it could never run otherwise)."""
        if rows + job.rows > self.max_rows:
            return False
        return self.max_tokens is None or tokens + job.tokens <= self.max_tokens

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
        for i, member in enumerate(job.members):  # a merged job: each row's job gets its row
            if not member.done.is_set():
                self._finish(member, result=None if result is None else merging.row_result(result, i), error=error)

    def _advance(self, job: Job, value: Any) -> None:
        """Send a job its logits or host values (None to start it) and keep its next request, or finish it."""
        try:
            job.pending = next(job.program) if value is None else job.program.send(value)
        except StopIteration as done:
            self._finish(job, result=done.value)
        except Exception as exc:  # the job fails, the engine and every other job go on
            self._fail(job, exc)

    # -- the loop --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One step; False when there was nothing to do."""
        self._drop_cancelled_members()
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
            if job.run_whole is not None:  # no program: decode it whole now
                try:
                    self._finish(job, result=job.run_whole())
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
        ran = []
        for job, logits, error in results:
            if error is not None:
                self._fail(job, error)
            elif logits is None:  # preempted before its pass ran: it runs when it is admitted again
                continue
            elif job.replay:  # a pass run again to rebuild its slots: its logits were had before
                job.replay.pop(0)
            else:
                ran.append((job, logits))
                job.passes += 1
        self._remember(ran)  # before any program runs on: its pass's inputs are as they were fed
        for job, logits in ran:
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
            self._fail(job, exc)
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
                self._fail(j, exc)
            return
        for j, value in zip(reading, values):
            self._advance(j, value)

    def run(self, jobs: list[Job] | None = None, on_step: Callable[[Engine], None] | None = None) -> None:
        """Step until `jobs` (default: everything submitted) are done."""
        def finished() -> bool:
            return self.idle() if jobs is None else all(j.done.is_set() for j in jobs)

        while not finished():
            stopping.check()  # a SIGTERM swallowed on its way (base/stopping.py) stops the decode here
            if not self.step():
                break
            if on_step is not None:
                on_step(self)
