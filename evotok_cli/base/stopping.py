"""A SIGTERM remembered as well as raised.

`evotok_cli.cli.app.main` turns SIGTERM into an exception so that `finally` blocks, atomic writers and output
locks clean up. But an exception raised by a signal handler lands wherever the main thread happens to be, and
some places swallow it: a `__del__` or weakref callback (Python prints "Exception ignored" and goes on), a
library's bare `except:` around an import. The command then ran on as if nothing came: a fine-tune started
seconds earlier trained until killed (CI, session 13). So the signal is also written down here; whoever
installs a handler of its own later (the trainer, the server) starts from it, and `main` exits 143 when a
command returns after one. Layer 0, base: imports nothing of evotok.
"""

from __future__ import annotations

import signal
import threading

_received: str | None = None


class Terminated(SystemExit):
    """SIGTERM as an exception, so that `finally` blocks, the atomic writer's cleanup and the output
    locks' release run before the process exits (143, as a shell reports a SIGTERM death)."""


def note(signum: int) -> None:
    """Record a stop signal (called by the handler that also raises it)."""
    global _received
    _received = signal.Signals(signum).name


def pending() -> str | None:
    """The name of a stop signal this command received ("SIGTERM"), or None."""
    return _received


def check() -> None:
    """Raise `Terminated` again when a stop signal came and was swallowed, so that a long job (a decode loop,
    an evaluation, a chat) stops now instead of when it ends. Only on the main thread, where the handler
    would have raised it: a server's engine thread is stopped by the server's own drain."""
    if _received is not None and threading.current_thread() is threading.main_thread():
        raise Terminated(128 + signal.Signals[_received])


def reset() -> None:
    """A fresh command starts with none (commands run in one process one after another in tests)."""
    global _received
    _received = None
