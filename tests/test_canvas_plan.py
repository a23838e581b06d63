"""The canvas a `max_tokens` cap decodes (`canvas_plan.plan_canvas`) and the cut at the cap (`cut_answer`),
on the bundled model's defaults, and a real decode on the bundled model within the cap."""

from __future__ import annotations

import json

import pytest

from evotok_cli.assets import default_model_path
from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import RowResult
from evotok_cli.decoding.schedule import block_layout
from evotok_cli.jobs.canvas_plan import CanvasPlan, block_constraint, cut_answer, plan_canvas

BUNDLED = json.loads((default_model_path() / "generation_config.json").read_text())["evotok"]
DEFAULTS = {k: BUNDLED[k] for k in ("gen_length", "block_length", "steps")}

# max_tokens -> (canvas, block, steps) with the bundled defaults: 48 tokens in blocks of 16, 16 steps a block
TABLE = {None: (48, 16, 48), 1: (16, 16, 16), 5: (16, 16, 16), 10: (16, 16, 16), 16: (16, 16, 16),
         17: (32, 16, 32), 20: (32, 16, 32), 32: (32, 16, 32), 33: (48, 16, 48), 47: (48, 16, 48),
         48: (48, 16, 48), 50: (48, 16, 48), 80: (48, 16, 48), 100: (48, 16, 48), 150: (48, 16, 48),
         200: (48, 16, 48), 512: (48, 16, 48), 1024: (48, 16, 48)}


def test_the_bundled_defaults_are_what_the_table_assumes():
    assert DEFAULTS == {"gen_length": 48, "block_length": 16, "steps": 48}


@pytest.mark.parametrize("max_tokens, expected", TABLE.items(), ids=[str(k) for k in TABLE])
def test_plan_on_the_bundled_defaults(max_tokens, expected):
    plan = plan_canvas(**DEFAULTS, max_tokens=max_tokens)
    assert plan == CanvasPlan(*expected)
    block_layout(plan.gen_length, plan.block_length, plan.steps)  # a valid layout
    assert max_tokens is None or plan.gen_length >= min(max_tokens, DEFAULTS["gen_length"])
    per_block = plan.steps // (plan.gen_length // plan.block_length)
    assert per_block == 16  # steps per block kept


@pytest.mark.parametrize("max_tokens, block, expected", [
    (10, 4, (12, 4, 48)),  # d2f with block_size=4: whole blocks of 4 (its steps are unused)
    (100, 4, (48, 16, 48)),  # at least the default length: the defaults, whatever the block
    (1, 64, (64, 64, 16)),  # a block larger than the default canvas
])
def test_a_decoder_block_is_the_unit(max_tokens, block, expected):
    assert plan_canvas(**DEFAULTS, max_tokens=max_tokens, block=block) == CanvasPlan(*expected)


def test_llada_defaults():
    llada = {"gen_length": 128, "block_length": 32, "steps": 64}
    assert plan_canvas(**llada, max_tokens=100) == CanvasPlan(128, 32, 64)
    assert plan_canvas(**llada, max_tokens=256) == CanvasPlan(128, 32, 64)
    assert plan_canvas(**llada, max_tokens=33) == CanvasPlan(64, 32, 32)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_a_bad_cap_is_refused(bad):
    with pytest.raises(ConfigError, match="max_tokens must be an integer >= 1"):
        plan_canvas(**DEFAULTS, max_tokens=bad)


def test_block_constraint_of_the_decoders():
    from evotok_cli.decoding.api import parse_options
    from evotok_cli.decoding.registry import get

    def make(name, **options):
        cls = get(name)
        return cls(parse_options(cls.Config, options, decoder=name))

    assert block_constraint(make("hard-mask")) is None and block_constraint(make("evotoken")) is None
    assert block_constraint(make("d2f")) is None and block_constraint(make("d2f", block_size=8)) == 8


