"""`evotok serve` as a drop-in OpenAI server (issue 28): what SDKs send is accepted, ignored or refused as
docs/serve.md's "Differences from OpenAI" table says (the table below is that table, checked both ways);
max_tokens is an upper bound; sampling without a seed samples; logprobs; vLLM's integration endpoints; and
the real clients (openai sync, async and streaming, litellm, LangChain's ChatOpenAI and OpenAI) with their
default settings against a real server on the bundled model, whose default answers equal
`evotok generate --json`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
import openai
import pytest

from tests.conftest import write_llada
from tests.test_serve import Server, collect

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its bundled price list, no network

DEFAULTS = {"gen_length": 16, "block_length": 8, "steps": 16, "prefill": "<reasoning>"}
NAME = "org/tiny-model"  # --served-model-name: a hub-style id with a slash
ORIGIN = "http://app.test"
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "What is 2 + 3?"}]
DOC = Path(__file__).resolve().parents[1] / "docs" / "serve.md"

# -- the table: docs/serve.md's "Differences from OpenAI", row for row ----------------------------------
# (field, endpoints, treatment, a value accepted, a value refused with 400 naming the field or None)
FIELDS = [
    ("max_tokens", "both", "upper bound", 5, 0),
    ("max_completion_tokens", "chat", "upper bound", 5, 0),
    ("gen_length", "both", "evotok", 8, 0),
    ("block_length", "both", "evotok", 8, 3),
    ("steps", "both", "evotok", 8, 3),
    ("decoder", "both", "evotok", "evotoken", "nope"),
    ("options", "both", "evotok", {}, ["alpha"]),
    ("stream_mode", "both", "evotok", None, "frames"),
    ("temperature", "both", "default 0", 0.5, -1),
    ("seed", "both", "fresh when sampling", 7, -1),
    ("top_p", "both", "implemented", 0.9, 0),
    ("top_k", "both", "implemented", 5, -2),
    ("min_p", "both", "implemented", 0.1, 2),
    ("logprobs", "chat", "implemented", True, "yes"),
    ("top_logprobs", "chat", "implemented", 2, 21),
    ("logprobs", "completions", "implemented", 2, 21),
    ("store", "both", "ignored", True, None),
    ("metadata", "both", "ignored", {"k": "v"}, None),
    ("user", "both", "ignored", "u-1", None),
    ("service_tier", "both", "ignored", "auto", None),
    ("parallel_tool_calls", "both", "ignored", True, None),
    ("prediction", "both", "ignored", {"type": "content", "content": "x"}, None),
    ("reasoning_effort", "both", "ignored", "low", None),
    ("safety_identifier", "both", "ignored", "s-1", None),
    ("prompt_cache_key", "both", "ignored", "k-1", None),
    ("stream_options", "both", "ignored without stream", {"include_usage": True}, None),
    ("frequency_penalty", "both", "neutral only", 0, 0.5),
    ("presence_penalty", "both", "neutral only", 0, 0.5),
    ("repetition_penalty", "both", "neutral only", 1, 1.2),
    ("ignore_eos", "both", "neutral only", False, True),
    ("min_tokens", "both", "neutral only", 0, 5),
    ("logit_bias", "both", "neutral only", {}, {"5": 10}),
    ("response_format", "chat", "neutral only", {"type": "text"}, {"type": "json_object"}),
    ("tools", "chat", "neutral only", [], [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "chat", "neutral only", "none", "required"),
    ("functions", "chat", "neutral only", [], [{"name": "f"}]),
    ("function_call", "chat", "neutral only", "auto", {"name": "f"}),
    ("modalities", "chat", "neutral only", ["text"], ["text", "audio"]),
    ("audio", "chat", "neutral only", None, {"voice": "alloy"}),
    ("web_search_options", "chat", "neutral only", None, {}),
    ("echo", "completions", "neutral only", False, True),
    ("best_of", "completions", "neutral only", 1, 2),
    ("suffix", "completions", "neutral only", "", "x"),
    ("any other field", "both", "ignored with a warning", 1, None),
]
# message shapes of agent traffic: (name, message list, param of the 400 or None when accepted)
MESSAGES = [
    ("assistant-content-null", [*USER, {"role": "assistant", "content": None}, *USER], None),
    ("tool-role", [*USER, {"role": "assistant", "content": None, "tool_calls": []},
                   {"role": "tool", "content": "5", "tool_call_id": "c1"}, *USER], None),
    ("text-parts", [{"role": "user", "content": [{"type": "text", "text": "2 +"}, {"type": "text", "text": "3?"}]}],
     None),
    ("name-and-refusal", [{"role": "user", "content": "hi", "name": "ann"},
                          {"role": "assistant", "content": "hello", "refusal": None}, *USER], None),
    ("user-content-null", [{"role": "user", "content": None}], "messages[0].content"),
    ("image-part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
    ("tool-calls", [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, *USER],
     "messages[1].tool_calls"),
]


def request_for(field: str, endpoint: str, value) -> tuple[str, dict]:
    path = COMP if endpoint == "completions" else CHAT
    body: dict = {"prompt": "2 + 3 ="} if path == COMP else {"messages": USER}
    key = "an_unknown_field" if field == "any other field" else field
    if value is not None:
        body[key] = value
    if field == "stream_mode":
        body["stream"] = True
    if field == "top_logprobs":
        body["logprobs"] = True
    return path, body


def doc_table() -> list[tuple[str, str, str]]:
    """(field, endpoints, treatment) of each row of docs/serve.md's "Differences from OpenAI" table."""
    text = DOC.read_text()
    section = text.split("## Differences from OpenAI", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| field")]
    out = []
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.append((cells[0].strip("`"), cells[1], cells[2]))
    return out


def test_the_docs_table_is_the_tested_table():
    assert doc_table() == [(f, e, t) for f, e, t, _, _ in FIELDS]


@pytest.mark.parametrize("row", FIELDS, ids=[f"{r[0]}-{r[1]}" for r in FIELDS])
def test_each_field_is_accepted_or_refused_as_the_table_says(server, row):
    """The accepted value parses with nothing ignored (or, for an unknown field, ignored, and refused under
    --strict); the refused value is a 400 from the server naming the field, before anything is decoded."""
    from evotok_cli.serve.schema import ApiError, parse_chat, parse_completion

    field, endpoint, treatment, good, bad_value = row
    for point in (("chat", "completions") if endpoint == "both" else (endpoint,)):
        parse = parse_chat if point == "chat" else parse_completion
        path, body = request_for(field, point, good)
        fields = parse(body)
        assert fields.ignored == (["an_unknown_field"] if treatment == "ignored with a warning" else [])
        if treatment == "ignored with a warning":
            with pytest.raises(ApiError) as strict:
                parse(body, strict=True)
            assert strict.value.status == 400 and strict.value.code == "unknown_field"
        if bad_value is not None:
            r = server.post(*request_for(field, point, bad_value))
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            if treatment == "neutral only":
                assert r.json()["error"]["code"] == "unsupported"
    if bad_value is None and treatment not in ("ignored", "ignored with a warning", "ignored without stream"):
        pytest.fail(f"{field}: a treatment with nothing refused")


@pytest.mark.parametrize("name,messages,param", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_message_shapes_of_agent_traffic(name, messages, param):
    from evotok_cli.serve.schema import ApiError, parse_chat

    if param is None:
        parsed = parse_chat({"messages": messages}).prompts[0].messages
        assert all(isinstance(m["content"], str) for m in parsed)
        return
    with pytest.raises(ApiError) as refused:
        parse_chat({"messages": messages})
    assert refused.value.status == 400 and refused.value.param == param


# -- a real server on a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer_dir) -> Path:
    folder = write_llada(tmp_path_factory.mktemp("dropin") / "llada", tokenizer_dir, max_length=1024)
    (folder / "generation_config.json").write_text(json.dumps({"evotok": DEFAULTS}))
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "-m", str(tiny_folder), "--served-model-name", NAME,
               "--allowed-origins", ORIGIN, "--grace", "0")
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_every_accepted_value_together_is_one_ordinary_answer(server):
    """All accepted values of the table at once: 200, no warning, the text of a plain request."""
    for endpoint in ("chat", "completions"):
        path, plain = request_for("model", endpoint, None)
        body = dict(plain)
        for field, point, treatment, good, _ in FIELDS:
            if point in ("both", endpoint) and treatment in ("ignored", "neutral only") and good is not None:
                body[field] = good
        r, ref = server.post(path, body), server.post(path, plain)
        assert r.status_code == 200 and "warning" not in r.headers, r.text
        key = "message" if endpoint == "chat" else "text"
        assert r.json()["choices"][0][key] == ref.json()["choices"][0][key]


def test_unknown_fields_are_ignored_with_a_warning_header_and_a_log_line(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
            "max_tokens": 4, "guided_json": {"x": 1}}
    r = server.post(CHAT, body)
    assert r.status_code == 200
    assert r.headers["warning"] == '299 evotok "unknown fields ignored: messages[0].content[0].cache_control, guided_json"'
    log = server.log.read_text()
    assert "warning: /v1/chat/completions: unknown fields ignored: messages[0].content[0].cache_control, guided_json" in log


def test_strict_refuses_unknown_fields(tiny_model):
    from starlette.testclient import TestClient

    from evotok_cli.jobs.config import GENERATE_DEFAULTS
    from evotok_cli.serve.app import create_app
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    service = Service(Served(tiny_model, "tiny", None, "hard-mask", dict(GENERATE_DEFAULTS)), max_rows=2,
                      max_queue=2, timeout=30)
    with TestClient(create_app(service, api_key=None, decoders=["hard-mask"], strict=True)) as http:
        r = http.post(CHAT, json={"messages": USER, "store": True, "guided_json": {}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
        assert r.json()["error"]["code"] == "unknown_field"
        assert http.options(CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}).status_code \
            == 405  # CORS is off without --allowed-origins


def test_max_tokens_is_an_upper_bound(server):
    """Every max_tokens is accepted; answers never exceed it; at or above the default length (16) it is the
    default answer; below, the canvas is whole blocks of 8 holding it."""
    default = server.post(COMP, {"prompt": "2 + 3 ="}).json()
    full = default["choices"][0]["text"]
    for cap in (1, 5, 8, 9, 15, 16, 100, 10**6):
        r = server.post(COMP, {"prompt": "2 + 3 =", "max_tokens": cap}).json()
        choice, settings = r["choices"][0], r["evotok"]["settings"]
        assert r["usage"]["completion_tokens"] <= cap
        assert settings["gen_length"] == (8 if cap <= 8 else 16) and settings["steps"] == settings["gen_length"]
        if cap >= 16:
            assert choice["text"] == full and choice["finish_reason"] == default["choices"][0]["finish_reason"]
    exact = server.post(COMP, {"prompt": "2 + 3 =", "gen_length": 24, "block_length": 8, "steps": 24}).json()
    assert exact["evotok"]["settings"]["gen_length"] == 24


def test_a_cut_answer_says_length_and_streams_the_same_text(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="Tom has 12 apples and", max_tokens=16)
    assert whole.usage.completion_tokens >= 3, "the tiny model's answer is too short to cut"
    exact = {"gen_length": 16}  # the default canvas, so that the cut answer is the whole one's beginning
    cut = client.completions.create(model=NAME, prompt="Tom has 12 apples and", max_tokens=2, extra_body=exact)
    assert cut.usage.completion_tokens == 2 and cut.choices[0].finish_reason == "length"
    assert whole.choices[0].text.startswith(cut.choices[0].text) and cut.choices[0].text != whole.choices[0].text
    texts, reasons, _ = collect(client.completions.create(model=NAME, prompt="Tom has 12 apples and", max_tokens=2,
                                                          stream=True, extra_body=exact))
    assert texts == {0: cut.choices[0].text} and reasons == {0: "length"}


def test_sampling_without_a_seed_draws_a_fresh_one_that_reproduces(server):
    client = server.client()
    body = dict(model=NAME, messages=USER, temperature=1.0, max_tokens=16)
    a, b = client.chat.completions.create(**body), client.chat.completions.create(**body)
    seed_a, seed_b = a.model_extra["evotok"]["settings"]["seed"], b.model_extra["evotok"]["settings"]["seed"]
    assert seed_a != seed_b
    again = client.chat.completions.create(**body, seed=seed_a)
    assert again.choices[0].message.content == a.choices[0].message.content
    n = client.chat.completions.create(**body, n=3)
    seeds = n.model_extra["evotok"]["seeds"]
    assert len(set(seeds)) == 3 and seeds[0] == n.model_extra["evotok"]["settings"]["seed"]
    greedy = client.chat.completions.create(model=NAME, messages=USER)
    assert greedy.model_extra["evotok"]["settings"]["seed"] == 0  # greedy: the default, never read
    top = client.completions.create(model=NAME, prompt="2 + 3 =", temperature=1.0, seed=2**63 - 1, n=2, max_tokens=2)
    assert top.model_extra["evotok"]["seeds"][0] == 2**63 - 1 and max(top.model_extra["evotok"]["seeds"]) < 2**63
    hot = [client.completions.create(model=NAME, prompt="2 + 3 =", temperature=5.0).choices[0].text for _ in range(3)]
    assert len(set(hot)) > 1, hot  # unseeded sampled requests differ


def test_sampling_filters_reach_the_decoder(server):
    client = server.client()
    top1 = client.completions.create(model=NAME, prompt="2 + 3 =", temperature=5.0, seed=1, extra_body={"top_k": 1})
    greedy = client.completions.create(model=NAME, prompt="2 + 3 =")
    hot = client.completions.create(model=NAME, prompt="2 + 3 =", temperature=5.0, seed=1)
    assert top1.choices[0].text == greedy.choices[0].text  # top_k 1 leaves only the argmax to draw
    assert hot.choices[0].text != greedy.choices[0].text  # the filter did something
    assert top1.model_extra["evotok"]["settings"]["top_k"] == 1


def test_logprobs_in_openai_shapes(server):
    client = server.client()
    chat = client.chat.completions.create(model=NAME, messages=USER, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3 and item.bytes == list(item.token.encode())
        # greedy hard-mask commits the most probable token of its pass
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    comp = client.completions.create(model=NAME, prompt="2 + 3 =", logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[:1] == [0]
    texts, _, chunks = collect(client.chat.completions.create(model=NAME, messages=USER, logprobs=True, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content] and texts[0] == chat.choices[0].message.content
    plain = client.chat.completions.create(model=NAME, messages=USER)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


def test_models_tokenize_version_and_head(server):
    client = server.client()
    card = client.models.retrieve(NAME)
    assert [m.id for m in client.models.list().data] == [NAME]
    assert card.model_extra["max_model_len"] == 1024 and "max_tokens" in card.model_extra["evotok"]["canvas_rule"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llada", messages=USER)  # the folder's name is not the id any more
    chat = client.chat.completions.create(model=NAME, messages=USER, max_tokens=2)
    tok = httpx.post(server.url + "/tokenize", json={"model": NAME, "messages": USER}).json()
    assert tok["count"] == len(tok["tokens"]) == chat.usage.prompt_tokens and tok["max_model_len"] == 1024
    raw = httpx.post(server.url + "/tokenize", json={"prompt": "2 + 3 =", "return_token_strs": True}).json()
    assert raw["count"] == client.completions.create(model=NAME, prompt="2 + 3 =", max_tokens=1).usage.prompt_tokens
    assert len(raw["token_strs"]) == raw["count"]
    back = httpx.post(server.url + "/detokenize", json={"tokens": raw["tokens"]}).json()["prompt"]
    assert back.endswith("2 + 3 =")
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
    assert httpx.get(server.url + "/version").json()["version"]
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""


def test_cors_answers_preflight_for_allowed_origins_only(server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.url + CHAT, headers={"Origin": ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(server.url + CHAT, headers={"Origin": "http://evil.test", **pre})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_metrics_time_to_first_token_queue_time_and_outcomes(server):
    def count(name: str) -> float:
        return server.metrics().get(name, 0.0)

    before = {k: count(k) for k in ("evotok:time_to_first_token_seconds_count", "evotok:request_queue_time_seconds_count",
                                    "evotok:e2e_request_latency_seconds_count")}
    client = server.client()
    client.chat.completions.create(model=NAME, messages=USER, max_tokens=2)
    list(client.chat.completions.create(model=NAME, messages=USER, stream=True))
    m = server.metrics()
    for name, seen in before.items():
        assert m[name] == seen + 2, name
    assert sum(v for k, v in m.items() if k.startswith("evotok:request_success_total")) >= 2
    assert "evotok:num_requests_running" in m and "evotok:num_requests_waiting" in m


def test_the_page_works_under_a_path_prefix(tiny_model):
    """The page's requests are relative: mounted at /evotok/, it posts to /evotok/v1/chat/completions."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from evotok_cli.serve.app import create_app
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    defaults = {**DEFAULTS, "temperature": 0.0, "seed": 0}
    service = Service(Served(tiny_model, "tiny", None, "hard-mask", defaults), max_rows=2, max_queue=2, timeout=30)
    outer = Starlette(routes=[Mount("/evotok", app=create_app(service, api_key=None, decoders=["hard-mask"]))])
    with TestClient(outer) as http:
        page = http.get("/evotok/").text
        urls = re.findall(r"fetch\('([^']+)'", page)
        assert urls and not any(u.startswith("/") for u in urls)
        target = urljoin("http://testserver/evotok/", urls[0])
        assert target == "http://testserver/evotok/v1/chat/completions"
        assert http.post(target, json={"messages": USER, "max_tokens": 2}).status_code == 200
    service.stop(10)


def test_sigterm_keeps_the_listener_open_answering_503_through_the_grace(tiny_folder, tmp_path):
    s = Server(tmp_path, "-m", str(tiny_folder), "--grace", "4")
    try:
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.5)
        health = httpx.get(s.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        r = s.post(CHAT, {"messages": USER})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert s.proc.wait(30) == 0
        assert time.monotonic() - t0 >= 3.5  # the listener stayed for the grace period
    finally:
        s.kill()


# -- the real clients with their defaults, on the bundled model -------------------------------------------
BUNDLED = "evotok-tiny"
QUESTION = "Sudoku 4x4 (0 = blank):\n0012|0230|4320|0103"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("bundled"), "--grace", "0")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def reference(bundled) -> dict:
    """`evotok generate --json`'s answer to QUESTION with every default (a process of its own)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "evotok_cli", "generate", "-p", QUESTION, "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["results"][0]


@pytest.mark.slow
def test_openai_sync_with_defaults_and_max_tokens_1(bundled, reference):
    client = openai.OpenAI(base_url=bundled.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=BUNDLED, messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == reference["text"] and "\\boxed{3412|1234|4321|2143}" in reference["text"]
    one = client.chat.completions.create(model=BUNDLED, messages=[{"role": "user", "content": QUESTION}], max_tokens=1,
                                         logprobs=True, top_logprobs=2)
    assert one.usage.completion_tokens <= 1 and one.choices[0].finish_reason in ("length", "stop")
    content = one.choices[0].logprobs.content  # logprobs on the bundled model: the greedy pick is the top one
    assert len(content) == one.usage.completion_tokens
    assert all(c.top_logprobs[0].token == c.token and c.logprob <= 0 for c in content)


@pytest.mark.slow
def test_openai_streaming_adds_up_to_generate(bundled, reference):
    client = openai.OpenAI(base_url=bundled.url + "/v1", api_key="unused")
    texts, reasons, _ = collect(client.chat.completions.create(
        model=BUNDLED, messages=[{"role": "user", "content": QUESTION}], stream=True))
    assert texts == {0: reference["text"]} and reasons == {0: "stop"}


@pytest.mark.slow
def test_openai_async_client(bundled):
    async def ask() -> list[str]:
        client = openai.AsyncOpenAI(base_url=bundled.url + "/v1", api_key="unused")
        answers = await asyncio.gather(*[client.chat.completions.create(
            model=BUNDLED, messages=[{"role": "user", "content": QUESTION}], max_tokens=10) for _ in range(2)])
        await client.close()
        return answers

    a, b = asyncio.run(ask())
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 10


@pytest.mark.slow
def test_litellm_with_max_tokens_100(bundled, reference):
    import litellm

    r = litellm.completion(model=f"openai/{BUNDLED}", api_base=bundled.url + "/v1", api_key="unused",
                           messages=[{"role": "user", "content": QUESTION}], max_tokens=100, timeout=300)
    assert r.choices[0].message.content == reference["text"]
    assert r.usage.completion_tokens <= 100


@pytest.mark.slow
def test_langchain_chat_openai_with_defaults(bundled, reference):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=BUNDLED, base_url=bundled.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    assert llm.invoke(QUESTION).content == reference["text"]


@pytest.mark.slow
def test_langchain_openai_completions_with_defaults(bundled):
    """LangChain's OpenAI class sends max_tokens 256 (over the bundled model's context) and temperature 0.7."""
    from langchain_openai import OpenAI

    llm = OpenAI(model=BUNDLED, base_url=bundled.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    answer = llm.invoke("2 + 3 =")
    assert isinstance(answer, str)
    log = bundled.log.read_text()
    assert '"POST /v1/completions" 200' in log
