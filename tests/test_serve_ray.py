"""`evotok serve --replicas N` on Ray Serve (issue 26): a local Ray cluster started by the server process
itself (its temporary folder under tmp_path, free ports, loopback only), two CPU replicas of the bundled model.

The Ray-served app answers exactly the single-process server's texts for 16 concurrent requests, spread over
both replicas; /metrics covers both; --api-key holds at the ingress; a replica killed under load costs at most
the requests it held (a clean error each), the other keeps answering, Ray starts a new one, and nothing
hangs; `bench --endpoint` scores the same against both servers; autoscaling goes from 1 to 2 replicas under
load; SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import ray  # noqa: F401 - the test extra installs ray[serve]: a missing one must fail the suite, not skip it

from tests.test_serve import Server

pytestmark = pytest.mark.slow
KEY = "sk-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [f"{a} + {b} =" for a in range(1, 5) for b in range(3, 7)]  # 16 prompts
BODY = {"max_tokens": 16}


@contextmanager
def ray_env(tmp: Path):
    """Ray's temporary folder inside the test's (its sockets and logs never land in /tmp/ray)."""
    folder = tmp / "r"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("RAY_TMPDIR")
    os.environ.update(RAY_TMPDIR=str(folder), RAY_USAGE_STATS_ENABLED="0")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


@pytest.fixture(scope="module")
def short_tmps():
    """Folders with short paths (Ray's socket paths must stay under 107 bytes), removed at the end."""
    import shutil
    import tempfile

    made: list[Path] = []
    yield lambda: made.append(Path(tempfile.mkdtemp(prefix="evr", dir="/tmp"))) or made[-1]
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), "--max-rows", "8", "--grace", "1", "--api-key", KEY)
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def replicated(short_tmps):
    tmp = short_tmps()
    with ray_env(tmp):
        s = Server(tmp, "--replicas", "2", "--max-rows", "8", "--grace", "2", "--api-key", KEY, ready_s=240)
    wait_running(s)
    yield s
    assert s.stop() == 0, s.log.read_text()
    assert "evotok serve: stopped" in s.log.read_text()


def wait_running(server: Server, timeout: float = 240) -> None:
    """/health answers before every replica is up; the start line says the application runs."""
    deadline = time.monotonic() + timeout
    while "as Ray Serve replicas" not in server.log.read_text():
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.5)


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": prompt, **BODY, **extra}, headers=AUTH, timeout=120)


def replica_of(response: httpx.Response) -> tuple[str, int]:
    name, pid = response.headers["x-evotok-replica"].split()
    return name, int(pid)


def test_sixteen_concurrent_requests_answer_the_single_process_texts(replicated, single):
    def texts(server: Server) -> list[str]:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: client.completions.create(model="evotok-tiny", prompt=p, max_tokens=16),
                                    PROMPTS))
        return [a.choices[0].text for a in answers]

    assert texts(replicated) == texts(single)
    with ThreadPoolExecutor(16) as pool:
        replicas = {replica_of(r)[0] for r in pool.map(lambda p: complete(replicated.url, p), PROMPTS)}
    assert len(replicas) == 2  # both replicas took requests


