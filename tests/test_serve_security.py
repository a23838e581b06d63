"""`evotok serve` against hostile clients: a real server on a free loopback port, driven by raw sockets
(slow heads and bodies, smuggling, Host headers, malformed HTTP, too many connections, no file descriptors
left) and by httpx (content types, sizes, a 100,000-message chat, a chat template that never ends). Every
answer must be a JSON error object, every slow client dropped within a bounded time, and /health must
answer at once all along. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import select
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from evotok_cli.serve.guard import ANY_IP, Limits, default_hosts, host_allowed, host_name
from evotok_cli.serve.schema import MAX_BODY_BYTES
from tests.test_serve import Server

READ_TIMEOUT = 1.5
MAX_CONNECTIONS = 6
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "What is 2 + 3?"}]
JSON = {"Content-Type": "application/json"}
# two nested loops of the sandbox's largest range: 10^10 iterations, i.e. a template that never ends
LOOPING_TEMPLATE = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}hi"


@pytest.fixture(scope="module")
def guarded(tiny_llada, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(tiny_llada), "--read-timeout", str(READ_TIMEOUT),
               "--max-connections", str(MAX_CONNECTIONS), "--grace", "0")
    yield s
    assert s.stop() == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def exchange(port: int, *pieces: bytes, gap: float = 0.0, wait: float = 15.0) -> tuple[bytes, float]:
    """Send `pieces` `gap` seconds apart, stopping as soon as the server answers or closes, then read until
    it closes: all it sent, and the seconds from connecting until it first had something to say."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        for piece in pieces:
            if select.select([s], [], [], gap)[0]:
                break
            try:
                s.sendall(piece)
            except OSError:
                break
        assert select.select([s], [], [], wait)[0], "the server neither answered nor closed"
        seconds = time.monotonic() - start
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data, seconds


def parse(data: bytes) -> tuple[int, dict[str, str], Any]:
    """One HTTP response: status, headers, JSON body (asserting that it is the only response)."""
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", data)) == 1, data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json", data
    return int(lines[0].split()[1]), headers, json.loads(body)


def request(path: str = "/health", *, method: str = "GET", host: str = "127.0.0.1", extra: str = "",
            body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").encode() + body


def health_seconds(server: Server) -> float:
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    return time.monotonic() - t0


def in_thread(fn: Any) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# -- slow clients ---------------------------------------------------------------------------------
def test_a_head_sent_byte_by_byte_is_dropped_with_408_and_health_stays_live(guarded):
    head = request()
    slow, out = in_thread(lambda: exchange(guarded.port, *[head[i:i + 1] for i in range(len(head))], gap=0.3))
    time.sleep(0.5)
    assert health_seconds(guarded) < 1.0
    slow.join(15)
    data, seconds = out[0]
    status, headers, body = parse(data)
    assert status == 408 and body["error"]["code"] == "read_timeout" and headers["connection"] == "close"
    assert READ_TIMEOUT - 0.2 < seconds < READ_TIMEOUT + 3


def test_a_connection_that_sends_nothing_is_closed(guarded):
    data, seconds = exchange(guarded.port)
    assert data == b"" and seconds < READ_TIMEOUT + 3


def test_a_body_slower_than_the_floor_is_dropped_with_408(guarded):
    head = request(COMP, method="POST", extra="Content-Type: application/json\r\nContent-Length: 1000\r\n")
    data, seconds = exchange(guarded.port, head, *[b" "] * 40, gap=0.3)
    status, headers, body = parse(data)
    assert status == 408 and body["error"]["code"] == "read_timeout" and "--read-timeout" in body["error"]["message"]
    assert seconds < READ_TIMEOUT + 3


def test_a_keep_alive_connection_gets_the_same_deadline_after_each_answer(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:
        s.sendall(request())
        first = b""
        while not first.endswith(b"}"):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        t0, answer = time.monotonic(), b""
        for piece in [b"G", b"E", b"T", b" ", b"/"] * 10:  # the next head, trickled: bytes do not extend it
            if select.select([s], [], [], 0.3)[0]:
                break
            s.sendall(piece)
        assert select.select([s], [], [], 10)[0]
        seconds = time.monotonic() - t0
        with contextlib.suppress(ConnectionResetError):
            answer = s.recv(65536)
    assert seconds < READ_TIMEOUT + 3
    assert answer == b"" or parse(answer)[0] == 408, answer


# -- framing, hosts, types, sizes -----------------------------------------------------------------
def test_content_length_with_transfer_encoding_is_refused_and_the_smuggled_request_never_runs(guarded):
    smuggled = request("/smuggled-by-the-test", host="127.0.0.1")
    head = request(COMP, method="POST", extra="Content-Type: application/json\r\nContent-Length: 4\r\n"
                                              "Transfer-Encoding: chunked\r\n")
    data, _ = exchange(guarded.port, head + b"0\r\n\r\n" + smuggled)
    status, headers, body = parse(data)  # one response only
    assert status == 400 and body["error"]["code"] == "ambiguous_length" and headers["connection"] == "close"
    time.sleep(0.2)
    assert "smuggled-by-the-test" not in guarded.log.read_text()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example",
                                  "10.0.0.1"])
