"""`evotok serve` as a client sees it: a real server process on a tiny checkpoint (and the bundled model),
driven by the real `openai` client and by raw HTTP. Answers must be exactly `evotok generate --json`'s text
for the same prompt and settings, alone or among 32 concurrent clients; streams must add up to the same
text; every malformed request must be a 400 error object; the operations (auth, bounded queue, timeout,
disconnects, SIGTERM) must do what docs/serve.md says."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # the test extra installs both: a missing one must fail the suite, not skip it
import openai
import pytest

from tests.conftest import one_line_error, write_llada

# the server's model: a tiny LLaDA with a longer context (slow requests) and its own generation defaults
DEFAULTS = {"gen_length": 16, "block_length": 8, "steps": 16, "prefill": "<reasoning>"}
NAME = "llada"
PROMPT = "What is 2 + 3? Tom has 12 apples."
SLOW = {"gen_length": 512, "block_length": 512, "steps": 512}  # seconds of passes on the tiny model
D2F_OPTIONS = {"block_size": 4, "skip_threshold": 0.3, "block_add_threshold": 0.5, "soft": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m evotok_cli serve` in a process of its own, ready once /health answers."""

    def __init__(self, log_dir: Path, *args: str, ready_s: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}
        env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "evotok_cli", "serve", "--port", str(self.port), *args],
                                         stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the server did not come up:\n{self.log.read_text()}")
            time.sleep(0.2)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body: object, **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(kw.pop("headers", None) or {})}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=kw.pop("timeout", 120), **kw)

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def serve_model(tmp_path_factory, tokenizer_dir) -> Path:
    folder = write_llada(tmp_path_factory.mktemp("serve") / NAME, tokenizer_dir, max_length=1024)
    (folder / "generation_config.json").write_text(json.dumps({"evotok": DEFAULTS}))
    return folder


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(serve_model), "--max-rows", "8", "--grace", "1")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def generate_json(cli, model: Path, prompts: list[str], *args: str) -> list[dict]:
    """`evotok generate --json` on the same checkpoint: the reference every answer must equal."""
    argv = ["generate", "-m", str(model), *[a for p in prompts for a in ("-p", p)], *args, "--json"]
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["results"]


