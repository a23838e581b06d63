"""The listening socket and uvicorn, with evotok's own shutdown.

The socket is bound before the model loads (a port in use fails at once, in one line) and listens only
once uvicorn starts. SIGTERM or Ctrl-C drains: the listener stays open and new requests get 503 (/health
"draining"), requests in flight finish or, after the grace period, are cancelled with an error object;
then the process exits 0. After SIGTERM (an orchestrator's) the listener stays open for the whole grace
period, so a load balancer still routing here sees 503 rather than a refused connection; after Ctrl-C only
until the requests in flight are done. A second signal cancels everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from evotok_cli.base import stopping
from evotok_cli.base.errors import ConfigError
from evotok_cli.serve.guard import Limits
from evotok_cli.serve.sessions import Service


def bind(host: str, port: int) -> socket.socket:
    """A bound, not yet listening, TCP socket; one line naming the problem when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot resolve {host!r} ({exc})", where="--host",
                          fix="pass an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--port",
                          fix="pick a free port, or --port 0 for any free one") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class AcceptErrors:
    """The event loop's exception handler. When the process runs out of file descriptors, asyncio's accept
    loop reports it with a traceback every second it retries: here one warning line a minute, with how many
    were left out; anything else goes to asyncio's own handler."""

    def __init__(self, every: float = 60.0):
        self.every, self.last, self.left_out = every, -math.inf, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.every:
            self.left_out += 1
            return
        more = f"; {self.left_out} more since the last warning" if self.left_out else ""
        print(f"warning: cannot accept connections: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)}), "
              f"retrying every second{more} (raise the limit, `ulimit -n`, or lower --max-connections)",
              file=sys.stderr, flush=True)
        self.last, self.left_out = now, 0


RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def run(app: Any, sock: socket.socket, service: Service, *, grace: float, limits: Limits) -> None:
    """Serve until a signal, then drain within `grace` seconds; returns (exit 0) when all is closed. The
    protocol is uvicorn's h11 one with evotok's limits (`protocol.py`), pinned with the asyncio loop: the
    combination the security tests exercise (httptools or uvloop, when installed, would otherwise win)."""
    import uvicorn

    from evotok_cli.serve.protocol import MAX_HEAD_BYTES, protocol_for

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace + 10.0, server_header=False,
                            http=protocol_for(limits), ws="none", loop="asyncio",
                            timeout_keep_alive=min(5.0, limits.read_timeout),  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES)

    class Server(Draining, uvicorn.Server):
        pass

    Server(config, service, grace).run(sockets=[sock])


class Draining:
    """evotok's shutdown, mixed into `uvicorn.Server` ahead of it (by `run`, which imports uvicorn only when
    a server starts): the signal handlers, the drain, and the application's shutdown after a second signal."""

    def __init__(self, config: Any, service: Service, grace: float):
        super().__init__(config)
        self.service, self.grace = service, grace
        self.stopping = False
        self.closer: asyncio.Future | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, then the application's even after a second signal: uvicorn skips it then
        (force_exit), and asyncio would cancel the lifespan mid-wait at exit, a CancelledError traceback.
        The jobs are cancelled by then, so the engine thread ends at once."""
        await super().shutdown(sockets=sockets)
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our handlers instead of uvicorn's, which would re-raise the signal after shutdown."""
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        if stopping.pending():  # one came while the model loaded and was swallowed there: stop, as asked
            self.on_signal(signal.SIGTERM, None)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_signal(self, sig: int, frame: Any) -> None:
        loop = self.service.loop
        if self.stopping or loop is None:  # the second signal (or one before start-up): stop now
            if loop is not None:
                loop.call_soon_threadsafe(self.service.cancel_all, "shutdown")
            self.force_exit = self.stopping
            self.should_exit = True
            return
        self.stopping = True
        loop.call_soon_threadsafe(self.drain, sig == signal.SIGTERM)

    def drain(self, linger: bool) -> None:
        """Answer new requests 503 with the listener open; close it after the grace period (`linger`) or
        once no request is in flight, whichever comes first otherwise."""
        self.service.drain(self.grace)
        deadline = time.monotonic() + self.grace

        async def close() -> None:
            while time.monotonic() < deadline and (linger or self.service.sessions):
                await asyncio.sleep(0.05)
            self.service.cancel_all("shutdown")
            self.should_exit = True

        self.closer = asyncio.ensure_future(close())