def test_a_host_header_naming_another_host_is_421(guarded, host):
    status, headers, body = parse(exchange(guarded.port, request(host=host))[0])
    assert status == 421 and body["error"]["code"] == "host_not_allowed" and headers["connection"] == "close"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:8000", "localhost."])
def test_the_loopback_names_with_any_port_are_served(guarded, host):
    data, _ = exchange(guarded.port, request(host=host, extra="Connection: close\r\n"))
    assert data.startswith(b"HTTP/1.1 200 "), data


def test_a_missing_or_doubled_host_header_is_400(guarded):
    for raw in (b"GET /health HTTP/1.0\r\n\r\n", request(extra="Host: evil.example\r\n")):
        status, _, body = parse(exchange(guarded.port, raw)[0])
        assert status == 400 and body["error"]["code"] in ("missing_host", "invalid_http"), body


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/jsonp"])
def test_a_post_that_is_not_json_is_415_and_runs_nothing(guarded, content_type):
    before = guarded.metrics().get("evotok_prompt_tokens_total", 0)
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(guarded.url + CHAT, content=json.dumps({"messages": USER}), headers=headers, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert guarded.metrics().get("evotok_prompt_tokens_total", 0) == before


def test_json_with_a_utf8_charset_is_served(guarded):
    r = httpx.post(guarded.url + COMP, content=json.dumps({"prompt": "What is 2 + 3?"}), timeout=60,
                   headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200, r.text


def test_a_body_over_4_mib_is_413_before_it_is_read(guarded):
    head = request(COMP, method="POST", extra=f"Content-Type: application/json\r\nContent-Length: {5 << 20}\r\n")
    status, headers, body = parse(exchange(guarded.port, head)[0])  # nothing of the body is ever sent
    assert status == 413 and body["error"]["code"] == "body_too_large" and headers["connection"] == "close"

    def chunks():
        for _ in range(80):
            yield b"x" * 65536

    r = httpx.post(guarded.url + COMP, content=chunks(), headers=JSON, timeout=30)  # chunked: no length
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_chat_of_100000_messages_is_refused_fast_and_never_blocks_health(guarded):
    body = json.dumps({"messages": [{"role": "user", "content": "x"}] * 100_000}).encode()
    assert len(body) > 3_000_000
    t0 = time.monotonic()
    big, out = in_thread(lambda: httpx.post(guarded.url + CHAT, content=body, headers=JSON, timeout=30))
    assert health_seconds(guarded) < 1.0
    big.join(30)
    r = out[0]
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "1000" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_prompt_ids_holding_the_mask_id_are_400(guarded, tiny_llada):
    mask = json.loads((tiny_llada / "config.json").read_text())["mask_token_id"]
    plain = [i for i in range(5, 10) if i != mask][:2]
    for prompt in ([plain[0], mask, plain[1]], [plain, [mask]]):
        r = guarded.post(COMP, {"prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt" and f"token id {mask} is the mask token" in error["message"], error
    ok = guarded.post(COMP, {"prompt": plain, "max_tokens": 4})
    assert ok.status_code == 200, ok.text


def test_tokenizing_4_mb_of_text_never_blocks_health(guarded):
    def slowest_health_while(thread: threading.Thread, after: float = 0.0) -> tuple[float, int]:
        """The slowest /health answer while `thread` runs and for `after` seconds more, and how many were asked."""
        times: list[float] = []
        while thread.is_alive():
            times.append(health_seconds(guarded))
            time.sleep(0.05)
        end = time.monotonic() + after
        while time.monotonic() < end:
            times.append(health_seconds(guarded))
            time.sleep(0.05)
        return max(times, default=0.0), len(times)

    ids = json.dumps({"tokens": [5] * 500_000}).encode()
    back, out = in_thread(lambda: httpx.post(guarded.url + "/detokenize", content=ids, headers=JSON, timeout=60))
    slowest, _ = slowest_health_while(back)
    assert out[0].status_code == 200 and slowest < 1.0, slowest

    words = "the cat sat on a mat, 12 apples and 3 pears; "
    body = json.dumps({"prompt": words * ((MAX_BODY_BYTES - 1024) // len(words))}).encode()
    assert 3_900_000 < len(body) <= MAX_BODY_BYTES
    big, out = in_thread(lambda: httpx.post(guarded.url + "/tokenize", content=body, headers=JSON, timeout=60))
    # after a 504 the worker still tokenizes and renders the answer nobody waits for: watch that too
    slowest, polls = slowest_health_while(big, after=4.0)
    r = out[0]
    assert r.status_code in (200, 504), r.text[:300]  # tokenized, or past the 10 s budget: answered either way
    assert r.status_code == 504 or r.json()["count"] > 1_000_000
    assert polls >= 10 and slowest < 1.0, (polls, slowest)


def test_a_long_answer_is_rendered_in_slices_as_json_dumps_writes_it():
    from evotok_cli.serve.tokenize import render

    for body in ({"count": 3, "tokens": list(range(10_001)), "token_strs": ['a\u00e9"\n', None]}, {"prompt": "x"},
                 {"tokens": []}):
        assert render(body, piece=1000) == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


# -- protocol errors as JSON ------------------------------------------------------------------------
def test_headers_over_16_kib_are_refused_whole_or_in_pieces(guarded):
    big = request(extra="X-Big: " + "a" * (20 * 1024) + "\r\n")
    status, _, body = parse(exchange(guarded.port, big)[0])
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    status, _, body = parse(exchange(guarded.port, big[:17 * 1024], big[17 * 1024:], gap=0.2)[0])
    assert status == 400 and body["error"]["code"] == "invalid_http"


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
                                 request(COMP, method="POST", extra="Content-Type: application/json\r\n"
                                                                    "Transfer-Encoding: chunked\r\n", body=b"zz\r\n")])
def test_malformed_http_is_a_400_error_object(guarded, raw):
    status, headers, body = parse(exchange(guarded.port, raw)[0])
    assert status == 400 and body["error"]["code"] == "invalid_http" and headers["connection"] == "close"


def test_unknown_paths_and_methods_are_error_objects(guarded):
    for r, status in ((httpx.get(guarded.url + "/nothing", timeout=5), 404),
                      (httpx.put(guarded.url + CHAT, json={}, timeout=5), 405)):
        assert r.status_code == status and r.json()["error"]["message"], r.text


# -- connections and file descriptors --------------------------------------------------------------
def test_connections_over_the_limit_get_503_until_the_idle_ones_time_out(guarded):
    idle = [socket.create_connection(("127.0.0.1", guarded.port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        status, headers, body = parse(exchange(guarded.port, request())[0])
        assert status == 503 and body["error"]["code"] == "too_many_connections" and headers["retry-after"] == "1"
        time.sleep(READ_TIMEOUT + 1)  # the idle ones are closed by now
        assert all(s.recv(1) == b"" for s in idle)
        assert health_seconds(guarded) < 1.0
    finally:
        for s in idle:
            s.close()


def test_no_file_descriptors_left_is_one_warning_line_not_a_traceback_a_second(guarded):
    pid = guarded.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    fds = [int(p.name) for p in Path(f"/proc/{pid}/fd").iterdir()]
    limit = max(max(fds) + 1, len(fds) + 1)  # fd numbers below it that are free: limit - len(fds)
    held = []
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for _ in range(limit - len(fds) + 3):  # the server accepts the first ones; the rest wait in the backlog
            held.append(socket.create_connection(("127.0.0.1", guarded.port), timeout=5))
        time.sleep(3.5)  # asyncio retries accept() every second
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in held:
            s.close()
    time.sleep(1.2)
    assert health_seconds(guarded) < 2.0
    log = guarded.log.read_text()
    assert log.count("cannot accept connections") == 1 and "EMFILE" in log, log
    assert "Traceback" not in log and "socket.accept() out of system resource" not in log


# -- a chat template that never ends ---------------------------------------------------------------
@pytest.fixture(scope="module")
def looping(tiny_llada, tmp_path_factory):
    folder = tmp_path_factory.mktemp("looping") / "llada"
    shutil.copytree(tiny_llada, folder)
    (folder / "chat_template.jinja").write_text(LOOPING_TEMPLATE)
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(folder), "--grace", "0", "--timeout", "6")
    yield s
    s.kill()


def test_a_looping_chat_template_is_answered_and_never_blocks_health_or_sigterm(looping):
    t0 = time.monotonic()
    ask, out = in_thread(lambda: httpx.post(looping.url + CHAT, json={"messages": USER}, timeout=30))
    time.sleep(0.3)
    assert max(health_seconds(looping) for _ in range(5)) < 1.0
    ask.join(30)
    r = out[0]
    assert r.status_code in (400, 504) and r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 12
    # a second one is still rendering when SIGTERM comes: the process exits all the same, and soon
    in_thread(lambda: httpx.post(looping.url + CHAT, json={"messages": USER}, timeout=30))
    time.sleep(0.5)
    t1 = time.monotonic()
    looping.proc.send_signal(signal.SIGTERM)
    assert looping.proc.wait(20) == 0, looping.log.read_text()
    assert time.monotonic() - t1 < 15
    assert "Traceback" not in looping.log.read_text()


# -- a chat template that fails: the client sees the problem, not the server's paths -------------------
PICKY_TEMPLATE = ("{% for m in messages %}{% if m.content == 'refuse' %}{{ raise_exception('no refusals here') }}"
                  "{% elif m.content == 'undefined' %}{{ nothing.here }}{% endif %}{{ m.role }}: {{ m.content }}\n"
                  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def picky(tiny_llada, tmp_path_factory):
    folder = tmp_path_factory.mktemp("picky") / "llada"
    shutil.copytree(tiny_llada, folder)
    (folder / "chat_template.jinja").write_text(PICKY_TEMPLATE)
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(folder), "--grace", "0")
    s.folder = folder
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.mark.parametrize("content, what", [("refuse", "the model's chat template refuses these messages "
                                                      "(no refusals here) (send messages the template accepts)"),
                                           ("undefined", "the model's chat template uses an undefined value")])
def test_a_chat_template_failure_names_no_server_path(picky, content, what):
    for path in (CHAT, "/tokenize"):
        r = picky.post(path, {"messages": [{"role": "user", "content": content}], "max_tokens": 4})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and error["message"].startswith(what), error
        assert str(picky.folder.parent) not in r.text and "/" not in error["message"], error
    assert f"{picky.folder / 'chat_template.jinja'}: the chat template" in picky.log.read_text()  # the operator's
    assert picky.post(CHAT, {"messages": USER, "max_tokens": 4}).status_code == 200


# -- the Host rules, as functions -----------------------------------------------------------------
@pytest.mark.parametrize("header, name", [("LocalHost.:80", "localhost"), ("[::1]:8000", "[::1]"), ("::1", "[::1]"),
                                          ("127.0.0.1:1", "127.0.0.1"), ("a.example", "a.example")])
def test_host_names_lose_port_case_and_final_dot(header, name):
    assert host_name(header) == name


def test_default_hosts_follow_the_bound_address():
    assert default_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "[::1]"}
    assert default_hosts("localhost") == {"127.0.0.1", "localhost", "[::1]"}
    assert default_hosts("::1") == {"127.0.0.1", "localhost", "[::1]"}
    everywhere = default_hosts("0.0.0.0")
    assert ANY_IP in everywhere and host_allowed("192.168.1.7:8000", everywhere)
    assert host_allowed(socket.gethostname(), everywhere) and not host_allowed("evil.example", everywhere)
    assert default_hosts("192.168.1.7") == {"192.168.1.7"}


def test_a_dotted_entry_allows_the_domain_and_its_subdomains():
    hosts = frozenset({".example.com"})
    assert host_allowed("example.com", hosts) and host_allowed("a.b.example.com:8080", hosts)
    assert not host_allowed("badexample.com", hosts) and not host_allowed("example.com.evil", hosts)


# -- a client that stops reading (in process: on loopback the kernel buffers megabytes first) ----------
class Transport:
    """Just what the protocol asks of a transport, recording what it does with it."""

    def __init__(self):
        self.aborted = self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_client_that_stops_reading_is_dropped_after_the_read_timeout():
    import asyncio

    from uvicorn import Config
    from uvicorn.server import ServerState

    from evotok_cli.serve.protocol import protocol_for

    async def app(scope, receive, send):  # answering, for as long as the test runs
        await asyncio.Event().wait()

    async def scenario() -> tuple[bool, bool]:
        proto = protocol_for(Limits(read_timeout=0.3))(Config(app, http="h11"), ServerState(), {})
        transport = Transport()
        proto.connection_made(transport)
        proto.data_received(request())  # a request is being answered: no read deadline now
        proto.pause_writing()  # its answer fills the buffers: the client reads nothing
        await asyncio.sleep(0.15)
        proto.resume_writing()  # it read some: the clock stops
        await asyncio.sleep(0.3)
        kept = not transport.is_closing()
        proto.pause_writing()
        await asyncio.sleep(0.5)
        proto.connection_lost(None)  # what the transport does after abort(): the app's task can end
        return kept, transport.aborted

    kept, dropped = asyncio.run(scenario())
    assert kept and dropped


def test_allowed_hosts_flag_becomes_the_set_the_guard_compares():
    from evotok_cli.serve.config import ServeOptions, limits

    hosts = limits(ServeOptions(allowed_hosts="Evotok.example.com, .internal.test,[::1],10.0.0.2,::2")).hosts
    assert hosts == {"evotok.example.com", ".internal.test", "[::1]", "10.0.0.2", "[::2]"}
    assert host_allowed("EVOTOK.example.com.:443", hosts) and host_allowed("a.internal.test", hosts)
    assert not host_allowed("127.0.0.1", hosts)
    assert limits(ServeOptions(allowed_hosts="*")).hosts is None
    assert limits(ServeOptions(host="localhost")).hosts == {"127.0.0.1", "localhost", "[::1]"}
    assert limits(ServeOptions(read_timeout=2.5, max_connections=9)) == Limits(
        hosts=frozenset({"127.0.0.1", "localhost", "[::1]"}), read_timeout=2.5, max_connections=9)
