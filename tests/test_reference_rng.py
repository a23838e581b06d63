"""rng=reference: sampled decoding draws its random numbers as the releases do, so that a seeded run gives
the release's tokens; compared token for token with restatements of LLaDA's `generate` and EvoToken's
`generate_soft_token` (tests/reference.py) at temperature > 0."""

from __future__ import annotations

import pytest

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.jobs.generation import make_decoder
from tests import reference

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]


class _Net:
    """The tiny model as the restatements call it: ids or input embeddings in, (1, L, V) logits out."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x=None, inputs_embeds=None):
        return self.model(x, inputs_embeds=inputs_embeds)

    def embed(self, ids):
        return self.model.embed(ids)


def _ours(model, name, options, *, batch_size, temperature, seed, gen=(8, 4, 8)):
    from evotok_cli.jobs.generation import generate
    from evotok_cli.runtime.prompts import Prompt

    decoder = make_decoder(name, {"rng": "reference", **options})
    results, _ = generate(model, name, decoder, [Prompt(None, ids=p) for p in PROMPTS], gen_length=gen[0],
                          block_length=gen[1], steps=gen[2], temperature=temperature, seed=seed, batch_size=batch_size)
    return [r["token_ids"] for r in results]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("gen", [(8, 4, 8), (8, 4, 16)])  # 16 steps: LLaDA also runs passes on full blocks
@pytest.mark.parametrize("batch_size", [1, 3])
def test_hard_mask_draws_as_llada_generate(tiny_model, remasking, gen, batch_size):
    ours = _ours(tiny_model, "hard-mask", {"remasking": remasking}, batch_size=batch_size, temperature=0.7,
                 seed=42, gen=gen)
    release = reference.llada_release(_Net(tiny_model), PROMPTS, gen_length=gen[0], block_length=gen[1],
                                      steps=gen[2], mask_id=tiny_model.mask_id, temperature=0.7, seed=42,
                                      remasking=remasking)
    assert ours == release


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_evotoken_draws_as_generate_soft_token(tiny_model, remasking, temperature):
    ours = _ours(tiny_model, "evotoken", {"remasking": remasking, "alpha": "0.7", "k_soft": "3"}, batch_size=2,
                 temperature=temperature, seed=42)
    release = reference.evotoken_release(_Net(tiny_model), PROMPTS, gen_length=8, block_length=4, steps=8,
                                         mask_id=tiny_model.mask_id, alpha=0.7, k=3, temperature=temperature,
                                         seed=42, remasking=remasking)
    assert ours == release


def test_the_stream_continues_across_prompts_and_differs_from_fast(tiny_model):
    together = _ours(tiny_model, "evotoken", {}, batch_size=3, temperature=0.9, seed=7)
    fast = make_decoder("evotoken", {})
    request = GenerationRequest(prompts=PROMPTS, gen_length=8, block_length=4, steps=8, temperature=0.9, seed=7)
    assert together != [r.token_ids for r in fast.generate(tiny_model, request).rows]
    first_alone = _ours(tiny_model, "evotoken", {}, batch_size=1, temperature=0.9, seed=7)[0]
    assert together[0] == first_alone  # the first prompt starts the stream either way


def test_reference_rows_are_one_job_holding_one_row(tiny_model):
    decoder = make_decoder("hard-mask", {"rng": "reference"})
    request = GenerationRequest(prompts=PROMPTS, gen_length=8, block_length=4, steps=8, temperature=0.5, seed=1)
    jobs = make_jobs(tiny_model, decoder, request, cohort=8)
    assert len(jobs) == 1 and jobs[0][1].rows == 1
    engine = Engine(tiny_model, max_rows=8)
    engine.submit(jobs[0][1])
    engine.run()
    assert len(jobs[0][1].result.rows) == 3


def test_greedy_reference_equals_fast(tiny_model):
    ref = _ours(tiny_model, "evotoken", {}, batch_size=2, temperature=0.0, seed=0)
    fast = _ours(tiny_model, "evotoken", {"rng": "fast"}, batch_size=2, temperature=0.0, seed=0)
    assert ref == fast


@pytest.mark.parametrize("options", [{"cache": "dual"}, {"threshold": "0.9"}])
def test_reference_refuses_what_the_release_never_ran(options):
    with pytest.raises(ConfigError, match="rng=reference reproduces the release"):
        make_decoder("evotoken", {**options, "rng": "reference"})


def test_bench_reproduces_a_release_evaluation_run(cli, tmp_path, tiny_llada, tiny_model):
    """One stream seeded once and continued across the items in order: the release's evaluation loop."""
    import json

    from evotok_cli.runtime.tokenizer import encode, render_prompt
    from evotok_cli.training.synthetic import data_problems

    out = tmp_path / "runs"
    args = ["bench", "arith-small", "-m", str(tiny_llada), "-d", "hard-mask", "--opt", "rng=reference", "--limit", "3",
            "--temperature", "0.8", "--seed", "42", "--gen-length", "8", "--block-length", "4", "--steps", "8"]
    assert cli(*args, "--out", str(out)).returncode == 0
    lines = [json.loads(x) for p in sorted(out.glob("samples_*.jsonl")) for x in p.read_text().splitlines()]
    lines.sort(key=lambda r: r["index"])
    tok = tiny_model.tokenizer
    prompts = [encode(tok, render_prompt(tok, p.question, chat=True, system=None, prefill="<reasoning>"))
               for p in data_problems("arith-small", "test", 3, 0)]
    assert [r["prompt"] for r in lines] == [render_prompt(tok, p.question, chat=True, system=None,
                                                          prefill="<reasoning>") for p in data_problems("arith-small", "test", 3, 0)]
    release = reference.llada_release(_Net(tiny_model), prompts, gen_length=8, block_length=4, steps=8,
                                      mask_id=tiny_model.mask_id, temperature=0.8, seed=42)
    assert [r["generation"] for r in lines] == [tiny_model.decode(ids) for ids in release]
    first = lines[0]
    (out / "results.json").unlink()
    part = next(out.glob("samples_*.jsonl"))
    part.write_text(json.dumps(first) + "\n")  # a partly finished run
    proc = cli(*args, "--out", str(out))
    assert proc.returncode == 2 and "cannot resume" in proc.stderr