def collect(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """Text and finish_reason per choice index of an openai stream, and the chunks themselves."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                assert choice.index not in reasons, "two finish reasons for one choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


# -- answers equal `evotok generate --json` ---------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_chat_is_generate_with_the_models_template_and_prefill(client, cli, serve_model):
    system = "You answer briefly."
    ref, ref_system = generate_json(cli, serve_model, [PROMPT]), generate_json(cli, serve_model, [PROMPT],
                                                                              "--system", system)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}])
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.content == ref[0]["text"]
    assert r.choices[0].finish_reason == ("stop" if ref[0]["tokens"] < DEFAULTS["gen_length"] else "length")
    assert r.usage.completion_tokens == ref[0]["tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    assert r.usage.model_extra["nfe"] == ref[0]["nfe"]
    assert r.model_extra["evotok"]["settings"] == {**{k: DEFAULTS[k] for k in ("gen_length", "block_length", "steps")},
                                                   "temperature": 0.0, "seed": 0}
    s = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": system},
                                                             {"role": "user", "content": PROMPT}])
    assert s.choices[0].message.content == ref_system[0]["text"]


def test_completions_are_raw_prompts_and_each_choice_reproduces_with_its_seed(client, cli, serve_model):
    from evotok_cli.jobs.generation import derive_seed

    a, b = "Hello world, how are", "The quick brown fox"
    r = client.completions.create(model=NAME, prompt=[a, b], n=2, temperature=0.8, seed=3)
    seeds = r.model_extra["evotok"]["seeds"]
    assert seeds == [derive_seed(3, i) for i in range(4)] and seeds[0] == 3 and len(set(seeds)) == 4
    ref = [generate_json(cli, serve_model, [p], "--no-chat-template", "--prefill", "", "--temperature", "0.8",
                         "--seed", str(seed))[0] for p, seed in zip([a, a, b, b], seeds)]
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [x["text"] for x in ref]
    assert r.usage.completion_tokens == sum(x["tokens"] for x in ref)
    ids = client.completions.create(model=NAME, prompt=[5, 17, 33], extra_body={"gen_length": 8, "block_length": 8,
                                                                                                "steps": 8})
    ref_ids = cli("generate", "-m", str(serve_model), "--prompt-ids", "5,17,33", "--gen-length", "8",
                  "--block-length", "8", "--steps", "8", "--json")
    assert ids.choices[0].text == json.loads(ref_ids.stdout)["results"][0]["text"]


def test_chat_n_and_decoder_fields(client, cli, serve_model):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], n=3, temperature=1.0, seed=11, max_tokens=16,
        extra_body={"decoder": "evotoken", "options": {"alpha": 0.6}, "steps": 8, "block_length": 8})
    ref = [generate_json(cli, serve_model, [PROMPT], "--temperature", "1", "--seed", str(seed), "-d", "evotoken",
                         "--opt", "alpha=0.6", "--steps", "8", "--block-length", "8", "--gen-length", "16")[0]
           for seed in r.model_extra["evotok"]["seeds"]]  # choice i reproduces with generate --seed <its seed>
    assert [c.message.content for c in r.choices] == [x["text"] for x in ref]
    assert r.model_extra["evotok"]["decoder"] == "evotoken"


def test_stop_sequences_cut_the_text(client):
    base = client.completions.create(model=NAME, prompt=PROMPT).choices[0].text
    assert len(base) >= 4, f"the tiny model's answer is too short to cut: {base!r}"
    stop = base[len(base) // 2:len(base) // 2 + 2]
    expected = base[:base.find(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPT, stop=[stop, "never in it \u2603"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    texts, reasons, _ = collect(client.completions.create(model=NAME, prompt=PROMPT, stop=stop, stream=True))
    assert texts == {0: expected} and reasons == {0: "stop"}


# -- streams ------------------------------------------------------------------------------------
def test_streamed_text_holds_back_what_could_still_change():
    from evotok_cli.serve.stream import RowText

    class Letters:  # token i is the letter chr(96 + i); 0 ends the answer
        stop_ids = (0,)

        def answer_text(self, ids):
            ids = ids[:ids.index(0)] if 0 in ids else ids
            return "".join(" " if i == 27 else chr(96 + i) for i in ids)

    row = RowText(Letters(), ["cd"])
    canvas = [1, 2, 27, 3, 4, 5, 0, 9]
    deltas = [row.advance(canvas, end) for end in (2, 3, 4, 5, 8)]
    assert deltas == ["a", "b", "", " ", ""]  # "b" waits for the next letter, the space for more, "c" may start "cd"
    assert "".join(deltas) + row.finish("ab ") == "ab "


def test_stream_adds_up_to_the_answer(client):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=NAME, messages=messages, n=2, temperature=1.0, seed=4)
    texts, reasons, chunks = collect(client.chat.completions.create(
        model=NAME, messages=messages, n=2, temperature=1.0, seed=4, stream=True,
        stream_options={"include_usage": True}))
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert not any("evotok" in (c.model_extra or {}) for c in chunks)


def test_stream_of_d2f_uses_its_block_pipeline(client, cli, serve_model):
    ref = generate_json(cli, serve_model, [PROMPT], "-d", "d2f", *[a for k, v in D2F_OPTIONS.items()
                                                                  for a in ("--opt", f"{k}={v}")])
    texts, reasons, _ = collect(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], stream=True,
        extra_body={"decoder": "d2f", "options": D2F_OPTIONS}))
    assert texts == {0: ref[0]["text"]} and 0 in reasons


def test_evolve_stream_sends_every_pass(client):
    from evotok_cli.viz.style import STATES

    body = {"decoder": "evotoken", "stream_mode": "evolve"}
    whole = client.completions.create(model=NAME, prompt=PROMPT, extra_body={"decoder": "evotoken"})
    texts, reasons, chunks = collect(client.completions.create(model=NAME, prompt=PROMPT, stream=True,
                                                               extra_body=body))
    frames = [c.model_extra["evotok"] for c in chunks if "evotok" in c.model_extra]
    assert [f["step"] for f in frames] == list(range(1, whole.usage.model_extra["nfe"] + 1))
    assert texts == {0: whole.choices[0].text} and reasons == {0: whole.choices[0].finish_reason}
    for f in frames:
        assert len(f["states"]) == len(f["tokens"]) == len(f["ids"]) == DEFAULTS["gen_length"]
        assert set(f["states"]) <= set(STATES) and f["index"] == 0
    masked = {i for f in frames for t, i in zip(f["tokens"], f["ids"]) if t is None}  # [MASK] has no text
    assert len(masked) == 1 and not any(i in masked for f in frames for t, i in zip(f["tokens"], f["ids"]) if t)
    assert {"soft_mask", "soft"} <= {s for f in frames for s in f["states"]}
    assert any(f["candidates"] for f in frames)
    assert [f["final"] for f in frames] == sorted(f["final"] for f in frames)


# -- many clients --------------------------------------------------------------------------------
def test_32_concurrent_clients_get_their_single_run_text(client, cli, serve_model):
    prompts = [f"Question {i}: what is {i} + {i % 7}?" for i in range(32)]
    ref = generate_json(cli, serve_model, prompts)
    start = threading.Barrier(32)

    def ask(prompt: str) -> str:
        start.wait()
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [r["text"] for r in ref]


# -- disconnects ---------------------------------------------------------------------------------
def _wait_metrics(server: Server, check, timeout: float = 30.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics(headers)
        if check(m):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


CANCELLED = 'evotok_requests_cancelled_total{reason="%s"}'


def test_a_client_that_disconnects_cancels_its_job(server):
    before = server.metrics()
    body = {"model": NAME, "prompt": PROMPT, "stream": True, "stream_mode": "evolve", **SLOW}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["evotok"]["step"] == 1
    after = _wait_metrics(server, lambda m: m.get(CANCELLED % "disconnect", 0) > before.get(CANCELLED % "disconnect", 0)
                          and m["evotok_live_rows"] == 0)
    ran = after["evotok_forward_passes_total"] - before["evotok_forward_passes_total"]
    assert ran < SLOW["steps"], f"the job ran all its {ran} passes: it was not dropped"

    before = after
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, **SLOW}, timeout=httpx.Timeout(60, read=1))
    after = _wait_metrics(server, lambda m: m.get(CANCELLED % "disconnect", 0) > before[CANCELLED % "disconnect"]
                          and m["evotok_live_rows"] == 0)
    assert after["evotok_forward_passes_total"] - before["evotok_forward_passes_total"] < SLOW["steps"]
    assert after['evotok_requests_total{route="/v1/completions",status="499"}'] >= 2


# -- malformed requests: 400 error objects, never 500 ---------------------------------------------
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
MALFORMED = [
    ("not-json", COMP, b"{", None),
    ("not-utf8", COMP, b'{"prompt": "\xff"}', None),
    ("nan", COMP, b'{"prompt": "x", "temperature": NaN}', None),
    ("deep", COMP, b"[" * 100_000 + b"]" * 100_000, None),
    ("array-body", COMP, [], None),
    ("string-body", CHAT, "hello", None),
    ("empty-object", COMP, {}, "prompt"),
    ("prompt-number", COMP, {"prompt": 7}, "prompt"),
    ("prompt-empty-list", COMP, {"prompt": []}, "prompt"),
    ("prompt-mixed", COMP, {"prompt": ["a", 3]}, "prompt[1]"),
    ("prompt-negative-id", COMP, {"prompt": [[1, -2]]}, "prompt[0]"),
    ("prompt-id-outside-vocab", COMP, {"prompt": [10**9]}, "prompt"),
    ("prompt-lone-surrogate", COMP, b'{"prompt": "\\ud800"}', "prompt"),
    ("prompt-too-long", COMP, {"prompt": "hello " * 2000}, "prompt"),
    ("messages-missing", CHAT, {"prompt": "x"}, "messages"),
    ("messages-empty", CHAT, {"messages": []}, "messages"),
    ("messages-not-objects", CHAT, {"messages": ["hi"]}, "messages[0]"),
    ("role-unknown", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("content-missing", CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("content-image", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("message-tool-calls", CHAT, {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls"),
    ("no-user-message", CHAT, {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ("max-tokens-zero", CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("max-tokens-float", CHAT, {"messages": USER, "max_tokens": 16.5}, "max_tokens"),
    ("max-tokens-bool", CHAT, {"messages": USER, "max_tokens": True}, "max_tokens"),
    ("gen-length-vs-block", CHAT, {"messages": USER, "gen_length": 12}, "block_length"),
    ("max-tokens-aliases-differ", CHAT, {"messages": USER, "max_tokens": 16, "max_completion_tokens": 8},
     "max_completion_tokens"),
    ("steps-zero", CHAT, {"messages": USER, "steps": 0}, "steps"),
    ("steps-vs-blocks", CHAT, {"messages": USER, "steps": 3}, "steps"),
    ("block-length-string", CHAT, {"messages": USER, "block_length": "8"}, "block_length"),
    ("temperature-negative", CHAT, {"messages": USER, "temperature": -1}, "temperature"),
    ("temperature-string", CHAT, {"messages": USER, "temperature": "0"}, "temperature"),
    ("seed-negative", CHAT, {"messages": USER, "seed": -1}, "seed"),
    ("seed-huge", CHAT, {"messages": USER, "seed": 2**64}, "seed"),
    ("n-zero", CHAT, {"messages": USER, "n": 0}, "n"),
    ("n-huge", CHAT, {"messages": USER, "n": 10**6}, "n"),
    ("rows-over-limit", COMP, {"prompt": ["a"] * 64, "n": 8}, "n"),
    ("stop-number", CHAT, {"messages": USER, "stop": 5}, "stop"),
    ("stop-empty", CHAT, {"messages": USER, "stop": [""]}, "stop"),
    ("stop-too-many", CHAT, {"messages": USER, "stop": list("abcde")}, "stop"),
    ("stream-string", CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    ("stream-mode-unknown", CHAT, {"messages": USER, "stream": True, "stream_mode": "frames"}, "stream_mode"),
    ("stream-mode-without-stream", CHAT, {"messages": USER, "stream_mode": "evolve"}, "stream_mode"),
    ("stream-options-string", CHAT, {"messages": USER, "stream": True, "stream_options": "x"},
     "stream_options"),
    ("decoder-unknown", CHAT, {"messages": USER, "decoder": "evotokens"}, "decoder"),
    ("decoder-number", CHAT, {"messages": USER, "decoder": 3}, "decoder"),
    ("options-list", CHAT, {"messages": USER, "options": ["alpha=1"]}, "options"),
    ("options-unknown", CHAT, {"messages": USER, "decoder": "evotoken", "options": {"alpah": 0.5}}, "options"),
    ("options-out-of-range", CHAT, {"messages": USER, "decoder": "evotoken", "options": {"alpha": 7}}, "options"),
    ("options-nested", CHAT, {"messages": USER, "options": {"threshold": {"x": 1}}}, "options.threshold"),
    ("options-k-soft-above-vocab", CHAT, {"messages": USER, "decoder": "evotoken", "options": {"k_soft": 10**5}},
     "options"),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("top-p-zero", CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    ("top-logprobs-without-logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("echo", COMP, {"prompt": "x", "echo": True}, "echo"),
    ("response-format-json", CHAT, {"messages": USER, "response_format": {"type": "json_object"}},
     "response_format"),
    ("model-number", CHAT, {"messages": USER, "model": 1}, "model"),
]


@pytest.mark.parametrize("path,body,param", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_400_error_objects(server, path, body, param):
    r = server.post(path, body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


def test_other_http_errors_are_error_objects_too(server):
    for r, status in ((httpx.get(server.url + "/v1/nothing"), 404), (httpx.delete(server.url + COMP), 405),
                      (server.post(CHAT, {"messages": USER, "model": "gpt-4"}), 404),
                      (server.post(COMP, b"x" * (5 << 20)), 413)):
        assert r.status_code == status and r.json()["error"]["message"], r.text


def test_an_unexpected_server_error_is_a_500_error_object(tiny_model, monkeypatch):
    from starlette.testclient import TestClient

    from evotok_cli.jobs.config import GENERATE_DEFAULTS
    from evotok_cli.serve import app as app_module
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    def broken(*_a, **_k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app_module, "make_plan", broken)
    service = Service(Served(tiny_model, "tiny", None, "hard-mask", dict(GENERATE_DEFAULTS)), max_rows=2,
                      max_queue=2, timeout=30)
    with TestClient(app_module.create_app(service, api_key=None, decoders=["hard-mask"])) as http:
        r = http.post(COMP, json={"prompt": "hi"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                  "code": "internal_error"}}
    assert not service.background.thread.is_alive()


# -- auth, overload, timeout ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(serve_model, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(serve_model), "--api-key", "sk-test", "--grace", "1",
               "--max-rows", "1",
               "--max-queue", "1", "--timeout", "2")
    yield s
    assert s.stop() == 0, s.log.read_text()


KEY = {"Authorization": "Bearer sk-test"}


def test_api_key(strict):
    with pytest.raises(openai.AuthenticationError) as info:
        strict.client("sk-wrong").chat.completions.create(model=NAME, messages=USER)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    assert strict.post(CHAT, {"messages": USER}).status_code == 401
    assert httpx.get(strict.url + "/metrics").status_code == 401
    assert httpx.get(strict.url + "/v1/models").status_code == 401
    assert httpx.get(strict.url + "/health").status_code == 200
    assert strict.client("sk-test").chat.completions.create(model=NAME, messages=USER).choices[0].finish_reason


def test_overload_is_503_with_retry_after(strict):
    body = {"messages": USER, "gen_length": 64, "block_length": 64, "steps": 64}
    start = threading.Barrier(8)

    def ask(_: int) -> httpx.Response:
        start.wait()
        return strict.post(CHAT, body, headers=KEY)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) == {200, 503}, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["Retry-After"].isdigit() and r.json()["error"]["code"] == "overloaded"
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers if r.status_code == 200}) == 1
    assert strict.metrics(KEY)["evotok_requests_rejected_total"] >= 1


def test_timeout_cancels_the_job(strict):
    t0 = time.monotonic()
    r = strict.post(COMP, {"prompt": PROMPT, **SLOW}, headers=KEY)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 30
    with pytest.raises(openai.APIError, match="--timeout"):
        list(strict.client("sk-test").completions.create(model=NAME, prompt=PROMPT, stream=True, extra_body=SLOW))
    status_504 = 'evotok_requests_total{route="/v1/completions",status="504"}'
    m = _wait_metrics(strict, lambda m: m["evotok_live_rows"] == 0 and m.get(CANCELLED % "timeout", 0) >= 2
                      and m.get(status_504, 0) >= 2, headers=KEY)  # the streamed one counts as 504 too
    assert m.get('evotok_requests_total{route="/v1/completions",status="200"}', 0) == 0


# -- shutdown ------------------------------------------------------------------------------------
def _seconds_per_pass(cli, model: Path, gen_length: int) -> float:
    """This machine's time for one forward pass over a `gen_length` canvas, measured now (under whatever else
    runs), with the server's one thread."""
    proc = cli("generate", "-m", str(model), "-p", PROMPT, "--gen-length", str(gen_length), "--block-length",
               str(gen_length), "--steps", "8", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return float(re.search(r"NFE (\d+), \d+ answer tokens in ([0-9.]+)s", proc.stderr).group(2)) / 8


def test_sigterm_finishes_short_requests_cancels_long_ones_and_exits_0(cli, serve_model, tmp_path):
    # margins in forward passes, not seconds: the grace is sized from the pass time measured now, so that the
    # short job's 16 passes fit it about 7 times over and the long job's 900 passes overrun it about 7 times,
    # on a quiet machine and under a competing process alike (a pass of both rows costs up to ~1.2 of the long
    # one's alone)
    short_passes, long_passes = 16, 900
    per_pass = 1.2 * _seconds_per_pass(cli, serve_model, long_passes)
    grace = max(0.5, (short_passes * long_passes) ** 0.5 * per_pass)  # the geometric middle: ~7x either way
    s = Server(tmp_path, "-m", str(serve_model), "--grace", f"{grace:.2f}")
    try:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(s.post, COMP, {"prompt": PROMPT, "gen_length": long_passes,
                                              "block_length": long_passes, "steps": long_passes})
            _wait_metrics(s, lambda m: m["evotok_live_rows"] == 1)
            short = pool.submit(s.post, CHAT, {"messages": USER, "gen_length": short_passes,
                                               "block_length": short_passes, "steps": short_passes})
            _wait_metrics(s, lambda m: m["evotok_live_rows"] == 2)
            s.proc.send_signal(signal.SIGTERM)
            assert short.result().status_code == 200
            r = long.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", (grace, per_pass, r.text)
        assert s.proc.wait(60) == 0
        log = s.log.read_text()
        assert "evotok serve: stopped" in log and "Traceback" not in log
    finally:
        s.kill()


def test_a_second_sigterm_while_draining_exits_0_at_once_without_a_traceback(serve_model, tmp_path):
    s = Server(tmp_path, "-m", str(serve_model), "--grace", "60")
    try:
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/health", timeout=5).status_code != 503:  # draining: the listener lingers
            assert time.monotonic() < deadline, s.log.read_text()
            time.sleep(0.1)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log.read_text()
        assert time.monotonic() - t0 < 20  # not the 60 s grace
        log = s.log.read_text()
        assert "evotok serve: stopped" in log and "Traceback" not in log and "CancelledError" not in log, log
    finally:
        s.kill()


def test_a_port_in_use_is_one_line(cli, serve_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = cli("serve", "-m", str(serve_model), "--port", str(taken.getsockname()[1]))
    assert "cannot listen on 127.0.0.1" in one_line_error(proc)


# -- the page ------------------------------------------------------------------------------------
def test_page_animates_the_evolve_stream_in_chromium(server, client):
    from evotok_cli.viz.style import STATE_COLOURS, STATES
    from tests.test_viz import CHROMIUM_ARGS, browser_page

    sync_playwright, executable = browser_page()
    expected = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                              temperature=0).choices[0].message.content
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url + "/")
            frames = []
            page.expose_function("record", lambda n: frames.append(n))
            page.evaluate("""() => new MutationObserver(() => window.record(
                document.getElementById('canvas').dataset.frames)).observe(
                document.getElementById('canvas'), {attributes: true, attributeFilter: ['data-frames']})""")
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_selector('#status[data-state="done"]', timeout=60_000)
            assert page.inner_text("#answer") == expected
            cells = page.locator("#canvas .cell")
            assert cells.count() == DEFAULTS["gen_length"]
            states = [cells.nth(i).get_attribute("data-state") for i in range(cells.count())]
            assert set(states) <= set(STATES) and "decoded" in states
            decoded = page.locator('#canvas .cell[data-state="decoded"]').first
            rgb = decoded.evaluate("e => getComputedStyle(e).backgroundColor")
            hex_ = STATE_COLOURS["decoded"].lstrip("#")
            assert rgb == "rgb({}, {}, {})".format(*(int(hex_[i:i + 2], 16) for i in (0, 2, 4)))
            assert int(page.get_attribute("#canvas", "data-frames")) == DEFAULTS["steps"]
            assert len(set(frames)) > 1, "the canvas was drawn once, not animated"
            assert all(u.startswith(server.url) for u in requests), requests
            assert not errors, errors
        finally:
            browser.close()


# -- the bundled model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_answers_as_generate(cli, tmp_path):
    prompt = "Sudoku 4x4 (0 = blank):\n0012|0230|4320|0103"
    proc = cli("generate", "-p", prompt, "--json")
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)["results"][0]
    s = Server(tmp_path, "--grace", "0")
    try:
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["evotok-tiny"]
        r = c.chat.completions.create(model="evotok-tiny", messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content == ref["text"] and "\\boxed{3412|1234|4321|2143}" in ref["text"]
        texts, reasons, _ = collect(c.chat.completions.create(
            model="evotok-tiny", messages=[{"role": "user", "content": prompt}], stream=True))
        assert texts == {0: ref["text"]} and reasons == {0: "stop"}
        assert s.stop() == 0
    finally:
        s.kill()
