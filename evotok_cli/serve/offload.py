"""Blocking request work (JSON parsing, checks, the chat template, tokenization) off the event loop, with
a time budget.

While a request's prompt is rendered and encoded, the event loop must stay free: /health, other requests
and SIGTERM are all answered there. The work runs in a thread of its own, at most `workers` at once; the
caller gets `TimeoutError` once its budget has passed, waiting for a free worker included. Python cannot
stop a thread, so one that overruns keeps its worker until it returns (the chat template's own budget,
`runtime/chat_template.py`, ends a looping template); the pool stays bounded, and the threads are daemons,
so a stuck one never holds the process at exit (asyncio's default executor would: `asyncio.run` joins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    """A bounded set of daemon worker threads, used from one event loop."""

    def __init__(self, workers: int):
        self.workers = workers
        self._slots: asyncio.Semaphore | None = None  # made in the loop that uses it (Python 3.10 binds it there)

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

        def thread() -> None:
            try:
                outcome = (True, work())
            except BaseException as exc:  # handed to the awaiting request, which answers it
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                loop.call_soon_threadsafe(deliver, *outcome)

        try:
            threading.Thread(target=thread, name="evotok-prepare", daemon=True).start()
        except BaseException:
            slots.release()
            raise
        return await asyncio.wait_for(asyncio.shield(future), timeout=max(end - loop.time(), 0.0))
