"""uvicorn's h11 protocol with the limits uvicorn does not have: a connection cap answered at once, a
deadline for every byte a client owes, and JSON for its plain-text protocol errors.

uvicorn times out an idle keep-alive connection, but only until its first byte: a client that sends a
request head one byte every few seconds, or a body nobody reads, holds its connection forever; and
`limit_concurrency` answers each request over the limit with a plain-text 503 (and counts /health too)
while accepting connections without bound. Here: a connection beyond `--max-connections` gets a 503 error
object as soon as its request head is read, and is closed; the request line and headers must arrive within
`--read-timeout` seconds of the connection opening (or of the previous answer on it), or the connection
is closed (with a 408 error object if part of a head had come); a body the app never read is bounded the
same way once the answer is sent (the body the app reads is bounded by `serve/guard.py`); a client that
stops reading an answer until the buffers fill is dropped after `--read-timeout` seconds of that.
Imported only by `server.run`: it needs uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from evotok_cli.serve.guard import MAX_HEAD_BYTES, Limits, answer
from evotok_cli.serve.schema import ApiError


def raw_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 error response with a JSON error object, written without h11 (whose state may be
    anything here), always closing the connection."""
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {400: "Bad Request", 408: "Request Timeout"}


class GuardedH11Protocol(H11Protocol):
    """One connection. `limits` is set on the subclass `protocol_for` makes."""

    limits: ClassVar[Limits]
    read_timer: asyncio.TimerHandle | None = None
    write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.app = self.too_many_connections  # its requests are read (within the deadline), then refused
        super().connection_made(transport)
        self.watch()

    async def too_many_connections(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await answer(send, ApiError(503, f"the server has {self.limits.max_connections} open connections (its "
                                        "--max-connections); retry later", code="too_many_connections",
                                        type="server_error", headers={"Retry-After": "1", "Connection": "close"}))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.write_timer is not None:
            self.write_timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped reading and the buffers are full: it gets --read-timeout to read again."""
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.limits.read_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def owed(self) -> bool:
        """Whether the connection waits on the client: for a request head, or for a body after the answer."""
        if self.transport.is_closing():
            return False
        state = self.conn.their_state
        answered = self.cycle is not None and self.cycle.response_complete
        return state is h11.IDLE or (state is h11.SEND_BODY and answered)

    def watch(self) -> None:
        """Arm the read deadline when the client starts to owe bytes; bytes that trickle in do not extend it."""
        if not self.owed():
            self._disarm()
        elif self.read_timer is None:
            self.read_timer = self.loop.call_later(self.limits.read_timeout, self.expire)

    def _disarm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def expire(self) -> None:
        self.read_timer = None
        if not self.owed():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            error = ApiError(408, f"the request line and headers did not arrive within {self.limits.read_timeout:g} "
                             "s (the server's --read-timeout)", code="read_timeout")
            self.transport.write(raw_response(error))
        self.transport.close()
        if self.transport.get_write_buffer_size():  # a client that reads nothing either: no waiting for it
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the bytes (malformed request line or headers, a head over MAX_HEAD_BYTES, bad chunked
        framing): an error object rather than uvicorn's plain text."""
        error = ApiError(400, f"the request is not valid HTTP/1.1 (a malformed request line or header, headers "
                         f"over {MAX_HEAD_BYTES // 1024} KiB, or a bad body framing)", code="invalid_http")
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            self.transport.write(raw_response(error))  # not into the middle of an answer already under way
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        """The request is served as plain HTTP (this server speaks no WebSocket): no two log lines per request."""


def protocol_for(limits: Limits) -> type[GuardedH11Protocol]:
    return type("EvotokH11Protocol", (GuardedH11Protocol,), {"limits": limits})
