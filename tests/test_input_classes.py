"""Input classes of issue 30 that the hostile matrix cannot state: how fast a refusal is, that the edge of
each range is still accepted, and the shared checkers' behaviour on their own (the refusals themselves are
rows of tests/hostile/input_classes.py)."""

from __future__ import annotations

import json
import time

import pytest

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import SEED_MAX, check_seed
from evotok_cli.bench.sweep import parse_sweeps
from evotok_cli.jobs.config import load_yaml

GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases each would expand to 9^9 (387 million) items; refused before expanding."""
    levels = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    names = "abcdefghij"
    levels += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert time.perf_counter() - start < 2
    assert "aliases are not supported" in err.value.line() and err.value.where == f"{path}:2"


def test_a_yaml_anchor_without_an_alias_and_plain_lists_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("steps: &s 4\nblock_sizes: [256, 512]\ndecoder: {alpha: 0.5}\n")
    assert load_yaml(path) == {"steps": 4, "block_sizes": [256, 512], "decoder": {"alpha": 0.5}}


def test_duplicate_keys_are_refused_in_nested_mappings_too(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("gen_length: 8\ndecoder:\n  alpha: 0.5\n  k_soft: 2\n  alpha: 0.7\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert err.value.where == f"{path}:5" and "duplicate key 'alpha', first given on line 3" in err.value.what


@pytest.mark.parametrize("seed", [0, 1, SEED_MAX])
def test_seeds_inside_the_range_pass(seed):
    assert check_seed(seed) == seed


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**64, True, 1.0, "3"])
def test_seeds_outside_the_range_or_not_integers_are_refused(seed):
    with pytest.raises(ConfigError) as err:
        check_seed(seed, where="--seed")
    assert err.value.where == "--seed"


def test_the_largest_seed_samples_every_row(cli, tiny_llada):
    """Rows draw from seed + i: at the top of the range both rows of a sampled batch still fit torch's
    generators (the range stops at 2^63 - 1 for that reason)."""
    proc = cli("generate", "-m", str(tiny_llada), "-p", "a", "-p", "b", *GEN, "--temperature", "1",
               "--seed", str(SEED_MAX), "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"]) == 2


def test_k_soft_may_be_the_whole_vocabulary(cli, tiny_llada):
    """The bound is the model's vocabulary, inclusive: k_soft = V mixes every token; V + 1 is refused."""
    vocab = json.loads((tiny_llada / "config.json").read_text())["vocab_size"]
    ok = cli("generate", "-m", str(tiny_llada), "-p", "hi", *GEN, "-d", "evotoken", "--opt", f"k_soft={vocab}")
    assert ok.returncode == 0, ok.stderr
    over = cli("generate", "-m", str(tiny_llada), "-p", "hi", *GEN, "-d", "evotoken", "--opt", f"k_soft={vocab + 1}")
    assert over.returncode == 2 and f"pick k_soft in [1, {vocab}]" in over.stderr


def test_decoders_details_show_the_model_bound(cli):
    proc = cli("decoders", "--details", "evotoken", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "[1, vocab_size]" in proc.stdout


def test_sweeps_keep_distinct_values_in_order():
    assert parse_sweeps(["alpha=0.7,0.5,0.9", "cache=none,dual"]) == [("alpha", ["0.7", "0.5", "0.9"]),
                                                                     ("cache", ["none", "dual"])]
    with pytest.raises(ConfigError, match="'1' and '1.0' are one value"):
        parse_sweeps(["steps=1,2,1.0"])


def test_report_plots_a_sweep_over_names(cli, tiny_llada, tmp_path):
    """A swept option whose values are names (cache=none,dual) is a categorical axis, not a float() error."""
    out = tmp_path / "runs"
    run = cli("bench", "sudoku4", "-m", str(tiny_llada), "--limit", "1", *GEN, "-d", "evotoken",
              "--sweep", "cache=none,dual", "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = cli("bench", "report", str(out))
    assert report.returncode == 0, report.stderr
    assert (out / "report.png").stat().st_size > 0 and "cache none" in (out / "report.md").read_text()


@pytest.mark.parametrize("args", [f"seed={2**64}", "seed=-1"])
def test_lm_eval_model_args_take_seeds_in_the_same_range(args):
    pytest.importorskip("lm_eval")
    from evotok_cli.lmeval.model import EvotokLM

    with pytest.raises(ConfigError) as err:
        EvotokLM.create_from_arg_string(args, {"batch_size": 1})
    assert f"seed must be in [0, {SEED_MAX}]" in err.value.line() and err.value.where == "--model_args"


def test_lm_eval_refuses_k_soft_above_the_vocabulary_at_load(tiny_llada):
    pytest.importorskip("lm_eval")
    from evotok_cli.lmeval.model import EvotokLM

    with pytest.raises(ConfigError) as err:
        EvotokLM.create_from_arg_string(f"model={tiny_llada},decoder=evotoken,k_soft=100000", {"batch_size": 1})
    assert "above the model's vocab size" in err.value.line() and err.value.where == "--model_args"
