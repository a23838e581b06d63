"""`evotok bench` that finishes (issue 31, item 2): the default batch size, progress inside a batch (passes,
rate, ETA) on a terminal and as plain lines in a log, rank 0 only, and --help listing every run option."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from evotok_cli.bench import batching
from evotok_cli.bench.command import BenchProgress, eta

GEN = ["--gen-length", "8", "--steps", "4", "--block-length", "8"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_run(steps: int = 48) -> SimpleNamespace:
    return SimpleNamespace(name="sudoku4-hard-mask", label="", decoder_name="hard-mask",
                           task=SimpleNamespace(name="sudoku4"), settings={"steps": steps})


def piped() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_a_long_batch_prints_passes_rate_and_eta_every_30_s_in_a_log():
    console, buffer = piped()
    clock, run = Clock(), fake_run(steps=48)
    with BenchProgress(console, clock=clock) as progress:
        for n in range(1, 49):  # one batch of 16 items out of 50, one pass a second
            clock.now = float(n)
            progress.on_pass(run, n, 16, 0, 50)
    lines = buffer.getvalue().splitlines()
    assert lines, "nothing printed during a 48 s batch"
    # 30 s after the first pass: 31 passes of 48 for 16 items = 10 items' work more in 30 s, 39.7 items to go
    assert lines[0] == "sudoku4 hard-mask: 0/50 items, batch of 16 at pass 31/48, 1.0 passes/s, ETA 1:59 (30 s)"


def test_items_finished_print_per_tenth_and_nothing_when_disabled():
    console, buffer = piped()
    run = fake_run()
    with BenchProgress(console, clock=Clock()) as progress:
        for done in (5, 10, 15, 50):
            progress.on_batch(run, done, 50)
    assert [ln.split(",")[0] for ln in buffer.getvalue().splitlines()] == [
        "sudoku4 hard-mask: 5/50 items", "sudoku4 hard-mask: 10/50 items", "sudoku4 hard-mask: 15/50 items",
        "sudoku4 hard-mask: 50/50 items"]
    console, buffer = piped()
    with BenchProgress(console, enabled=False) as progress:  # a rank other than 0
        progress.on_batch(run, 50, 50)
        progress.on_pass(run, 4, 2, 0, 50)
    assert buffer.getvalue() == ""


def test_terminal_bar_shows_the_batch_pass():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    clock, run = Clock(), fake_run(steps=8)
    with BenchProgress(console, clock=clock) as progress:
        clock.now = 1.0
        progress.on_pass(run, 3, 4, 0, 8)
        progress.bar.refresh()
        text = buffer.getvalue()
    assert "0/8 items" in text and "batch of 4 at pass 3/8" in text


def test_eta_format():
    assert eta(None) == "ETA ?" and eta(65) == "ETA 1:05" and eta(3725) == "ETA 1:02:05"


@pytest.mark.parametrize(("count", "largest", "expected"), [(50, 16, 13), (16, 16, 16), (17, 16, 9), (3, 16, 3),
                                                          (200, 16, 16), (0, 16, 16)])
def test_even_batches(count, largest, expected):
    assert batching.even_batches(count, largest) == expected


def test_default_batch_size_cpu_and_cuda(monkeypatch):
    model = SimpleNamespace(device=SimpleNamespace(type="cpu"), vocab_size=126464,
                            config=SimpleNamespace(hidden_size=4096))
    monkeypatch.setattr(batching, "available_bytes", lambda device: 64 * 2**30)
    assert batching.default_batch_size(model, 400) == batching.CPU_DEFAULT
    monkeypatch.setattr(batching, "available_bytes", lambda device: 2 * 2**30)  # a small host: fewer rows
    assert 1 <= batching.default_batch_size(model, 400) < batching.CPU_DEFAULT
    model.device = SimpleNamespace(type="cuda")
    monkeypatch.setattr(batching, "available_bytes", lambda device: 60 * 2**30)  # an 80 GB card after an 8B load
    assert 16 <= batching.default_batch_size(model, 400) <= batching.MAX_ROWS
    monkeypatch.setattr(batching, "available_bytes", lambda device: 2**20)
    assert batching.default_batch_size(model, 400) == 1


def test_bench_without_batch_size_uses_the_default_and_says_so(cli, tiny_llada, tmp_path):
    r = cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "3", *GEN, "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "batch size 16 (the default on cpu" in r.stderr
    doc = json.loads((tmp_path / "b/results.json").read_text())
    assert doc["config"]["batch_size"] == 16 and doc["results"][0]["n"] == 3


def test_bench_help_lists_every_run_option(cli):
    from evotok_cli.base.options import flag
    from evotok_cli.bench.config import BenchOptions

    r = cli("bench", "--help")
    assert r.returncode == 0
    import dataclasses

    for f in dataclasses.fields(BenchOptions):
        if f.metadata.get("cli"):
            assert flag(f) in r.stdout, flag(f)
    assert "--limit" in r.stdout and "--batch-size" in r.stdout and "--config" in r.stdout
