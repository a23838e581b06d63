"""top_k / top_p / min_p (`decoding.api.Sampling`): which tokens survive and with what probability, on a
hand-computed case; that the sampler draws from exactly that distribution on the unchanged random stream;
that real decodes of every decoder obey them; and the seeds of sampled requests (`generation.derive_seed`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationRequest, Sampling, check_sampling, parse_options
from evotok_cli.decoding.registry import get
from evotok_cli.decoding.schedule import filtered_log_weights, gumbel_candidates
from evotok_cli.jobs.generation import FRESH_SEED_LIMIT, SEED_LIMIT, derive_seed, fresh_seed

P = [0.5, 0.2, 0.15, 0.1, 0.05]  # token 5 is [MASK], the most likely of all and never a candidate
MASK = 5
LOGITS = torch.tensor([math.log(p) for p in P] + [3.0], dtype=torch.float64)


def renormalised(keep: list[int], weights: list[float] = P) -> list[float]:
    total = sum(weights[i] for i in keep)
    return [weights[i] / total if i in keep else 0.0 for i in range(len(weights))] + [0.0]


SQRT = [math.sqrt(p) for p in P]  # temperature 2: p^(1/2), renormalised
HAND = [  # (temperature, filters, the distribution left, worked out by hand)
    (1.0, {}, renormalised([0, 1, 2, 3, 4])),
    (1.0, {"top_k": 2}, renormalised([0, 1])),  # 5/7, 2/7
    (1.0, {"top_k": 5}, renormalised([0, 1, 2, 3, 4])),
    (1.0, {"top_p": 0.8}, renormalised([0, 1, 2])),  # 0.5 + 0.2 = 0.7 < 0.8: token 2 is needed; 0.85 then
    (1.0, {"top_p": 0.45}, renormalised([0])),  # the most probable alone holds 0.5
    (1.0, {"min_p": 0.35}, renormalised([0, 1])),  # floor 0.175: 0.2 stays, 0.15 goes
    (1.0, {"min_p": 0.25}, renormalised([0, 1, 2])),  # floor 0.125
    # top-k first, then top-p over the renormalised four: 0.5/0.95 = 0.53 < 0.6, 0.7/0.95 = 0.74 >= 0.6
    (1.0, {"top_k": 4, "top_p": 0.6}, renormalised([0, 1])),
    # top-p first (keeps 0, 1, 2), then min-p 0.35 of the top: floor 0.175 of the original scale
    (1.0, {"top_p": 0.8, "min_p": 0.35}, renormalised([0, 1])),
    # temperature 2: probabilities sqrt(p) / sum = .340 .215 .186 .152 .107; top-p 0.5 keeps two
    (2.0, {"top_p": 0.5}, renormalised([0, 1], SQRT)),
    (2.0, {"min_p": 0.5}, renormalised([0, 1, 2], SQRT)),  # floor 0.5 * .340 = .170: .186 stays, .152 goes
]


@pytest.mark.parametrize("temperature, filters, expected", HAND, ids=[f"T{t}-{f}" for t, f, _ in HAND])
def test_filters_leave_the_hand_computed_distribution(temperature, filters, expected):
    left = filtered_log_weights(LOGITS, Sampling(temperature, **filters), exclude=MASK).softmax(-1)
    assert left.tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("temperature, filters, expected", HAND[1:6] + HAND[9:10],
                         ids=[f"T{t}-{f}" for t, f, _ in HAND[1:6] + HAND[9:10]])
def test_the_sampler_draws_the_filtered_distribution(temperature, filters, expected):
    draws = gumbel_candidates(LOGITS.expand(40000, 6), Sampling(temperature, **filters),
                              torch.Generator().manual_seed(0), exclude=MASK)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert (freq - torch.tensor(expected)).abs().max() < 0.01
    assert set(draws.unique().tolist()) == {i for i, p in enumerate(expected) if p > 0}  # removed: never drawn


def test_ties_at_the_boundaries():
    ties = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert filtered_log_weights(ties, Sampling(1.0, top_k=2)).isfinite().tolist() == [True, True, True, False]
    flat = torch.zeros(4)  # 0.25 each: the lower ids come first, and 0.25 + 0.25 = 0.5 is enough for top-p 0.5
    assert filtered_log_weights(flat, Sampling(1.0, top_p=0.5)).isfinite().tolist() == [True, True, False, False]


def test_no_filter_is_the_plain_sampler_and_the_stream_is_the_same():
    logits = torch.randn(6, 5, 300, generator=torch.Generator().manual_seed(1))
    for temperature in (0.5, 1.0):
        plain = gumbel_candidates(logits, temperature, torch.Generator().manual_seed(4), exclude=2)
        for off in ({}, {"top_p": 1.0}, {"min_p": 0.0}):
            assert torch.equal(gumbel_candidates(logits, Sampling(temperature, **off),
                                                 torch.Generator().manual_seed(4), exclude=2), plain)
        before, after = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        gumbel_candidates(logits, temperature, before, exclude=2)
        filtered = gumbel_candidates(logits, Sampling(temperature, top_k=3), after, exclude=2)
        assert torch.equal(before.get_state(), after.get_state())  # the same numbers consumed
        top3 = logits.masked_fill(torch.arange(300) == 2, float("-inf")).topk(3, dim=-1).indices
        assert (filtered[..., None] == top3).any(-1).all() and not torch.equal(filtered, plain)


def test_at_temperature_zero_the_filters_change_nothing():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(2))
    greedy = gumbel_candidates(logits, 0.0, None, exclude=7)
    assert torch.equal(gumbel_candidates(logits, Sampling(0.0, top_k=1, top_p=0.01, min_p=1.0), None, exclude=7),
                       greedy)


@pytest.mark.parametrize("bad, where", [({"top_k": 0}, "--top-k"), ({"top_k": -1}, "--top-k"),
                                        ({"top_k": True}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
                                        ({"top_p": 1.5}, "--top-p"), ({"top_p": math.nan}, "--top-p"),
                                        ({"min_p": -0.1}, "--min-p"), ({"min_p": math.inf}, "--min-p")])
def test_out_of_range_filters_are_refused(bad, where):
    values = {"top_k": None, "top_p": None, "min_p": None, **bad}
    with pytest.raises(ConfigError) as err:
        check_sampling(**values)
    assert err.value.where == where
    check_sampling(top_k=1, top_p=1.0, min_p=0.0)  # the edges are allowed


# -- real decodes --------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 33, 8, 21], [40, 41, 9]]
DECODERS = [("hard-mask", {}), ("evotoken", {}), ("d2f", {"block_size": 4, "skip_threshold": 0.3}),
            ("d2f", {"block_size": 4, "skip_threshold": 0.3, "soft": True})]


def run(model, name, options, **request):
    cls = get(name)
    decoder = cls(parse_options(cls.Config, options, decoder=name))
    req = GenerationRequest(prompts=PROMPTS, gen_length=12, block_length=4, steps=12, **request)
    return decoder.generate(model, req).rows


@pytest.mark.parametrize("name, options", DECODERS, ids=["hard-mask", "evotoken", "d2f", "d2f-soft"])
def test_every_decoder_samples_only_what_the_filter_leaves(tiny_model, name, options):
    """Each written token is among the 2 most probable of the pass that wrote it (its logprob record), with
    top_k=2 at a temperature that, unfiltered, writes tokens outside them."""
    def outside_top2(rows):
        return sum(lp.top[0][0] != t and lp.top[1][0] != t
                   for row in rows for t, lp in zip(row.token_ids, row.logprobs) if lp is not None)

    hot = {"temperature": 5.0, "seed": 3, "logprobs": 2}
    assert outside_top2(run(tiny_model, name, options, **hot)) > 0  # the check can fail
    filtered = run(tiny_model, name, options, top_k=2, **hot)
    assert outside_top2(filtered) == 0
    assert all(lp is not None for row in filtered for lp in row.logprobs[:4])  # positions were written


@pytest.mark.parametrize("name, options", [DECODERS[0], DECODERS[2]], ids=["hard-mask", "d2f"])
def test_top_k_one_samples_the_greedy_answer(tiny_model, name, options):
    """top_k=1 leaves only the argmax: any seed at any temperature decodes the greedy answer (hard-mask and
    d2f rank by the same confidences at every temperature; evotoken leaves [MASK] out of them at T = 0 only)."""
    greedy = [r.token_ids for r in run(tiny_model, name, options)]
    for seed in (0, 1):
        assert [r.token_ids for r in run(tiny_model, name, options, temperature=2.0, seed=seed, top_k=1)] == greedy
    assert [r.token_ids for r in run(tiny_model, name, options, temperature=2.0, seed=0)] != greedy


def test_generate_flags_and_json_params(cli, tiny_llada):
    args = ["generate", "-m", str(tiny_llada), "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps",
            "8", "--json"]
    greedy = json.loads(cli(*args).stdout)
    assert {k: greedy["params"][k] for k in ("top_k", "top_p", "min_p")} == {"top_k": None, "top_p": None,
                                                                              "min_p": None}
    sampled = json.loads(cli(*args, "--temperature", "3", "--top-k", "1", "--top-p", "0.9", "--min-p", "0.1").stdout)
    assert {k: sampled["params"][k] for k in ("top_k", "top_p", "min_p")} == {"top_k": 1, "top_p": 0.9, "min_p": 0.1}
    assert sampled["results"][0]["token_ids"] == greedy["results"][0]["token_ids"]
    from_env = cli(*args, "--temperature", "3", env={"EVOTOK_TOP_K": "1"})
    assert json.loads(from_env.stdout)["results"][0]["token_ids"] == greedy["results"][0]["token_ids"]


# -- seeds ---------------------------------------------------------------------------------------------
def test_derived_seeds_are_stable_distinct_and_in_range():
    assert derive_seed(1234, 0) == 1234  # one choice reproduces with `evotok generate --seed 1234`
    assert derive_seed(0, 1) == 2927467114711697142  # pinned: the same on every run and platform
    seeds = [derive_seed(s, i) for s in range(40) for i in range(1, 16)]
    assert len(set(seeds) | set(range(40))) == len(seeds) + 40  # no overlap: not seed + i
    assert all(0 <= s < SEED_LIMIT for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # torch takes them


def test_fresh_seeds_differ_and_fit_json():
    drawn = {fresh_seed() for _ in range(20)}
    assert len(drawn) == 20 and all(0 <= s < FRESH_SEED_LIMIT for s in drawn)
    assert FRESH_SEED_LIMIT <= 2**53
