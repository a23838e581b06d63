"""The evotoken decoder's state switches (the paper's ablations): each switch removes exactly its state,
and with all three off the decoder is LLaDA's low-confidence remasking, token for token."""

from __future__ import annotations

import pytest

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.jobs.generation import make_decoder

OFF = {"soft_mask": "false", "soft_decoded": "false", "revise": "false"}
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]


def _run(model, name, options, *, prompts=PROMPTS, temperature=0.0, gen=(16, 4, 16)):
    events = []
    request = GenerationRequest(prompts=prompts, gen_length=gen[0], block_length=gen[1], steps=gen[2],
                                temperature=temperature, seed=1, trace=True, on_event=events.append)
    result = make_decoder(name, options).generate(model, request)
    return [r.token_ids for r in result.rows], [r.nfe for r in result.rows], events


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_all_states_off_is_hard_mask(tiny_model, cache, temperature):
    evo = _run(tiny_model, "evotoken", {**OFF, "cache": cache}, temperature=temperature)
    hard = _run(tiny_model, "hard-mask", {"cache": cache}, temperature=temperature)
    assert evo[0] == hard[0] and evo[1] == hard[1]
    assert all(s in ("mask", "decoded") for e in evo[2] for s in e.states)  # nothing soft is ever fed


def test_all_states_off_is_hard_mask_on_dream_and_with_a_threshold(tiny_dream):
    from evotok_cli.runtime.model import load_model

    dream = load_model(tiny_dream)
    assert _run(dream, "evotoken", OFF)[:2] == _run(dream, "hard-mask", {})[:2]
    threshold = {"threshold": "0.2"}
    assert _run(dream, "evotoken", {**OFF, **threshold})[:2] == _run(dream, "hard-mask", threshold)[:2]


@pytest.mark.slow
def test_all_states_off_is_hard_mask_on_the_bundled_model():
    from evotok_cli.assets import default_model_path
    from evotok_cli.runtime.model import load_model
    from evotok_cli.runtime.tokenizer import encode, render_prompt
    from evotok_cli.training.synthetic import data_problems

    model = load_model(default_model_path())
    prompts = [encode(model.tokenizer, render_prompt(model.tokenizer, p.question, chat=True, system=None,
                                                     prefill="<reasoning>"))
               for task in ("sudoku4", "arith-small", "countdown3") for p in data_problems(task, "test", 2, 0)]
    for cache in ("none", "dual"):
        evo = _run(model, "evotoken", {**OFF, "cache": cache}, prompts=prompts, gen=(48, 16, 48))
        hard = _run(model, "hard-mask", {"cache": cache}, prompts=prompts, gen=(48, 16, 48))
        assert evo[:2] == hard[:2]


def _states(events):
    return {s for e in events for s in e.states}


def test_each_switch_removes_its_state(tiny_model):
    _, _, full = _run(tiny_model, "evotoken", {})
    assert {"soft_mask", "soft", "decoded"} <= _states(full) and any(e.revised for e in full)
    _, _, no_soft_mask = _run(tiny_model, "evotoken", {"soft_mask": "false"})
    assert "soft_mask" not in _states(no_soft_mask) and "soft" in _states(no_soft_mask)
    _, _, no_soft_decoded = _run(tiny_model, "evotoken", {"soft_decoded": "false"})
    assert "soft" not in _states(no_soft_decoded) and "soft_mask" in _states(no_soft_decoded)
    _, _, no_revise = _run(tiny_model, "evotoken", {"revise": "false"})
    assert not any(e.revised for e in no_revise) and "soft" in _states(no_revise)


def test_a_committed_position_is_fed_as_decode_at_the_next_pass_without_soft_decoded(tiny_model):
    _, _, events = _run(tiny_model, "evotoken", {"soft_decoded": "false"}, prompts=PROMPTS[:1])
    for before, after in zip(events, events[1:]):
        for pos in before.committed:
            assert after.states[pos] == "decoded"
        masked = [i for i, t in enumerate(before.tokens) if t == tiny_model.mask_id]
        assert all(after.states[i] == "soft_mask" for i in masked)  # Soft([MASK]+V) stays on


def test_switches_are_listed_and_sweepable(cli, tmp_path, tiny_llada):
    import json

    rows = json.loads(cli("decoders", "--details", "evotoken", "--json").stdout)["options"]
    listed = {r["name"]: r for r in rows}
    assert all(listed[k]["default"] is True and listed[k]["type"] == "bool" for k in OFF)
    out = tmp_path / "runs"
    proc = cli("bench", "sudoku4", "-m", str(tiny_llada), "-d", "evotoken", "--sweep", "revise=true,false",
               "--limit", "1", "--gen-length", "8", "--block-length", "4", "--steps", "4", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["sweep"]["revise"] for r in json.loads(proc.stdout)["results"]) == [False, True]
