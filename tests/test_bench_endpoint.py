"""`evotok bench --endpoint URL`: against `evotok serve` on the bundled model it writes the sample lines and
scores of a local bench; against a plain OpenAI-compatible server it scores the server's text; 503s and
dropped connections are retried, and a server that goes away mid-run leaves a folder the same command
resumes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import evotok_cli.bench.endpoint as endpoint
from tests.hostile.bench_endpoint import KEY, FakeServer
from tests.test_serve import Server

SAME = ("doc_id", "prompt", "generation", "extracted", "target", "correct", "nfe", "tokens", "task", "decoder", "sweep")
ARGS = ["bench", "arith-small", "--limit", "4", "-d", "hard-mask", "-d", "evotoken", "--sweep", "alpha=0.6"]


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "--max-rows", "8", "--grace", "1")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The local bench of ARGS (in a subprocess-free run of its own)."""
    return tmp_path_factory.mktemp("local")


def lines(folder: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for path in folder.glob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[(path.name, record["doc_id"])] = {k: record.get(k) for k in SAME}
    return out


def scores(document: dict) -> list[tuple]:
    return [(r["task"], r["decoder"], r["label"], r["n"], r["correct"], r["accuracy"], r["mean_nfe"], r["tokens"])
            for r in document["results"]]


def test_endpoint_scores_exactly_what_local_bench_scores(cli, bundled_server, local, tmp_path):
    here = cli(*ARGS, "--out", str(local), "--json")
    assert here.returncode == 0, here.stderr
    there = cli(*ARGS, "--out", str(tmp_path), "--json", "--endpoint", bundled_server.url + "/v1",
                "--concurrency", "3")
    assert there.returncode == 0, there.stderr
    a, b = json.loads(here.stdout), json.loads(there.stdout)
    assert scores(a) == scores(b) and len(scores(a)) == 2
    assert lines(local) == lines(tmp_path) and len(lines(local)) == 8
    model = b["model"]
    assert model["endpoint"] == bundled_server.url and model["kind"] == "evotok"
    assert model["models"]["data"][0]["id"] == "evotok-tiny" and "evotok" in model["models"]["data"][0]
    assert b["config"]["endpoint"] == bundled_server.url and b["config"]["concurrency"] == 3


def test_a_server_gone_mid_run_resumes_with_the_same_command(cli, local, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(endpoint, "BACKOFF_S", (0.05,))  # a dead server fails in a fraction of a second
    first = Server(tmp_path_factory.mktemp("logs"), "--max-rows", "2", "--grace", "1")
    samples = tmp_path / "samples_arith-small_hard-mask.jsonl"

    def kill_after_first_answer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 1):
            time.sleep(0.05)
        first.kill()

    killer = threading.Thread(target=kill_after_first_answer)
    killer.start()
    args = ["bench", "arith-small", "--limit", "4", "--out", str(tmp_path), "--concurrency", "1"]
    broken = cli(*args, "--endpoint", first.url + "/v1")
    killer.join()
    assert broken.returncode == 2 and "cannot reach" in broken.stderr and "Traceback" not in broken.stderr
    kept = samples.read_text().count("\n")
    assert 1 <= kept < 4 and not (tmp_path / "results.json").exists()
    second = Server(tmp_path_factory.mktemp("logs"), "--max-rows", "2", "--grace", "1")  # another port
    try:
        resumed = cli(*args, "--endpoint", second.url + "/v1", "--json")
    finally:
        assert second.stop() == 0
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming, {kept} of 4 items already done" in resumed.stderr
    if not lines(local):  # run alone (-k): the local reference first
        assert cli(*ARGS, "--out", str(local)).returncode == 0
    reference = {k: v for k, v in lines(local).items() if "hard-mask" in k[0]}
    assert lines(tmp_path) == reference


def test_a_plain_server_is_scored_on_its_text_and_503s_are_retried(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(endpoint, "BACKOFF_S", (0.01,))
    fake = FakeServer(text="4", fail_first=3)
    try:
        proc = cli("bench", "arith-small", "--limit", "3", "--out", str(tmp_path), "--endpoint", fake.url,
                   "--api-key", KEY, "--json", "--temperature", "0.5", "--seed", "7")
    finally:
        fake.close()
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    row = document["results"][0]
    assert row["decoder"] == "server" and row["n"] == 3 and row["settings"]["source"] == "server"
    assert document["model"]["kind"] == "openai" and document["model"]["served_model"] == "plain-model"
    assert sorted(b["seed"] for b in fake.bodies) == [7, 8, 9]  # seed + doc_id, as a local bench samples
    assert all(isinstance(b["prompt"], str) and b["max_tokens"] == 48 and b["temperature"] == 0.5
               and "decoder" not in b for b in fake.bodies)
    records = [json.loads(line) for line in (tmp_path / "samples_arith-small_server.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == ["4"] * 3


def test_retries_are_bounded(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(endpoint, "BACKOFF_S", (0.01,))
    fake = FakeServer(fail_first=1000)
    try:
        proc = cli("bench", "arith-small", "--limit", "1", "--out", str(tmp_path), "--endpoint", fake.url,
                   "--api-key", KEY)
    finally:
        fake.close()
    assert proc.returncode == 2 and f"after {endpoint.RETRIES + 1} tries" in proc.stderr
    assert 1000 - fake.fail_left == endpoint.RETRIES + 1
    assert not list(tmp_path.glob("samples_*"))
