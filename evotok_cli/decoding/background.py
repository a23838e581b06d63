"""`BackgroundEngine`: the step engine's loop in a thread of its own, for a server."""
from __future__ import annotations

import threading
from collections.abc import Callable

from evotok_cli.decoding.stepper import Engine, Job


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
