"""Log-probabilities of the generated tokens (`GenerationRequest.logprobs`): the model's distribution at the
pass that wrote each token for the last time, checked against a forward pass of our own (hard-mask) and
against the logits of that pass (evotoken, whose revisions move the pass; d2f)."""

from __future__ import annotations

import math

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.decoding.registry import get

PROMPTS = [[5, 17, 33, 8, 21], [40, 41, 9]]


class PassLogits:
    """The real model, keeping the logits of every pass it runs (in order) and what it was fed."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kw):
        logits = self.model(*args, **kw)
        self.passes.append((logits.clone(), kw.get("logits_slice"), kw.get("start", 0)))
        return logits


def decode(model, name, options=None, prompts=PROMPTS, **request):
    cls = get(name)
    decoder = cls(parse_options(cls.Config, options or {}, decoder=name))
    events: list = []
    req = GenerationRequest(prompts=prompts, gen_length=12, block_length=4, steps=12, trace=True,
                            on_event=events.append, **request)
    return decoder.generate(model, req), events


def last_writes(events, row: int) -> dict[int, int]:
    """position -> the step (1-based pass of the row) that wrote it for the last time, from the trace."""
    out: dict[int, int] = {}
    for e in events:
        if e.row == row:
            for i in e.committed + e.revised:
                out[i] = e.step
    return out


def log_softmax_without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    scores = logits.double().clone()
    scores[..., mask_id] = float("-inf")
    return torch.log_softmax(scores, dim=-1)


def test_greedy_hard_mask_logprob_is_the_max_of_its_commit_pass(tiny_model):
    """At T = 0 the committed token is the argmax: its logprob is the max of the log-softmax of the pass that
    committed it, which we recompute here with a plain forward over the canvas as it was before that pass."""
    out, events = decode(tiny_model, "hard-mask", prompts=[PROMPTS[0]], logprobs=3)
    row, prompt = out.rows[0], PROMPTS[0]
    writes = last_writes(events, 0)
    assert sorted(writes) == list(range(12))
    before = {1: [tiny_model.mask_id] * 12}
    for e in events:
        before[e.step + 1] = e.tokens
    for pos, step in writes.items():
        canvas = torch.tensor([prompt + before[step]])
        logits = tiny_model(canvas, position_ids=torch.arange(canvas.shape[1])[None],
                            logits_slice=(len(prompt), canvas.shape[1]))[0, pos]
        dist = log_softmax_without_mask(logits, tiny_model.mask_id)
        record = row.logprobs[pos]
        assert record.logprob == pytest.approx(dist.max().item(), abs=1e-5)
        assert dist[row.token_ids[pos]].item() == pytest.approx(record.logprob, abs=1e-5)
        top = dist.topk(3)
        assert [i for i, _ in record.top] == top.indices.tolist()
        assert [v for _, v in record.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_evotoken_reads_the_pass_of_the_final_write(tiny_model):
    """EvoToken revises tokens: a position's logprob is its final token's under the logits of the last pass
    that wrote it (commit or revision), not of the pass that first committed it."""
    spy = PassLogits(tiny_model)
    out, events = decode(spy, "evotoken", prompts=[PROMPTS[0]], logprobs=2)
    row = out.rows[0]
    first = {}
    for e in events:
        for i in e.committed:
            first.setdefault(i, e.step)
    writes = last_writes(events, 0)
    revised_later = [p for p in writes if writes[p] > first[p]]
    assert revised_later, "no revision on this prompt: the test would not exercise the final-write rule"
    g0 = len(PROMPTS[0])
    for pos, step in writes.items():
        logits, (lo, _), start = spy.passes[step - 1]  # the row decodes alone: pass k is the model's call k
        column = g0 + pos - (start + lo)  # logits rows are the fed columns from logits_slice[0]
        dist = log_softmax_without_mask(logits[0, column], tiny_model.mask_id)
        assert row.logprobs[pos].logprob == pytest.approx(dist[row.token_ids[pos]].item(), abs=1e-6)
        assert row.logprobs[pos].top[0][0] == int(dist.argmax())
    pos = revised_later[0]
    at_commit = spy.passes[first[pos] - 1]
    dist = log_softmax_without_mask(at_commit[0][0, g0 + pos - at_commit[1][0] - at_commit[2]], tiny_model.mask_id)
    assert row.logprobs[pos].logprob != pytest.approx(dist[row.token_ids[pos]].item(), abs=1e-6)


@pytest.mark.parametrize("options", [{"block_size": 4, "skip_threshold": 0.3},
                                     {"block_size": 4, "skip_threshold": 0.3, "soft": True}], ids=["hard", "soft"])
def test_greedy_d2f_tokens_are_the_argmax_of_their_pass(tiny_model, options):
    out, _ = decode(tiny_model, "d2f", options, logprobs=4)
    for row in out.rows:
        for token, record in zip(row.token_ids, row.logprobs):
            if record is None:  # a block never added (after EOS): filled with EOS, never decoded
                assert token == tiny_model.eos_id
                continue
            assert record.top[0] == (token, pytest.approx(record.logprob, abs=1e-9))
            values = [v for _, v in record.top]
            assert values == sorted(values, reverse=True) and values[0] <= 0
            assert math.fsum(math.exp(v) for v in values) <= 1 + 1e-9


@pytest.mark.parametrize("name", ["hard-mask", "evotoken", "d2f"])
def test_logprobs_change_no_token_and_cost_nothing_unasked(tiny_model, name):
    options = {"block_size": 4} if name == "d2f" else {}
    plain, _ = decode(tiny_model, name, options, temperature=1.0, seed=5)
    asked, _ = decode(tiny_model, name, options, temperature=1.0, seed=5, logprobs=0)
    assert [r.token_ids for r in asked.rows] == [r.token_ids for r in plain.rows]
    assert all(r.logprobs is None for r in plain.rows)
    assert all(lp is None or lp.top == [] for r in asked.rows for lp in r.logprobs)


def test_row_result_reports_answer_tokens_only(tiny_model):
    from evotok_cli.jobs.generation import row_result
    from evotok_cli.runtime.prompts import Prompt

    out, _ = decode(tiny_model, "hard-mask", prompts=[PROMPTS[0]], logprobs=2)
    row = out.rows[0]
    plain = row_result(tiny_model, Prompt(None, ids=PROMPTS[0]), row, 0.0)
    assert len(plain["logprobs"]) == plain["tokens"]
    entry = plain["logprobs"][0]
    assert entry["id"] == row.token_ids[0] and entry["logprob"] == row.logprobs[0].logprob
    assert entry["token"] == tiny_model.decode([row.token_ids[0]]) and len(entry["top"]) == 2
    assert set(entry["top"][0]) == {"id", "token", "logprob"}
    cut = row_result(tiny_model, Prompt(None, ids=PROMPTS[0]), row, 0.0, max_tokens=1)
    assert cut["tokens"] <= 1 and len(cut["logprobs"]) == cut["tokens"]
    unasked, _ = decode(tiny_model, "hard-mask", prompts=[PROMPTS[0]])
    assert "logprobs" not in row_result(tiny_model, Prompt(None, ids=PROMPTS[0]), unasked.rows[0], 0.0)


@pytest.mark.parametrize("name, options", [("hard-mask", {}), ("evotoken", {"cache": "prefix"}),
                                           ("d2f", {"block_size": 4, "skip_threshold": 0.3})])
def test_shifted_logits_records_read_the_right_column(tiny_dream, name, options):
    """Dream predicts position i from the output at i - 1: at T = 0 every written token is still the most
    probable of its record (a column off by one would record another position's distribution)."""
    from evotok_cli.runtime.model import load_model

    dream = load_model(tiny_dream)
    assert dream.shifted_logits
    out, _ = decode(dream, name, options, logprobs=1)
    records = [(t, lp) for row in out.rows for t, lp in zip(row.token_ids, row.logprobs) if lp is not None]
    assert len(records) >= 12
    assert all(lp.top[0] == (t, pytest.approx(lp.logprob, abs=1e-9)) for t, lp in records)