STOP = (1, 9)
CUTS = [  # span, max_tokens -> (span returned, cut)
    ([5, 6, 7, 1, 1, 1], None, ([5, 6, 7, 1, 1, 1], False)),
    ([5, 6, 7, 1, 1, 1], 3, ([5, 6, 7, 1, 1, 1], False)),  # exactly the cap, then a stop: whole, "stop"
    ([5, 6, 7, 1, 1, 1], 2, ([5, 6], True)),
    ([5, 6, 7, 8], 4, ([5, 6, 7, 8], False)),  # fills the canvas: not cut (the canvas ended it)
    ([5, 6, 7, 8], 1, ([5], True)),
    ([9, 5, 6], 1, ([9, 5, 6], False)),  # an empty answer
    ([5, 9, 6], 1, ([5, 9, 6], False)),
]


@pytest.mark.parametrize("span, cap, expected", CUTS)
def test_cut_answer(span, cap, expected):
    assert cut_answer(span, cap, STOP) == expected


@pytest.fixture(scope="module")
def bundled():
    from evotok_cli.runtime.model import load_model
    return load_model(default_model_path())


@pytest.mark.parametrize("max_tokens", [1, 10, 20, 100])
def test_bundled_model_answers_within_the_cap(bundled, max_tokens):
    """The plan decodes and the cut holds on the real model; from 48 on the answer is `generate`'s own."""
    from evotok_cli.jobs.generation import generate, make_decoder, row_result
    from evotok_cli.runtime.prompts import Prompt, encode_prompts

    prompts = [Prompt("What is 12+7?")]
    encode_prompts(prompts, bundled.tokenizer, chat=True, vocab_size=bundled.vocab_size, system=None,
                   prefill=BUNDLED["prefill"])
    decoder = make_decoder("hard-mask", {})
    plan = plan_canvas(**DEFAULTS, max_tokens=max_tokens, block=block_constraint(decoder))
    results, _ = generate(bundled, "hard-mask", decoder, prompts, gen_length=plan.gen_length,
                          block_length=plan.block_length, steps=plan.steps, temperature=0.0, seed=0)
    raw = results[0]
    capped = row_result(bundled, prompts[0], RowResult(raw["token_ids"], raw["nfe"]), 0.0, max_tokens=max_tokens)
    assert capped["tokens"] <= max_tokens and capped["text"] == bundled.answer_text(capped["token_ids"])
    ran_out = raw["tokens"] > max_tokens or raw["tokens"] == len(raw["token_ids"])  # cut, or the canvas ended it
    assert (capped["tokens"] == len(capped["token_ids"])) == ran_out  # the server's finish_reason "length"
    if max_tokens >= DEFAULTS["gen_length"]:
        full, _ = generate(bundled, "hard-mask", decoder, prompts, **DEFAULTS, temperature=0.0, seed=0)
        assert capped["token_ids"] == full[0]["token_ids"] and capped["text"] == full[0]["text"]


# -- d2f's block size fits the canvas (item 4) ---------------------------------------------------------
@pytest.mark.parametrize("budget, size", [(48, 48), (128, 64), (256, 64), (96, 48), (100, 50), (80, 40), (16, 16),
                                          (7, 7), (1, 1), (67, 1)])
def test_d2f_default_block_size(budget, size):
    from evotok_plugins.d2f.decoder import default_block_size

    assert default_block_size(budget) == size


def test_d2f_runs_on_the_bundled_model_with_no_options(cli):
    proc = cli("generate", "-d", "d2f", "-p", "What is 12+7?", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["params"]["decoder_options"]["block_size"] is None and doc["params"]["gen_length"] == 48
    assert len(doc["results"][0]["token_ids"]) == 48 and doc["results"][0]["nfe"] >= 1


def test_d2f_explicit_block_size_behaves_as_before():
    from evotok_cli.jobs.generation import check_settings, make_decoder

    for size in (16, 48):  # divides 48: accepted, and used as given
        decoder = make_decoder("d2f", {"block_size": size})
        check_settings(decoder, gen_length=48, block_length=16, steps=48, temperature=0.0)
        assert decoder.block_size(48) == size
    with pytest.raises(ConfigError, match="max new tokens 48 is not a multiple of block_size 64"):
        check_settings(make_decoder("d2f", {"block_size": 64}), gen_length=48, block_length=16, steps=48,
                       temperature=0.0)
