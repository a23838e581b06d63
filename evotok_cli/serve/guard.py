"""What a request must be before any route sees it: pure ASGI middleware, in front of FastAPI.

A browser on the same machine can be made to send requests to a loopback server (DNS rebinding: a
hostile page's name resolves to 127.0.0.1; a `text/plain` POST needs no CORS preflight), and a hostile
client can hold a connection by sending slowly. So, in this order, a request is refused (and its
connection closed, so nothing it sent after is read as another request) when it carries both
Content-Length and Transfer-Encoding (400: the framing a proxy in front might read differently), its
request line and headers are over 16 KiB (431), its Host
header names no allowed host (421), it sends a body or POSTs without `Content-Type: application/json`
(415), its body is over the size limit (413) or arrives slower than the floor (408). The body is read
here, whole, and handed to the app as one message; the app reads it as usual.

The request line and headers are bounded by the HTTP protocol class (`serve/protocol.py`): this
middleware only runs once they have arrived.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evotok_cli.serve.asgi import HttpMiddleware
from evotok_cli.serve.schema import MAX_BODY_BYTES, ApiError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's own bound on a head still arriving; here on any)
MIN_BODY_RATE = 64 * 1024  # bytes/s a body must keep up, on average, once --read-timeout has passed
JSON_TYPES = ("application/json",)
ANY_IP = "<any IP address>"  # an allowed-hosts entry no Host header can spell: any IP literal matches it


@dataclass(frozen=True)
class Limits:
    """The server's limits on what clients send. `hosts` None: any Host header (tests, `--allowed-hosts *`)."""

    hosts: frozenset[str] | None = None
    read_timeout: float = 30.0  # seconds for the request line and headers, and the grace of a body
    max_connections: int = 256
    max_body: int = MAX_BODY_BYTES


def host_name(value: str) -> str:
    """A Host header or allowed-host entry, compared without its port, case or final dot: `[::1]:8000` ->
    `[::1]`, `LocalHost.:80` -> `localhost`, `::1` -> `[::1]`."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[: value.find("]") + 1] if "]" in value else value
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    elif value.count(":") > 1 and _is_ip(value):
        value = f"[{value}]"
    return value.rstrip(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def host_allowed(header: str, hosts: frozenset[str]) -> bool:
    """Whether a Host header names an allowed host: an exact name or address, a `.example.com` entry for
    that domain and its subdomains, or (`ANY_IP`, for a server bound to every interface) any IP literal:
    DNS rebinding always carries the attacker's own name, never an address."""
    name = host_name(header)
    if not name:
        return False
    if name in hosts or (ANY_IP in hosts and _is_ip(name)):
        return True
    return any(h.startswith(".") and (name == h[1:] or name.endswith(h)) for h in hosts)


def default_hosts(bound: str) -> frozenset[str]:
    """The Host headers a server bound to `bound` answers when --allowed-hosts is not given: the names it
    is reached by on this machine. Loopback: 127.0.0.1, localhost, [::1]. Every interface (0.0.0.0, ::):
    those, any IP address, and this machine's host name (short and full). Another address or name: itself,
    plus the loopback names when it is one of them."""
    import socket

    name = host_name(bound)
    if name in ("0.0.0.0", "[::]", ""):
        own = {socket.gethostname(), socket.getfqdn()}
        return frozenset({*LOOPBACK_HOSTS, ANY_IP, *(host_name(n) for n in own if n)})
    if name in LOOPBACK_HOSTS or (_is_ip(name) and ipaddress.ip_address(name.strip("[]")).is_loopback):
        return frozenset({*LOOPBACK_HOSTS, name})
    return frozenset({name})


def refusal(status: int, message: str, code: str) -> ApiError:
    return ApiError(status, message, code=code, headers={"Connection": "close"})


