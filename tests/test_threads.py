"""CPU threads (issue 31): the default rule, --threads / EVOTOK_THREADS on the compute commands, the count in
each command's provenance, and `evotok info --system` saying what it will use and why."""

from __future__ import annotations

import json

import pytest
import torch

from evotok_cli.base import threads


@pytest.fixture(autouse=True)
def _threads_restored(monkeypatch):
    """Commands run in this process set torch's threads: each test leaves them as it found them."""
    for key in ("EVOTOK_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def machine(monkeypatch, cores: int, cpus: int | None = None, quota: int | None = None) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: set(range(cpus or cores)))
    monkeypatch.setattr(threads, "physical_cores", lambda _cpus: cores)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: quota)


@pytest.mark.parametrize(("cores", "ranks", "quota", "expected"), [
    (1, 1, None, 1), (2, 1, None, 1), (4, 1, None, 2), (16, 1, None, 8), (64, 1, None, 8),
    (16, 4, None, 2), (2, 2, None, 1), (16, 1, 4, 2),
])
def test_default_is_half_the_usable_cores_split_between_ranks(monkeypatch, cores, ranks, quota, expected):
    machine(monkeypatch, cores, quota=quota)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    choice = threads.choose()
    assert choice.threads == expected
    assert "half of" in choice.reason


def test_asked_for_then_env_then_omp_win_over_the_rule(monkeypatch):
    machine(monkeypatch, 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose().threads == 3 and "OMP_NUM_THREADS" in threads.choose().reason
    monkeypatch.setenv("EVOTOK_THREADS", "5")
    assert threads.choose().threads == 5
    assert threads.choose(7).threads == 7


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", " "])
def test_bad_env_is_one_config_error(monkeypatch, bad):
    from evotok_cli.base.errors import ConfigError

    monkeypatch.setenv("EVOTOK_THREADS", bad)
    if bad.strip() == "":
        assert threads.choose().threads >= 1  # an empty variable is unset
        return
    with pytest.raises(ConfigError, match="EVOTOK_THREADS: threads must be a whole number"):
        threads.choose()


def test_generate_threads_set_torch_and_json_params(cli, tiny_llada):
    r = cli("generate", "-m", str(tiny_llada), "-p", "hi", "--gen-length", "8", "--steps", "4", "--block-length", "8",
            "--threads", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"]["threads"] == 2
    assert torch.get_num_threads() == 2
    r = cli("generate", "-m", str(tiny_llada), "-p", "hi", "--gen-length", "8", "--steps", "4", "--block-length", "8",
            "--json", env={"EVOTOK_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"]["threads"] == 1 and torch.get_num_threads() == 1


def test_bench_records_threads_in_results(cli, tiny_llada, tmp_path):
    r = cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "2", "--gen-length", "8", "--steps", "4",
            "--block-length", "8", "--threads", "1", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "b/results.json").read_text())
    assert doc["config"]["threads"] == 1 and doc["model"]["runtime"]["threads"] == 1


def test_finetune_records_threads_and_may_change_them_on_resume(cli, tiny_llada, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 2 + 3?", "response": "5"}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    common = ("finetune", str(data), "-m", str(tiny_llada), "--out", str(out), "--objective", "sft",
              "--batch-size", "2", "--min-response", "1")
    r = cli(*common, "--max-steps", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "training_args.json").read_text())["threads"] == 1
    r = cli(*common, "--max-steps", "2", "--threads", "2", "--resume")
    assert r.returncode == 0, r.stderr
    args = json.loads((out / "training_args.json").read_text())
    assert args["threads"] == 2
    assert "threads" in json.dumps(args.get("history"))


def test_info_system_says_what_and_why(cli, monkeypatch):
    machine(monkeypatch, 4)
    r = cli("info", "--system", "--json")
    assert r.returncode == 0, r.stderr
    system = json.loads(r.stdout)["system"]
    assert system["threads"] == 2 and system["physical_cores"] == 4 and "half of 4" in system["threads_reason"]
    r = cli("info", "--system", env={"EVOTOK_THREADS": "3"})
    assert r.returncode == 0 and "EVOTOK_THREADS=3" in r.stdout


def test_lmeval_model_args_threads(tiny_llada):
    pytest.importorskip("lm_eval")
    from evotok_cli.lmeval.model import EvotokLM

    lm = EvotokLM.create_from_arg_string(f"model={tiny_llada},threads=1,gen_length=8,steps=4,block_length=8")
    assert lm.settings.threads == 1 and torch.get_num_threads() == 1
    assert lm.get_model_info()["evotok_settings"]["threads"] == 1
