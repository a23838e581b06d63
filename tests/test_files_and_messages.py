"""Safe reading and writing (evotok_cli/base/files.py), progress in logs, plugin name clashes, and the
behaviours behind the hostile-input matrix that are not errors."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.base.files import atomic_open, atomic_write_text, output_dir, output_file, read_text
from tests.conftest import run_cli

GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]


# -- files ------------------------------------------------------------------------------------------

def test_read_text_names_the_byte_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_text(path, what="prompts file")
    assert "byte 0xe9 on line 2" in info.value.line() and str(path) in info.value.line()


def test_read_text_tells_a_loop_from_a_missing_file(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(DataError, match="symbolic link loop"):
        read_text(tmp_path / "loop")
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "none")


def test_output_checks_create_nothing(tmp_path):
    output_file(tmp_path / "a" / "b" / "out.jsonl", "--out")
    output_dir(tmp_path / "c" / "d", "--out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, so"):
        output_file(tmp_path / "f" / "out.jsonl", "--out")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        output_dir(tmp_path / "f", "--out")
    with pytest.raises(ConfigError, match="already exists"):
        output_file(tmp_path / "f", "--out", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_open_leaves_the_old_file_or_the_new_one_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644  # not mkstemp's 0600


# -- progress in logs -------------------------------------------------------------------------------

class _Printer:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, text: str, **_):
        self.lines.append(text)


def test_plain_progress_prints_each_tenth_and_a_heartbeat():
    from evotok_cli.base.console import PlainProgress

    now = [0.0]
    out = _Printer()
    progress = PlainProgress(out, "bench", 100, every_s=30.0, clock=lambda: now[0])
    for done in range(1, 101):
        progress.update(done)
    assert len(out.lines) == 10 and out.lines[0].startswith("bench: 10/100")
    silent = PlainProgress(out, "generate", None, every_s=30.0, clock=lambda: now[0])
    out.lines.clear()
    for second in range(0, 95, 5):
        now[0] = float(second)
        silent.update(0)
    assert len(out.lines) == 3  # at 30, 60 and 90 s


def test_piped_output_is_not_folded_at_80_columns(tiny_llada):
    # 16 passes for 16 tokens each: "NFE 16, 32 answer tokens" keeps the summary over 80 characters however
    # few digits the timings take on a slow machine (with NFE 4 it is exactly 80 below 10 tok/s)
    gen = ["--gen-length", "16", "--block-length", "16", "--steps", "16"]
    proc = run_cli("generate", "-m", str(tiny_llada), "-p", "hi", "-p", "ho", "--batch-size", "1", *gen)
    assert proc.returncode == 0, proc.stderr
    summary = [ln for ln in proc.stderr.splitlines() if "NFE" in ln]
    assert len(summary) == 1 and "tok/NFE per prompt" in summary[0] and len(summary[0]) > 80
    assert "generate: 1/2 prompts done" in proc.stderr and "generate: 2/2 prompts done" in proc.stderr


# -- generate ---------------------------------------------------------------------------------------

def test_d2f_is_validated_and_reported_without_settings_it_ignores(cli, tiny_llada):
    proc = cli("generate", "-m", str(tiny_llada), "-p", "hi", "-d", "d2f", "--gen-length", "8", "--block-length",
               "3", "--steps", "5", "--opt", "block_size=4", "--json")
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)["params"]
    assert params["gen_length"] == 8 and "block_length" not in params and "steps" not in params
    hard = json.loads(cli("generate", "-m", str(tiny_llada), "-p", "hi", *GEN, "--json").stdout)["params"]
    assert hard["block_length"] == 4 and hard["steps"] == 4


def test_each_result_has_its_own_time(cli, tiny_llada):
    proc = cli("generate", "-m", str(tiny_llada), "-p", "a", "-p", "b", "-p", "c", "--batch-size", "2", *GEN, "--json")
    rows = json.loads(proc.stdout)["results"]
    assert all(r["seconds"] > 0 for r in rows) and "batch_seconds" not in rows[0]


def test_generation_leaves_the_global_rng_alone(tiny_model):
    from evotok_cli.jobs.generation import generate, make_decoder
    from evotok_cli.runtime.prompts import Prompt

    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate(tiny_model, "hard-mask", make_decoder("hard-mask", {}), [Prompt(None, ids=[5, 6, 7])],
             gen_length=8, block_length=4, steps=4, temperature=0.7, seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_interrupted_decode_leaves_no_trace_file(tmp_path, tiny_model):
    from evotok_cli.jobs.generation import generate, make_decoder
    from evotok_cli.runtime.prompts import Prompt

    def stop(_passes: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tiny_model, "evotoken", make_decoder("evotoken", {}), [Prompt(None, ids=[5, 6])], gen_length=8,
                 block_length=4, steps=4, temperature=0.0, seed=0, trace=tmp_path / "t.jsonl", on_pass=stop)
    assert list(tmp_path.iterdir()) == []


def test_env_variable_named_only_when_it_carried_the_value(cli, tiny_llada):
    flag = cli("generate", "-m", str(tiny_llada), "-p", "hi", "--gen-length", "abc", env={"EVOTOK_GEN_LENGTH": "8"})
    env = cli("generate", "-m", str(tiny_llada), "-p", "hi", env={"EVOTOK_GEN_LENGTH": "abc"})
    assert flag.returncode == env.returncode == 2
    assert "EVOTOK_GEN_LENGTH" not in flag.stderr and "'--gen-length'" in flag.stderr
    assert "EVOTOK_GEN_LENGTH" in env.stderr


def test_decoders_takes_the_name_as_an_argument(cli):
    positional, flag = cli("decoders", "evotoken", "--json"), cli("decoders", "--details", "evotoken", "--json")
    assert positional.returncode == 0 and json.loads(positional.stdout) == json.loads(flag.stdout)


# -- bench score: a run killed mid-line ----------------------------------------------------------------

def test_score_says_it_dropped_a_torn_last_line(cli, tmp_path, tiny_llada):
    out = tmp_path / "runs"
    assert cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "2", *GEN, "--out", str(out)).returncode == 0
    path = next(out.glob("samples_*.jsonl"))
    whole = cli("bench", "score", str(out), "--json")
    path.write_bytes(path.read_bytes() + b'{"doc_id": 7, "gener')
    torn = cli("bench", "score", str(out), "--json")
    assert torn.returncode == 0 and "dropped its unfinished last line" in torn.stderr
    document = json.loads(torn.stdout)
    assert document["setups"][0]["n"] == json.loads(whole.stdout)["setups"][0]["n"] == 2
    assert len(document["notes"]) == 1 and json.loads(whole.stdout)["notes"] == []


def test_report_writes_nothing_when_it_fails(cli, tmp_path, tiny_llada, monkeypatch):
    out = tmp_path / "runs"
    assert cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "1", *GEN, "--out", str(out)).returncode == 0
    from evotok_cli.bench import report

    def broken_plot(rows, axis):
        raise ConfigError("no plot today", where="test", fix="none")

    monkeypatch.setattr(report, "plot", broken_plot)
    assert cli("bench", "report", str(out)).returncode == 2
    assert not (out / "report.md").exists() and not (out / "report.png").exists()


# -- plugins that register the same name -----------------------------------------------------------

class _Dist:
    def __init__(self, name: str):
        self.metadata, self.version = {"Name": name}, "1.0"


class _EntryPoint:
    def __init__(self, name: str, package: str, cls: type):
        self.name, self.value, self.dist, self.cls = name, f"{package}:Decoder", _Dist(package), cls

    def load(self) -> type:
        return self.cls


def _decoder(label: str) -> type:
    from evotok_plugins.hard_mask.decoder import HardMaskDecoder
    return type(label, (HardMaskDecoder,), {})


def test_a_name_clash_is_settled_by_a_stated_rule_and_warned_about(monkeypatch):
    from evotok_cli.decoding import registry

    ours, theirs, a, b = _decoder("Ours"), _decoder("Theirs"), _decoder("A"), _decoder("B")
    points = [_EntryPoint("hard-mask", "zz-plugin", theirs), _EntryPoint("hard-mask", "evotok", ours),
              _EntryPoint("fresh", "b-pkg", b), _EntryPoint("fresh", "a-pkg", a)]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: list(points))
    monkeypatch.setattr(registry, "_warned", set())
    entries = registry.discover()
    assert entries["hard-mask"].package == "evotok" and entries["hard-mask"].shadowed == ["zz-plugin 1.0"]
    assert entries["fresh"].package == "a-pkg" and entries["fresh"].shadowed == ["b-pkg 1.0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.get("hard-mask") is ours
        assert registry.get("hard-mask") is ours
        assert registry.get("fresh") is a
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # once per name
    assert "evotok and by zz-plugin 1.0; using evotok's (evotok's own win" in messages[0]
    assert "using a-pkg's (the first package by name wins" in messages[1]
    points.reverse()  # install order does not matter
    assert registry.discover()["fresh"].package == "a-pkg"


def test_results_say_where_they_came_from(cli, tmp_path, tiny_llada):
    proc = cli("generate", "-m", str(tiny_llada), "-p", "hi", *GEN, "-d", "evotoken", "--json")
    params = json.loads(proc.stdout)["params"]
    assert params["runtime"]["torch"] == torch.__version__ and params["runtime"]["dtype"] == "float32"
    assert params["runtime"]["device"] == "cpu" and params["runtime"]["device_name"]
    assert params["versions"]["torch"] and params["decoder_options"]["k_soft"] == 3
    out = tmp_path / "runs"
    assert cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "1", *GEN, "--out", str(out)).returncode == 0
    document = json.loads((out / "results.json").read_text())
    assert document["model"]["runtime"]["torch"] == torch.__version__
    assert document["results"][0]["decoder_options"]["remasking"] == "low_confidence"
