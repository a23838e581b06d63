"""Engine jobs seen from the event loop.

The engine steps in a thread of its own and calls back there (`on_event` for every pass and row of a
streamed request, `on_done` for every finished job). A `Session` hands both to the event loop with
`call_soon_threadsafe`, in the order the engine produced them, so a request handler only ever awaits an
asyncio queue. `Service` owns the one `BackgroundEngine`, admits requests (bounded queue, draining) and
cancels their jobs (timeout, disconnect, shutdown); before that, it prepares each request (parse, chat
template, tokenize) in a worker thread with a time budget, never in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from evotok_cli.decoding.engine import BackgroundEngine, Engine, Job, default_tokens_in_flight, make_jobs
from evotok_cli.jobs.generation import row_result
from evotok_cli.serve.metrics import Metrics
from evotok_cli.serve.offload import Offload
from evotok_cli.serve.plan import Plan, Served
from evotok_cli.serve.schema import ApiError

T = TypeVar("T")
PREPARE_S = 10.0  # seconds to parse, render and tokenize one request (milliseconds for any sane one)
PREPARE_WORKERS = 4  # requests prepared at once, in threads of their own


class Session:
    """One request's jobs: `queue` receives ("step", StepEvent or FinalPrefix) and ("done", Job) items;
    `finished` is set once every job has ended (decoded, failed or cancelled)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, plan: Plan):
        self.loop, self.plan = loop, plan
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.jobs: list[tuple[int, Job]] = []
        self.remaining = 0
        self.reason: str | None = None  # why it was cancelled: timeout | disconnect | shutdown
        self.on_finished: Any = None  # the service forgets it (also when no handler is left to close it)

    # -- engine thread ---------------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        self._hand_over(self.queue.put_nowait, ("step", event))

    def on_done(self, job: Job) -> None:
        self._hand_over(self._job_done, job)

    def _hand_over(self, fn: Any, arg: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, nobody waits any more
            self.loop.call_soon_threadsafe(fn, arg)

    # -- event loop ------------------------------------------------------------------------------
    def _job_done(self, job: Job) -> None:
        self.queue.put_nowait(("done", job))
        self.remaining -= 1
        if self.remaining == 0:
            self.finished.set()
            if self.on_finished is not None:
                self.on_finished(self)

    @property
    def waiting(self) -> bool:
        """True while some job of it has not yet joined the running batch."""
        return any(job.admitted is None and not job.done.is_set() for _, job in self.jobs)

    def cancel(self, reason: str) -> bool:
        """Drop its jobs at the engine's next step; False when it had finished or was cancelled already."""
        if self.finished.is_set() or self.reason is not None:
            return False
        self.reason = reason
        for _, job in self.jobs:
            job.cancel()
        return True

    def results(self, model: Any) -> list[dict[str, Any]]:
        """One result per row, as `generate --json` reports it, cut at the request's max_tokens."""
        return [row_result(model, self.plan.rows[first + offset], row, job.seconds, max_tokens=self.plan.max_tokens)
                for first, job in self.jobs for offset, row in enumerate(job.result.rows)]


class Service:
    """The served model, its engine and the requests in flight."""

    def __init__(self, served: Served, *, max_rows: int, max_queue: int, timeout: float,
                 max_tokens_in_flight: int | None = None):
        self.served, self.max_rows, self.max_queue, self.timeout = served, max_rows, max_queue, timeout
        self.metrics = Metrics()
        # admission by memory too: canvas positions in flight (default: a fixed number on a CPU, free memory on CUDA)
        self.engine = Engine(served.model, max_rows=max_rows,
                             max_tokens=max_tokens_in_flight or default_tokens_in_flight(served.model))
        self.background = BackgroundEngine(self.engine)
        self.sessions: set[Session] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.offload = Offload(PREPARE_WORKERS)

    async def prepare(self, work: Callable[[], T], deadline: float) -> T:
        """`work()` (parsing, the chat template, tokenization) in a worker thread, within PREPARE_S seconds
        and the request's deadline: its own errors as it raises them, 504 when it runs past (the event loop,
        /health and SIGTERM stay free all along)."""
        seconds = min(PREPARE_S, deadline - time.monotonic())
        try:
            return await self.offload.run(work, seconds)
        except asyncio.TimeoutError:
            limit = "--timeout" if seconds < PREPARE_S else f"{PREPARE_S:g} s"
            raise ApiError(504, f"preparing the prompt (chat template and tokenization) ran past its time limit "
                           f"({limit}); shorten the messages, or check the model's chat template", code="timeout",
                           type="server_error") from None

    def waiting(self) -> int:
        """Requests admitted by the server whose rows wait for room in the engine."""
        return sum(1 for s in self.sessions if s.waiting)

    def _would_wait(self, rows: int) -> bool:
        """Whether `rows` more rows find no room in the engine now (copies: the engine thread edits both)."""
        with self.engine.lock:
            queued = list(self.engine.queue)
        busy = sum(j.rows for j in list(self.engine.live)) + sum(j.rows for j in queued)
        return busy + rows > self.max_rows

    def open(self, plan: Plan, *, events: bool | str) -> Session:
        """Submit a planned request's jobs, or refuse it (503) when draining or the queue is full. `events`:
        what the session's queue receives while decoding: "evolve" (or True) a StepEvent per pass and row
        (the full trace), "final" only what a streamed text needs (a `FinalPrefix` per block boundary, from
        a decoder with `final_events`; any other decoder is traced), False nothing."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down", type="server_error")
        if self._would_wait(len(plan.rows)) and self.waiting() >= self.max_queue:
            self.metrics.rejected += 1
            raise ApiError(503, f"the server is busy: {self.waiting()} requests are waiting (--max-queue "
                           f"{self.max_queue}); retry later", code="overloaded", type="server_error",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        session = Session(loop, plan)
        if events == "final" and getattr(plan.decoder, "final_events", False):
            plan.request.on_final = session.on_event  # no StepEvent built: no per-pass trace work
        elif events:
            plan.request.trace, plan.request.on_event = True, session.on_event
        jobs = make_jobs(self.served.model, plan.decoder, plan.request, cohort=min(len(plan.rows), self.max_rows))
        session.jobs, session.remaining = jobs, len(jobs)
        session.on_finished = self.sessions.discard
        self.sessions.add(session)
        for _, job in jobs:
            job.on_done = session.on_done
            self.background.submit(job)
        return session

    def close(self, session: Session, reason: str = "disconnect") -> None:
        """The request is over: cancel whatever of it still runs (its client left, or it failed)."""
        self.cancel(session, reason)
        self.sessions.discard(session)

    def cancel(self, session: Session, reason: str) -> None:
        if session.cancel(reason):
            self.metrics.cancelled[reason] += 1

    def cancel_all(self, reason: str) -> None:
        for session in list(self.sessions):
            self.cancel(session, reason)

    def drain(self, grace: float) -> None:
        """Refuse new requests; cancel those still running after `grace` seconds (graceful shutdown)."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(grace, self.cancel_all, "shutdown")

    def stop(self, timeout: float) -> bool:
        """Cancel what is left and end the engine thread."""
        self.cancel_all("shutdown")
        for job in [*self.engine.live, *self.engine.queue]:
            job.cancel()
        return self.background.stop(timeout)

    def deadline(self) -> float:
        return time.monotonic() + self.timeout
