"""Blocking request work (JSON parsing, checks, the chat template, tokenization) off the event loop, with
a time budget.

While a request's prompt is rendered and encoded, the event loop must stay free: /health, other requests
and SIGTERM are all answered there. The work runs in a worker thread, at most `workers` at once; the
caller gets `TimeoutError` once its budget has passed, waiting for a free worker included. Python cannot
stop a thread, so one that overruns keeps its worker until it returns (the chat template's own budget,
`runtime/chat_template.py`, ends a looping template); the pool stays bounded, and the threads are daemons,
so a stuck one never holds the process at exit (asyncio's default executor would: `asyncio.run` joins it).

The workers are started once and kept, each waiting on a queue. A thread per request cost more than its
work under load (issue 25): `Thread.start` blocks the event loop until the new thread first holds the GIL,
which the engine thread holds between its torch calls; py-spy read 5-7 ms of it per request at
concurrency 16 on 2 cores (d2f on the bundled model), the event loop's largest busy item, during which
no other request moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
Task = tuple[Callable[[], Any], asyncio.AbstractEventLoop, Callable[[bool, Any], None]]


class Offload:
    """A bounded set of daemon worker threads, used from one event loop."""

    def __init__(self, workers: int):
        self.workers = workers
        self._slots: asyncio.Semaphore | None = None  # made in the loop that uses it (Python 3.10 binds it there)
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def run(self, work: Callable[[], T], seconds: float) -> T:
        """`work()` in a worker thread: its result or exception, or TimeoutError after `seconds`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        slots, loop = self._slots, asyncio.get_running_loop()
        end = loop.time() + seconds
        await asyncio.wait_for(slots.acquire(), timeout=max(seconds, 0.0))
        future: asyncio.Future[T] = loop.create_future()

        def deliver(ok: bool, value: Any) -> None:
            slots.release()  # only now: a worker that overran stays counted until it returns
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        try:
            self._start_workers()
        except BaseException:
            slots.release()
            raise
        self._tasks.put((work, loop, deliver))  # a slot is held: some worker is free, or about to be
        return await asyncio.wait_for(asyncio.shield(future), timeout=max(end - loop.time(), 0.0))

    def _start_workers(self) -> None:
        """The missing workers, on first use (one per slot: a task that holds a slot always finds one)."""
        while len(self._threads) < self.workers:
            thread = threading.Thread(target=self._work, name="evotok-prepare", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        """A worker: each task's outcome handed back to its event loop, forever."""
        while True:
            work, loop, deliver = self._tasks.get()
            try:
                outcome: tuple[bool, Any] = (True, work())
            except BaseException as exc:  # handed to the awaiting request, which answers it
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                loop.call_soon_threadsafe(deliver, *outcome)
            del work, loop, deliver, outcome  # hold nothing of a finished request while waiting