def test_the_key_is_required_and_metrics_cover_every_replica(replicated):
    assert httpx.post(replicated.url + "/v1/completions", json={"prompt": "1 +"}, timeout=30).status_code == 401
    assert httpx.get(replicated.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(replicated.url + "/health", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(replicated.url + "/metrics", headers=AUTH, timeout=30).text
        labels = {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if 'replica="' in line}
        if len(labels) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(labels) == 2, text
    assert text.count("# TYPE evotok_requests_total counter") == 1


def test_bench_endpoint_scores_the_same_against_both_servers(cli, replicated, single, tmp_path):
    documents = []
    for server in (single, replicated):
        proc = cli("bench", "arith-small", "--limit", "4", "--endpoint", server.url + "/v1", "--api-key", KEY,
                   "--out", str(tmp_path / str(server.port)), "--json", "--concurrency", "4")
        assert proc.returncode == 0, proc.stderr
        documents.append(json.loads(proc.stdout))
    rows = [[(r["n"], r["correct"], r["mean_nfe"], r["tokens"]) for r in d["results"]] for d in documents]
    assert rows[0] == rows[1]
    generations = [sorted(json.loads(line)["generation"] for line in
                          (tmp_path / str(s.port) / "samples_arith-small_hard-mask.jsonl").read_text().splitlines())
                   for s in (single, replicated)]
    assert generations[0] == generations[1]


def test_a_replica_killed_under_load_costs_only_its_requests(replicated):
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        name, pid = replica_of(httpx.get(replicated.url + "/health", timeout=30))
        seen[name] = pid
    victim_name, victim = sorted(seen.items())[0]
    body = {"gen_length": 48, "block_length": 16, "steps": 48}

    def one(i: int) -> tuple[int, str | None]:
        try:
            r = complete(replicated.url, PROMPTS[i % 16], **body)
        except httpx.HTTPError as exc:  # a dropped connection is a clean error too, as long as it ends
            return -1, type(exc).__name__
        return r.status_code, (replica_of(r)[0] if r.status_code == 200 else r.text[:200])

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)  # a replica process of this test's own cluster
        results = [f.result(timeout=180) for f in futures]  # nothing hangs
    assert time.monotonic() - started < 180
    ok = [who for status, who in results if status == 200]
    failed = [(status, why) for status, why in results if status != 200]
    assert ok, results
    assert all(status in (-1, 500, 502, 503, 504) for status, _ in failed), failed
    assert all(json.loads(why)["error"] if status >= 500 and why and why.startswith("{") else True
               for status, why in failed)
    deadline = time.monotonic() + 120  # Ray starts a replica in place of the dead one
    names: set[str] = set()
    while time.monotonic() < deadline:
        r = complete(replicated.url, PROMPTS[0])
        assert r.status_code == 200, r.text
        names.add(replica_of(r)[0])
        if len(names - {victim_name}) >= 2:
            break
        time.sleep(0.5)
    assert len(names - {victim_name}) >= 2, names


def test_autoscaling_goes_from_one_to_two_replicas_under_load(short_tmps):
    tmp = short_tmps()
    with ray_env(tmp):
        s = Server(tmp, "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
                   "--max-rows", "4", "--grace", "1", ready_s=240)
    try:
        wait_running(s)
        names: set[str] = set()
        deadline = time.monotonic() + 120
        body = {"gen_length": 48, "block_length": 16, "steps": 48}
        with ThreadPoolExecutor(8) as pool:
            while len(names) < 2 and time.monotonic() < deadline:
                answers = list(pool.map(lambda p: httpx.post(s.url + "/v1/completions", json={"prompt": p, **body},
                                                             timeout=120), PROMPTS[:8]))
                assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
                names |= {replica_of(a)[0] for a in answers}
        assert len(names) == 2, names
    finally:
        assert s.stop() == 0, s.log.read_text()


def test_a_model_that_fails_to_load_in_the_replicas_is_one_line(short_tmps):
    """The folder passes the checks made before Ray starts (config, tokenizer), but its weights are cut
    short: every replica fails in its constructor, Ray gives up, and the command says why in one line."""
    import shutil
    import subprocess
    import sys

    from evotok_cli.jobs.config import model_folder

    tmp = short_tmps()
    folder = tmp / "evotok-tiny"
    shutil.copytree(model_folder(None), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}
    env.update(RAY_TMPDIR=str(tmp / "r"), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    (tmp / "r").mkdir()
    proc = subprocess.run([sys.executable, "-m", "evotok_cli", "serve", "-m", str(folder), "--replicas", "1",
                           "--port", "0"], capture_output=True, text=True, timeout=240, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(errors) == 1 and "the replicas did not start" in errors[0], proc.stderr
    assert "unreadable safetensors file" in errors[0] and errors[0].endswith(")"), errors


def test_without_ray_replicas_is_one_line(cli, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    proc = cli("serve", "--replicas", "2", "--port", "0")
    assert proc.returncode == 2 and 'pip install -e ".[ray]"' in proc.stderr and proc.stdout == ""
