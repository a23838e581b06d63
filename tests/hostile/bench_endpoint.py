"""Hostile rows for `evotok bench --endpoint`: bad URLs, a closed port, bad --concurrency, a key the server
refuses, and flags that a served model cannot take. Each fails in one line before anything is written.

`FakeServer` is a stand-in OpenAI-compatible server (not evotok's: its /v1/models has no `evotok` section)
in a thread of this process: it refuses any key but `KEY` with 401, and can answer 503 a few times first
(tests/test_bench_endpoint.py uses it for the plain-server path and the retries)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.hostile import Case, Ctx

KEY = "sk-good"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """A plain OpenAI-compatible completions server answering `text` to every prompt."""

    def __init__(self, text: str = "The answer is 4.", fail_first: int = 0, port: int = 0):
        self.text, self.fail_left, self.bodies = text, fail_first, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {KEY}":
                    return True
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}})
                return False

            def do_GET(self) -> None:
                if self._authorized():
                    self._send(200, {"object": "list", "data": [{"id": "plain-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if not self._authorized():
                    return
                if owner.fail_left > 0:
                    owner.fail_left -= 1
                    self._send(503, {"error": {"message": "busy", "code": "overloaded"}}, {"Retry-After": "0"})
                    return
                owner.bodies.append(body)
                self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": "plain-model",
                                 "choices": [{"index": 0, "text": owner.text, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CLOSED = free_port()  # nothing listens there (chosen once; a row connects to it)
FAKE_PORT = free_port()
_fake: list[FakeServer] = []


def fake(_: Ctx) -> None:
    """Start the shared fake server on FAKE_PORT once (a daemon thread for the test session)."""
    if not _fake:
        _fake.append(FakeServer(port=FAKE_PORT))


FAKE = f"http://127.0.0.1:{FAKE_PORT}/v1"
RUN = ["bench", "arith-small", "--limit", "2", "-m", "{model}"]

CASES = [
    Case("endpoint-bad-scheme", [*RUN, "--endpoint", "ftp://127.0.0.1:8000/v1"], "not an http(s) URL"),
    Case("endpoint-no-host", [*RUN, "--endpoint", "http:///v1"], "not an http(s) URL"),
    Case("endpoint-bad-port", [*RUN, "--endpoint", "http://127.0.0.1:99999/v1"], "invalid port"),
    Case("endpoint-query", [*RUN, "--endpoint", "http://127.0.0.1:8000/v1?x=1"], "query or fragment"),
    Case("endpoint-unreachable", [*RUN, "--endpoint", f"http://127.0.0.1:{CLOSED}/v1"], "cannot reach"),
    Case("endpoint-concurrency-zero", [*RUN, "--endpoint", FAKE, "--concurrency", "0"], "--concurrency"),
    Case("endpoint-concurrency-huge", [*RUN, "--endpoint", FAKE, "--concurrency", "5000"], "--concurrency"),
    Case("endpoint-concurrency-yaml", [*RUN, "--endpoint", FAKE, "-c", "{tmp}/c.yaml"], "--concurrency",
         setup=lambda ctx: (ctx.tmp / "c.yaml").write_text("concurrency: -3\n")),
    Case("endpoint-bad-key", [*RUN, "--endpoint", FAKE, "--api-key", "sk-wrong"], "refused the API key",
         setup=fake),
    Case("endpoint-no-key", [*RUN, "--endpoint", FAKE], "refused the API key", setup=fake),
    Case("endpoint-plain-with-decoder", [*RUN, "--endpoint", FAKE, "--api-key", KEY, "-d", "evotoken"],
         "not evotok's server", setup=fake),
    Case("endpoint-plain-with-sweep", [*RUN, "--endpoint", FAKE, "--api-key", KEY, "--sweep", "alpha=0.5,0.7"],
         "not evotok's server", setup=fake),
    Case("endpoint-with-adapter", [*RUN, "--endpoint", FAKE, "--adapter", "{tmp}"], "--adapter"),
    Case("endpoint-with-quantize", [*RUN, "--endpoint", FAKE, "--quantize", "int8"], "--quantize"),
]
