"""The model that ships inside the package (evotok_cli/assets/evotok-tiny): it loads through the same
runtime as an 8B checkpoint, passes `evotok info`, and answers a few fixed held-out problems correctly
through the CLI at temperature 0. A regression guard, not the accuracy claim (that is the model card's
table, made by examples/bundled_model/evaluate.sh)."""

from __future__ import annotations

import json

import pytest

from evotok_cli.assets import default_model_path
from evotok_cli.bench.tasks import registry
from evotok_cli.training.synthetic import GENERATORS, in_test_split

BUNDLED = default_model_path()

# (task, index in the bench's test problems (generator seed 0), decoder, adapter): problems the shipped model
# solves, picked once from its evaluation; each must stay solved.
SOLVED = [
    ("sudoku4", 3, "hard-mask", None),  # the README's and the guide's puzzle
    ("sudoku4", 0, "hard-mask", None),
    ("sudoku4", 3, "evotoken", "cts"),
    ("sudoku4", 5, "evotoken", "cts"),
    ("sudoku4", 3, "d2f", "d2f"),
    ("arith-small", 0, "hard-mask", None),
    ("arith-small", 33, "evotoken", None),  # the guide's revision
    ("arith-small", 4, "evotoken", "cts"),
    ("arith-small", 4, "d2f", "d2f"),
    ("arith", 3, "hard-mask", None),
    ("countdown3", 2, "hard-mask", None),
    ("countdown3", 2, "evotoken", "cts"),
    ("countdown3", 9, "d2f", "d2f"),
]


def test_layout_and_size():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "README.md", "adapters"} <= names
    assert {p.name for p in (BUNDLED / "adapters").iterdir()} == {"cts", "sft", "d2f"}
    size = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["mask_token_id"] == 2


def test_info_without_model_describes_the_bundled_model(cli):
    doc = json.loads(cli("info", "--json").stdout)
    assert doc["path"] == str(BUNDLED)
    assert doc["family"] == "llada" and doc["parameters"] == 4_989_696
    assert doc["chat_template"] is True
    adapter = json.loads(cli("info", "--adapter", "cts", "--json").stdout)["adapter"]
    assert adapter["r"] == 16 and adapter["merged_modules"] == 18 and not adapter["unmatched_targets"]


@pytest.mark.parametrize("task, index, decoder, adapter", SOLVED)
def test_answers_held_out_problems(cli, task, index, decoder, adapter):
    problem = GENERATORS[task].problems("test", index + 1, 0)[index]
    assert in_test_split(problem.key, GENERATORS[task].one_in)  # held out from training by construction
    args = ["generate", "-p", problem.question, "-d", decoder, "--temperature", "0", "--json"]
    if adapter:
        args += ["--adapter", adapter]
    if decoder == "d2f":
        args += ["--opt", "block_size=16"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["params"]["prefill"] == "<reasoning>" and doc["params"]["gen_length"] == 48
    text = doc["results"][0]["text"]
    parsed, correct = registry.get(task).score(text, problem.target)
    assert correct, f"{task} #{index}: {parsed!r} from {text!r}"


def test_step_probe_counts_every_calculation_in_both_settings():
    """examples/bundled_model/step_probe.py, quoted by the model card: one row per "=" of the reasoning; on
    these three arith problems the shipped model predicts every result whose copies are visible, and fewer
    from the operands alone (it computes some steps, not all)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "bundled_model" / "step_probe.py"
    spec = importlib.util.spec_from_file_location("step_probe", script)
    step_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_probe)
    from evotok_cli.runtime.model import load_model

    model = load_model(BUNDLED, device="cpu")
    counts = step_probe.probe(model, "arith", 3)
    problems = GENERATORS["arith"].problems("test", 3, 0)
    assert counts["steps"] == sum(p.reasoning.count("=") for p in problems)
    assert counts["copies visible"] == counts["steps"]
    assert counts["rest masked"] < counts["copies visible"]
    # --split train reads the problems `evotok data arith --seed 12` wrote (the continued pretraining's)
    import itertools

    train = list(itertools.islice(GENERATORS["arith"].stream("train", 12), 2))
    counts = step_probe.probe(model, "arith", 2, split="train", seed=12)
    assert counts["steps"] == sum(p.reasoning.count("=") for p in train)
    assert {p.question for p in train}.isdisjoint(p.question for p in problems)
