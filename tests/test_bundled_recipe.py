"""The bundled model's recipe (examples/bundled_model/) runs end to end at toy size: data, tokenizer and
random init, pretraining and its continuation, the three fine-tunes with the shipped YAML configs, and a
bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evotok_cli.bench.tasks.synthetic import TASKS, all_sudoku4, grid_text, in_test_split

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "bundled_model"
TOY = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--save-every", "1"]


def test_train_and_test_splits_are_disjoint_by_construction():
    for name, task in TASKS.items():
        train = task.problems("train", 300, 11)
        test = task.problems("test", 100, 11)
        assert not {p.key for p in train} & {p.key for p in test}, name
        assert all(not in_test_split(p.key, task.one_in) for p in train)
        assert all(in_test_split(p.key, task.one_in) for p in test)
    test_grids = {grid_text(g) for g in all_sudoku4() if in_test_split(grid_text(g), TASKS["sudoku4"].one_in)}
    assert len(test_grids) == 46  # about a sixth of the 288 grids never appears in training (docs quote 46)
    assert TASKS["sudoku4"].problems("test", 5, 0) == TASKS["sudoku4"].problems("test", 5, 0)  # deterministic


@pytest.mark.slow
def test_recipe_runs_at_toy_size(cli, tmp_path):
    runs = tmp_path / "runs"
    assert cli("data", "sudoku4", "arith", "countdown3", "--n", "40", "--seed", "1", "--out", str(runs / "train.jsonl")).returncode == 0
    assert cli("init-model", str(runs / "init"), "--layers", "1", "--hidden", "32", "--heads", "2",
               "--max-length", "256", "--vocab-size", "300", "--corpus", str(runs / "train.jsonl")).returncode == 0
    pre = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / "init"), "--out", str(runs / "pretrain"),
              "--config", str(RECIPE / "pretrain.yaml"), *TOY, "--json")
    assert pre.returncode == 0, pre.stderr
    assert json.loads(pre.stdout)["kind"] == "model"
    more = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / "pretrain"), "--out", str(runs / "base"),
               "--config", str(RECIPE / "continue.yaml"), *TOY, "--json")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["kind"] == "model"
    for name in ("cts", "sft", "d2f"):
        proc = cli("finetune", str(runs / "train.jsonl"), "-m", str(runs / "base"), "--out", str(runs / name),
                   "--config", str(RECIPE / f"{name}.yaml"), *TOY, "--json")
        assert proc.returncode == 0, (name, proc.stderr)
        assert json.loads(proc.stdout)["objective"] == name
    bench = cli("bench", "sudoku4", "arith", "-m", str(runs / "base"), "--adapter", str(runs / "cts"),
                "-d", "hard-mask", "-d", "evotoken", "--limit", "2", "--batch-size", "2", "--out", str(runs / "eval"),
                "--json")
    assert bench.returncode == 0, bench.stderr
    assert (runs / "eval" / "results.json").is_file()
