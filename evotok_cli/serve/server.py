"""The listening socket and uvicorn, with evotok's own shutdown.

The socket is bound before the model loads (a port in use fails at once, in one line) and listens only
once uvicorn starts. SIGTERM or Ctrl-C drains: no new connections, new requests on open ones get 503,
requests in flight finish or, after the grace period, are cancelled with an error object; then the
process exits 0. A second signal cancels everything at once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from typing import Any

from evotok_cli.errors import ConfigError
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


def run(app: Any, sock: socket.socket, service: Service, *, grace: float) -> None:
    """Serve until a signal, then drain within `grace` seconds; returns (exit 0) when all is closed."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace + 10.0, server_header=False)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """Our handlers instead of uvicorn's, which would re-raise the signal after shutdown."""
            previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_signal(self, sig: int, frame: Any) -> None:
            loop = service.loop
            if self.should_exit:  # the second signal: stop waiting
                if loop is not None:
                    loop.call_soon_threadsafe(service.cancel_all, "shutdown")
                self.force_exit = True
                return
            if loop is not None:
                loop.call_soon_threadsafe(service.drain, grace)
            self.should_exit = True

    Server(config).run(sockets=[sock])
