"""A SIGTERM whose exception is swallowed still stops the command (CI failure, end of session 13).

`main` raises SIGTERM as an exception; when the main thread is inside a `__del__` (or a library's bare
`except:`) at that moment, Python prints "Exception ignored" and goes on. A fine-tune signalled that way
trained on until killed. Here the swallowing is made certain: a finaliser signals its own process, the
handler runs inside it, and the exception is swallowed exactly as in the wild."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from evotok_cli.base import locks, stopping

ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}."} for a in range(1, 4) for b in range(1, 3)]
FAST = ["--objective", "sft", "--batch-size", "1", "--grad-accum", "1", "--max-length", "64", "--min-response", "1",
        "--lora-r", "2", "--lora-alpha", "4"]


class _SignalsInItsFinaliser:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + 5
        while time.monotonic() < end and stopping.pending() is None:  # the handler runs in here
            time.sleep(0.001)


@pytest.fixture
def swallowed(monkeypatch):
    """`swallowed()` delivers a SIGTERM whose exception Python swallows; the list holds what it swallowed."""
    lost: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: lost.append(info.exc_value))

    def deliver() -> None:
        _SignalsInItsFinaliser()  # made and collected at once
        assert lost and type(lost[-1]).__name__ == "Terminated", lost  # the scenario really happened

    deliver.lost = lost
    return deliver


def test_a_finetune_signalled_during_set_up_stops_at_its_first_step_with_a_checkpoint(cli, tiny_llada, tmp_path,
                                                                                        monkeypatch, swallowed):
    from evotok_cli.training.trainer import Trainer

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    setup = Trainer.setup

    def setup_then_signal(self, *a, **k):
        out = setup(self, *a, **k)
        swallowed()
        return out

    monkeypatch.setattr(Trainer, "setup", setup_then_signal)
    out = tmp_path / "run"
    r = cli("finetune", str(data), "-m", str(tiny_llada), "--out", str(out), *FAST, "--max-steps", "40",
            "--save-every", "1000")
    assert r.returncode == 143, r.stderr  # before: trained all 40 steps and exited 0
    assert "SIGTERM: saved" in r.stderr and "continue with --resume" in r.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-0000001"]
    assert not (out / locks.LOCK_NAME).exists()


def test_a_decode_signalled_after_the_model_loaded_stops_at_its_next_step(cli, tiny_llada, tmp_path, monkeypatch,
                                                                           swallowed):
    from evotok_cli.decoding.stepper import Engine
    from evotok_cli.runtime import model

    load, step, steps = model.load_model, Engine.step, []

    def load_then_signal(*a, **k):
        lm = load(*a, **k)
        swallowed()
        return lm

    monkeypatch.setattr(model, "load_model", load_then_signal)
    monkeypatch.setattr(Engine, "step", lambda self: steps.append(1) or step(self))
    out = tmp_path / "trace.jsonl"
    r = cli("generate", "-m", str(tiny_llada), "--prompt", "What is 2+3?", "--gen-length", "8", "--block-length", "8",
            "--steps", "8", "--trace", str(out))
    assert r.returncode == 143, r.stderr  # before: 0, the whole decode run as if no one had asked it to stop
    assert r.stderr.strip().splitlines()[-1] == "terminated" and steps == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no trace, half-written or whole


def test_a_signal_swallowed_while_the_model_loads_stops_before_any_decode(cli, tiny_llada, monkeypatch, swallowed):
    from evotok_cli.decoding.stepper import Engine
    from evotok_cli.runtime import model

    read_tokenizer, runs = model.tok.load_tokenizer, []

    def read_then_signal(*a, **k):
        tokenizer = read_tokenizer(*a, **k)
        swallowed()
        return tokenizer

    monkeypatch.setattr(model.tok, "load_tokenizer", read_then_signal)
    monkeypatch.setattr(Engine, "run", lambda *a, **k: runs.append(1))
    r = cli("generate", "-m", str(tiny_llada), "--prompt", "Hi", "--gen-length", "4", "--block-length", "4",
            "--steps", "4")
    assert r.returncode == 143 and runs == [], r.stderr


def test_a_command_that_returns_after_a_swallowed_sigterm_exits_143_with_its_output_whole(cli, tiny_llada,
                                                                                         monkeypatch, swallowed):
    from evotok_cli.runtime import model

    inspect = model.inspect_model

    def inspect_then_signal(*a, **k):
        facts = inspect(*a, **k)
        swallowed()
        return facts

    monkeypatch.setattr(model, "inspect_model", inspect_then_signal)
    r = cli("info", str(tiny_llada), "--json")
    assert r.returncode == 143, r.stderr  # before: 0
    assert json.loads(r.stdout)["schema"] == "evotok.info/1"  # what it wrote is whole
    assert r.stderr.strip().splitlines()[-1] == "terminated"


def test_a_command_that_fails_after_a_swallowed_sigterm_still_exits_143(cli, tiny_llada, monkeypatch, swallowed):
    from evotok_cli.base.errors import ConfigError
    from evotok_cli.runtime import model

    def signal_then_fail(*a, **k):
        swallowed()
        raise ConfigError("a failure after the signal", where="here", fix="none")

    monkeypatch.setattr(model, "inspect_model", signal_then_fail)
    r = cli("info", str(tiny_llada))
    assert r.returncode == 143, r.stderr  # before: 2, read by a scheduler as the user's mistake
    assert "a failure after the signal" in r.stderr and r.stderr.strip().splitlines()[-1] == "terminated"


def test_a_command_with_no_signal_does_not_inherit_one_from_the_command_before(cli, tiny_llada):
    stopping.note(signal.SIGTERM)  # left behind by an earlier command in this process: cleared at the start
    r = cli("generate", "-m", str(tiny_llada), "--prompt", "Hi", "--gen-length", "4", "--block-length", "4",
            "--steps", "4")
    assert r.returncode == 0, r.stderr


def test_a_server_started_after_a_swallowed_sigterm_stops_instead_of_serving_on():
    import uvicorn

    from evotok_cli.serve.server import Draining

    class Service:
        loop = None  # not started yet

    class Server(Draining, uvicorn.Server):
        pass

    server = Server(uvicorn.Config(app=None), Service(), grace=1.0)
    stopping.reset()
    with server.capture_signals():
        assert not server.should_exit  # no signal: serves on
    stopping.note(signal.SIGTERM)
    try:
        with server.capture_signals():
            assert server.should_exit  # before: served until the next signal
    finally:
        stopping.reset()


@pytest.mark.parametrize("how", ["raised", "swallowed"])
def test_a_signal_is_forgotten_when_the_command_that_got_it_ends(monkeypatch, swallowed, how):
    """`main` forgets the signal as it returns, as it found none at its start: a Trainer or a server used next
    in the same process (a library caller; the next test) would otherwise stop at once."""
    from evotok_cli.cli import app

    def signalled() -> None:
        if how == "swallowed":
            swallowed()  # the command runs on: main exits 143 after it
            return
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises Terminated in here

    monkeypatch.setattr(app, "_run", signalled)
    with pytest.raises(SystemExit) as exc:
        app.main()
    assert exc.value.code == 143
    assert stopping.pending() is None  # before: "SIGTERM", left for whatever runs next
