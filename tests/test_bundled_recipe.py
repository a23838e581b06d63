"""The bundled model's recipe (examples/bundled_model/) runs end to end at toy size: data, tokenizer and
random init, pretraining, its continuation, the three compute runs, the three fine-tunes with the shipped
YAML configs, and a bench."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from evotok_cli.training.synthetic import GENERATORS, all_sudoku4, grid_text, in_test_split

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "bundled_model"
TOY = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--save-every", "1"]


def test_train_and_test_splits_are_disjoint_by_construction():
    for name, task in GENERATORS.items():
        train = task.problems("train", 300, 11)
        test = task.problems("test", 100, 11)
        assert not {p.key for p in train} & {p.key for p in test}, name
        assert all(not in_test_split(p.key, task.one_in) for p in train)
        assert all(in_test_split(p.key, task.one_in) for p in test)
    test_grids = {grid_text(g) for g in all_sudoku4() if in_test_split(grid_text(g), GENERATORS["sudoku4"].one_in)}
    assert len(test_grids) == 46  # about a sixth of the 288 grids never appears in training (docs quote 46)
    assert GENERATORS["sudoku4"].problems("test", 5, 0) == GENERATORS["sudoku4"].problems("test", 5, 0)  # deterministic


def test_test_splits_never_change():
    """The benchmarks' problems are pinned: a generator change that moves them would silently make every
    published number incomparable (arith-small was added beside arith, not in its place, for this)."""
    pinned = {"sudoku4": "84c911fe0406476f", "arith": "318fdd066be92142", "arith-small": "998cfd1e935218c6",
              "countdown3": "9cf7a0a28f11fc24"}
    for name, digest in pinned.items():
        text = "\n".join(p.question + "\x00" + p.response for p in GENERATORS[name].problems("test", 200, 0))
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, name


def test_arith_small_stays_within_twenty_writes_each_result_once_and_adds_up():
    lengths, distinct = set(), set()
    for p in GENERATORS["arith-small"].problems("train", 20000, 5):
        value = int(re.match(r"\w+ has (\d+) ", p.question).group(1))
        assert 2 <= value <= 12
        first, *rest = p.reasoning.rstrip(".").split(", ")
        assert first.startswith(f"{value}") and all(step[0] in "+-*" for step in rest)  # "10-5=5, *3=15, -6=9."
        steps = [first[len(str(value)):], *rest]
        lengths.add(len(steps))
        for step in steps:
            op, amount, result = re.fullmatch(r"([-+*])(\d+)=(\d+)", step).groups()
            assert {"+": value + int(amount), "-": value - int(amount), "*": value * int(amount)}[op] == int(result)
            assert (int(amount) in (2, 3)) if op == "*" else (1 <= int(amount) <= 9), p.reasoning
            distinct.add(f"{value}{op}{amount}")
            value = int(result)
            assert 1 <= value <= 20, p.reasoning
        assert p.answer == str(value) and p.target == float(value)
    assert lengths == {2, 3}
    assert len(distinct) == 285  # the docs' "285 distinct steps"


def test_cut_lines_move_the_reasoning_up_to_each_equals_sign_into_the_prefill(cli, tmp_path):
    out = tmp_path / "cuts.jsonl"
    assert cli("data", "arith-small", "sudoku4", "--n", "3", "--seed", "4", "--cuts", "--out", str(out)).returncode == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    whole = [line for line in lines if line["prefill"] == "<reasoning>"]
    assert len(whole) == 6  # three problems of each task, once whole
    for line in lines:
        full = next(w for w in whole if w["prompt"] == line["prompt"])
        assert line["prefill"] + line["response"] == full["prefill"] + full["response"]
        if line is not full:
            assert line["prefill"].endswith("=") and line["response"][0].isdigit()
    arith = [line for line in lines if line["prompt"].endswith("have now?")]
    sudoku = [line for line in lines if line["prompt"].startswith("Sudoku")]
    assert len(sudoku) == 3  # no "=" in its reasoning, nothing to cut
    assert len(arith) == sum(1 + w["response"].count("=") for w in whole if w in arith)  # no "=" after the reasoning


@pytest.mark.slow
def test_recipe_runs_at_toy_size(cli, tmp_path):
    runs = tmp_path / "runs"
    data = cli("data", "sudoku4", "arith-small", "arith", "countdown3", "--n", "40", "--seed", "1",
               "--out", str(runs / "train.jsonl"))
    assert data.returncode == 0, data.stderr
    assert cli("init-model", str(runs / "init"), "--layers", "1", "--hidden", "32", "--heads", "2",
               "--max-length", "256", "--vocab-size", "300", "--corpus", str(runs / "train.jsonl")).returncode == 0
    pre = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / "init"), "--out", str(runs / "pretrain"),
              "--config", str(RECIPE / "pretrain.yaml"), *TOY, "--json")
    assert pre.returncode == 0, pre.stderr
    assert json.loads(pre.stdout)["kind"] == "model"
    stages = (("pretrain", "continued", "continue.yaml"), ("continued", "compute-1", "compute-1.yaml"),
              ("compute-1", "compute-2", "compute-2.yaml"), ("compute-2", "base", "compute-3.yaml"))
    for start, out, config in stages:
        more = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / start), "--out", str(runs / out),
                   "--config", str(RECIPE / config), *TOY, "--json")
        assert more.returncode == 0, (config, more.stderr)
        assert json.loads(more.stdout)["kind"] == "model"
    for name in ("cts", "sft", "d2f"):
        proc = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / "base"), "--out", str(runs / name),
                   "--config", str(RECIPE / f"{name}.yaml"), *TOY, "--json")
        assert proc.returncode == 0, (name, proc.stderr)
        assert json.loads(proc.stdout)["objective"] == name
    bench = cli("bench", "sudoku4", "arith-small", "-m", str(runs / "base"), "--adapter", str(runs / "cts"),
                "-d", "hard-mask", "-d", "evotoken", "--limit", "2", "--batch-size", "2", "--out", str(runs / "eval"),
                "--json")
    assert bench.returncode == 0, bench.stderr
    assert (runs / "eval" / "results.json").is_file()
