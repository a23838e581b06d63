"""`--compile [LEVEL]` where a command also takes words: `evotok bench --compile sudoku4` runs the task
sudoku4 compiled (the word after the flag is a task, not a bad level), a level word stays the level, a
word that is neither (or both) is one error; and `evotok chat --compile` reaches the model load as
`evotok generate`'s does. No model is loaded: the load is replaced by one that records what it was given."""

from __future__ import annotations

import pytest

from evotok_cli.base.errors import ConfigError
from evotok_cli.bench.cli import compile_before_task

TASKS = {"sudoku4", "arith", "gsm8k"}


@pytest.fixture
def bench_request(monkeypatch):
    """Run `evotok bench ...` up to the point where it would decode; return the BenchRequest it built."""
    from evotok_cli.bench import runner

    seen: list = []

    def record(request):
        seen.append(request)
        raise ConfigError("recorded", where="test", fix="none")

    monkeypatch.setattr(runner, "run_bench", record)

    def run(cli, *args: str):
        result = cli("bench", *args, "--limit", "1")
        assert result.returncode == 2 and "test: recorded" in result.stderr, result.stderr
        return seen.pop()

    return run


@pytest.mark.parametrize("args, level, tasks", [
    (["--compile", "sudoku4"], True, ["sudoku4"]),  # read as the level 'sudoku4' before the fix
    (["--compile", "sudoku4", "arith"], True, ["sudoku4", "arith"]),
    (["run", "--compile", "arith"], True, ["arith"]),
    (["sudoku4", "--compile"], True, ["sudoku4"]),
    (["--compile", "max", "sudoku4"], "max", ["sudoku4"]),
    (["--compile", "off", "sudoku4"], False, ["sudoku4"]),
    (["--compile=on", "sudoku4"], True, ["sudoku4"]),
    (["sudoku4", "--no-compile"], False, ["sudoku4"]),
])
def test_bench_reads_a_task_after_a_bare_compile(cli, bench_request, args, level, tasks):
    request = bench_request(cli, *args)
    assert request.compile == level and request.tasks == tasks


def test_a_word_that_is_both_a_level_and_a_task_is_refused():
    with pytest.raises(ConfigError, match="'max' after --compile is both a level and a task") as err:
        compile_before_task(["--compile", "max"], {"max", "arith"})
    assert "--compile=on max" in err.value.line()


def test_a_word_that_is_neither_names_the_closest_task():
    with pytest.raises(ConfigError, match="got 'sudoku', which is no task either") as err:
        compile_before_task(["--compile", "sudoku", "--limit", "2"], TASKS)
    assert "did you mean the task sudoku4?" in err.value.line()


def test_only_the_word_after_compile_and_nothing_after_double_dash_is_read():
    assert compile_before_task(["arith", "--compile", "--limit", "2"], TASKS) == ["arith", "--compile", "--limit", "2"]
    assert compile_before_task(["--", "--compile", "x"], TASKS) == ["--", "--compile", "x"]
    assert compile_before_task(["--compile", "gsm8k", "--compile", "max"], TASKS) == [
        "--compile=on", "gsm8k", "--compile", "max"]


@pytest.mark.parametrize("args, level", [(["--compile"], True), (["--compile", "max"], "max"), ([], False),
                                         (["--compile", "on", "--no-compile"], False)])
def test_chat_passes_compile_to_the_model_load(cli, monkeypatch, args, level):
    """Before: chat had no --compile (`no such option`); now its level reaches load_model as generate's."""
    import io
    import sys

    from evotok_cli.runtime import model

    seen: dict = {}

    def record(folder, **kwargs):
        seen.update(kwargs)
        raise ConfigError("recorded", where="test", fix="none")

    monkeypatch.setattr(model, "load_model", record)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    result = cli("chat", *args)
    assert result.returncode == 2 and "test: recorded" in result.stderr, result.stderr
    assert seen["compile"] == level
