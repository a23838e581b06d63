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

_received: str | None = None


def note(signum: int) -> None:
    """Record a stop signal (called by the handler that also raises it)."""
    global _received
    _received = signal.Signals(signum).name


def pending() -> str | None:
    """The name of a stop signal this command received ("SIGTERM"), or None."""
    return _received


def reset() -> None:
    """A fresh command starts with none (commands run in one process one after another in tests)."""
    global _received
    _received = None