class Guard(HttpMiddleware):
    """The checks of the module docstring, then the app with the body already read."""

    def __init__(self, app: Any, limits: Limits):
        super().__init__(app)
        self.limits = limits

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = _headers(scope["headers"])
        try:
            self.check_head(scope, headers)
            if scope["method"] != "POST" and not _has_body(headers):
                await self.app(scope, receive, send)
                return
            _check_type(headers)
            body = await self.read_body(receive, headers, scope)
        except ApiError as exc:
            await answer(send, exc)
            return
        if body is None:  # the client left while sending it: nothing to answer
            scope.setdefault("state", {})["evotok_note"] = "disconnect"
            return
        await self.app(scope, _replay(body, receive), send)

    def check_head(self, scope: dict[str, Any], headers: dict[bytes, list[bytes]]) -> None:
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if size > MAX_HEAD_BYTES:
            raise refusal(431, f"the request's headers are {size} bytes, over the limit of {MAX_HEAD_BYTES}",
                          "headers_too_large")
        if b"transfer-encoding" in headers and b"content-length" in headers:
            raise refusal(400, "the request has both Content-Length and Transfer-Encoding headers (ambiguous "
                          "body length); send one", "ambiguous_length")
        if self.limits.hosts is None:
            return
        host = headers.get(b"host", [b""])
        shown = host[0].decode("latin-1")
        if len(host) != 1 or not shown.strip():
            raise refusal(400, "the request needs exactly one Host header", "missing_host")
        if not host_allowed(shown, self.limits.hosts):
            raise refusal(421, f"host {json.dumps(shown)[1:-1][:200]!r} is not served here; start the server "
                          "with --allowed-hosts naming it (or * for any)", "host_not_allowed")

    async def read_body(self, receive: Any, headers: dict[bytes, list[bytes]], scope: dict[str, Any]) -> bytes | None:
        """The whole body, or None when the client disconnected; 413 past the size limit, 408 when it falls
        behind: it must be complete by --read-timeout seconds plus one second per MIN_BODY_RATE bytes received."""
        limit = self.limits.max_body
        declared = headers.get(b"content-length", [b""])[0]
        if declared.isdigit() and int(declared) > limit:
            raise refusal(413, f"request body is {int(declared)} bytes, over the limit of {limit}", "body_too_large")
        start, body = time.monotonic(), bytearray()
        while True:
            left = start + self.limits.read_timeout + len(body) / MIN_BODY_RATE - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                raise refusal(408, f"the request body arrived too slowly ({len(body)} bytes in "
                              f"{time.monotonic() - start:.0f} s; the server's --read-timeout is "
                              f"{self.limits.read_timeout:g} s)", "read_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise refusal(413, f"request body is over the limit of {limit} bytes", "body_too_large")
            if not message.get("more_body", False):
                return bytes(body)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for key, value in raw:
        out.setdefault(key.lower(), []).append(value)
    return out


def _has_body(headers: dict[bytes, list[bytes]]) -> bool:
    return b"transfer-encoding" in headers or headers.get(b"content-length", [b"0"])[0].strip() not in (b"", b"0")


def _check_type(headers: dict[bytes, list[bytes]]) -> None:
    """415 unless the body is declared JSON in UTF-8 (the only body a route reads): a `text/plain` or form
    POST is what a web page can send to any server without asking it first (no CORS preflight)."""
    declared = b",".join(headers.get(b"content-type", [])).decode("latin-1")
    kind, *params = [p.strip().lower() for p in declared.split(";")]
    charsets = [p.partition("=")[2].strip('"') for p in params if p.partition("=")[0].strip() == "charset"]
    if kind not in JSON_TYPES or any(c not in ("utf-8", "utf8") for c in charsets):
        shown = json.dumps(declared)[1:-1][:100] or "none"
        raise refusal(415, f"request bodies must be JSON: send Content-Type: application/json (got {shown})",
                      "unsupported_media_type")


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that gives the app the body read here, then the connection's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replay


async def answer(send: Any, error: ApiError) -> None:
    """An error object as the whole response (the app never ran)."""
    data = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
