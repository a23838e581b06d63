"""Left-padded batches: one masked SDPA call per layer against the per-row path (`runtime/attention.py`),
and `evotok bench` admitting items in prompt-length order."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evotok_cli.runtime.attention import attend, resolved_mode
from evotok_cli.runtime.model import load_model
from tests.conftest import write_llada

PROMPTS = [[5, 17, 33, 8, 21], [40, 41], [7, 7, 9, 100, 120, 3, 11], [9]]


def qkv(heads: int, kv_heads: int, length: int, batch: int = 3, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, kv_heads, length, dim, generator=g),
            torch.randn(batch, kv_heads, length, dim, generator=g))


def real_rows(out: torch.Tensor, offsets: list[int], start: int = 0) -> list[torch.Tensor]:
    return [out[b, :, max(0, off - start):] for b, off in enumerate(offsets)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])  # LLaDA's multi-head, Dream's grouped-query
@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_call_agrees_with_rowwise_up_to_rounding(heads, kv_heads, with_mask):
    """The masked call sums each row's terms in another order and over padded (zero-weight) keys: equal up
    to fp32 rounding of sums of <= 40 terms of size ~1, so 1e-5 is ~100x the differences seen (~1e-7)."""
    q, k, v = qkv(heads, kv_heads, 40)
    offsets = [0, 13, 37]  # the last row has three real keys
    mask = None
    if with_mask:  # block-causal, as d2f's: padding queries would see padding keys only, hence no key at all
        block = torch.arange(40) // 8
        mask = (block[None, :] <= block[:, None])[None, None].expand(3, 1, 40, 40)
    masked = attend(q, k, v, mask, offsets, mode="masked")
    rowwise = attend(q, k, v, mask, offsets, mode="rowwise")
    assert torch.isfinite(masked).all()  # padding queries included: a NaN there would reach real rows
    for a, b in zip(real_rows(masked, offsets), real_rows(rowwise, offsets)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_masked_call_with_a_cache_window():
    """Queries for canvas positions [start, start + Lq) against keys [0, Lk), as a prefix cache feeds them."""
    q, _, _ = qkv(4, 4, 10, seed=1)
    _, k, v = qkv(4, 4, 30, seed=2)
    offsets = [0, 22, 5]  # row 1's padding reaches into the fed window
    masked = attend(q, k, v, None, offsets, start=20, mode="masked")
    rowwise = attend(q, k, v, None, offsets, start=20, mode="rowwise")
    assert torch.isfinite(masked).all()
    for a, b in zip(real_rows(masked, offsets, 20), real_rows(rowwise, offsets, 20)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def count_sdpa(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = F.scaled_dot_product_attention

    def counted(q, k, v, **kw):
        calls.append({"kv_heads": k.shape[1], "heads": q.shape[1], "masked": kw.get("attn_mask") is not None,
                      "gqa": kw.get("enable_gqa", False)})
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    return calls


@pytest.fixture(scope="module")
def dream(tiny_dream):
    return load_model(tiny_dream)


@pytest.fixture(params=["llada", "dream"])
def lm(request, tiny_model, dream):
    return tiny_model if request.param == "llada" else dream


def with_mode(model, mode: str):
    """The same loaded weights as a model whose padded-attention mode is `mode` (a model's own setting)."""
    return dataclasses.replace(model, padded_mode=mode)


def padded_forward(model):
    from evotok_cli.decoding.canvas import build_canvas

    canvas = build_canvas(PROMPTS, 4, mask_id=model.mask_id, pad_id=model.eos_id, max_length=64,
                          device=torch.device("cpu"))
    with torch.no_grad():
        return canvas, model(canvas.x, pad_offsets=canvas.pad_offsets, position_ids=canvas.positions)


def test_one_sdpa_call_per_layer_for_a_padded_batch(monkeypatch, lm):
    layers = lm.config.n_layers
    calls = count_sdpa(monkeypatch)
    padded_forward(with_mode(lm, "masked"))
    assert len(calls) == layers and all(c["masked"] for c in calls)
    if lm.family.name == "dream":  # grouped-query heads stay grouped on CPU: the fused kernel takes them
        assert all(c["gqa"] and c["kv_heads"] < c["heads"] for c in calls)
    calls.clear()
    padded_forward(with_mode(lm, "rowwise"))
    assert len(calls) == layers * len(PROMPTS)


def test_masked_logits_match_each_row_alone(lm):
    canvas, batch = padded_forward(with_mode(lm, "masked"))
    _, exact = padded_forward(with_mode(lm, "rowwise"))
    for b, off in enumerate(canvas.pad_offsets):
        with torch.no_grad():
            alone = lm(canvas.x[b:b + 1, off:])
        assert torch.equal(exact[b, off:], alone[0])  # the per-row path: bit for bit
        assert (batch[b, off:] - alone[0]).abs().max() < 1e-4  # the masked call: up to rounding


def test_a_masked_forward_through_a_cache_builds_its_keys_once(monkeypatch, lm):
    """The real-keys mask is built once per forward (not per layer, not kept between forwards) over the
    cache's keys, and a window fed through the cache matches the per-row path up to rounding."""
    from evotok_cli.runtime import attention

    built = []
    real = attention.real_keys
    monkeypatch.setattr(attention, "real_keys", lambda *a: built.append(a[1]) or real(*a))
    canvas, _ = padded_forward(lm)
    width = canvas.x.shape[1]
    logits = {}
    for mode in ("masked", "rowwise"):
        model, cache = with_mode(lm, mode), lm.new_cache(len(PROMPTS), width)
        with torch.no_grad():
            model(canvas.x, pad_offsets=canvas.pad_offsets, position_ids=canvas.positions, cache=cache)
            lo = width - 4
            logits[mode] = model(canvas.x[:, lo:], pad_offsets=canvas.pad_offsets, cache=cache, start=lo,
                                 position_ids=canvas.positions[:, lo:])
    assert built == [width, width]  # the masked model's two forwards, each over the cache's `width` keys
    assert (logits["masked"] - logits["rowwise"]).abs().max() < 1e-4  # the window: real queries of every row


def test_masked_batches_decode_the_tokens_of_single_runs(lm):
    """On these test checkpoints (std 0.3: peaked predictions, no near-ties) the masked call's rounding
    decides no argmax. Not a guarantee in general (EvoToken's revisions amplify it): see the attention
    module's docstring; the per-row path is exact, and the default on CPU."""
    from evotok_cli.decoding.api import GenerationRequest
    from evotok_cli.jobs.generation import make_decoder

    dec = make_decoder("hard-mask", {})
    settings = {"gen_length": 8, "block_length": 4, "steps": 8}
    masked = with_mode(lm, "masked")
    batch = dec.generate(masked, GenerationRequest(prompts=PROMPTS, **settings))
    alone = [dec.generate(masked, GenerationRequest(prompts=[p], **settings)).rows[0] for p in PROMPTS]
    assert [r.token_ids for r in batch.rows] == [r.token_ids for r in alone]


def test_off_cpu_a_masked_grouped_query_call_expands_the_heads(monkeypatch):
    """CUDA's masked fused kernel takes no grouped heads; meta tensors stand in for a GPU here."""
    calls = count_sdpa(monkeypatch)
    q, k, v = (t.to("meta") for t in qkv(4, 2, 12))
    assert resolved_mode(q.device) == "masked" and resolved_mode(torch.device("cpu")) == "rowwise"
    out = attend(q, k, v, None, [0, 3, 5])  # "auto": masked off the CPU
    assert out.shape == q.shape and calls[-1] == {"kv_heads": 4, "heads": 4, "masked": True, "gqa": False}
    attend(q, k, v)  # nothing padded, no mask: the heads stay grouped
    assert calls[-1] == {"kv_heads": 2, "heads": 4, "masked": False, "gqa": True}


def test_modes_resolve_purely_and_are_checked():
    """`resolved_mode` is a function of its arguments: no process-wide mode is left to set or restore."""
    from evotok_cli.runtime import attention

    cpu, gpu = torch.device("cpu"), torch.device("meta")
    assert [resolved_mode(cpu, m) for m in (None, "auto", "masked", "rowwise")] == ["rowwise", "rowwise", "masked",
                                                                                   "rowwise"]
    assert [resolved_mode(gpu, m) for m in (None, "auto", "masked", "rowwise")] == ["masked", "masked", "masked",
                                                                                   "rowwise"]
    assert not hasattr(attention, "padded_mode") and not hasattr(attention, "set_padded_mode")
    assert not hasattr(attention, "_real_keys_memo")
    with pytest.raises(ValueError, match="rowwise"):
        resolved_mode(cpu, "row-wise")


def test_two_models_in_one_process_keep_their_own_mode(monkeypatch, tiny_llada):
    """Two loads with different --padded-attention, used in turn: each forward attends by its own model's
    mode (one masked SDPA call per layer, or one call per row and layer), whichever was loaded last."""
    from evotok_cli.base.errors import ConfigError

    masked = load_model(tiny_llada, padded_attention="masked")
    rowwise = load_model(tiny_llada, padded_attention="rowwise")
    default = load_model(tiny_llada)
    assert (masked.padded_attention, rowwise.padded_attention, default.padded_attention) == ("masked", "rowwise",
                                                                                             "rowwise")
    layers = masked.config.n_layers
    calls = count_sdpa(monkeypatch)
    outputs = {}
    for name, model in (("masked", masked), ("rowwise", rowwise), ("masked again", masked)):
        calls.clear()
        canvas, outputs[name] = padded_forward(model)
        per_layer = 1 if name.startswith("masked") else len(PROMPTS)
        assert len(calls) == layers * per_layer and all(c["masked"] == (per_layer == 1) for c in calls), name
    assert torch.equal(outputs["masked"], outputs["masked again"])
    for b, off in enumerate(canvas.pad_offsets):  # the per-row model: bit for bit each row alone
        with torch.no_grad():
            assert torch.equal(outputs["rowwise"][b, off:], rowwise(canvas.x[b:b + 1, off:])[0])
    with pytest.raises(ConfigError, match="padded attention mode"):
        load_model(tiny_llada, padded_attention="row-wise")


# -- bench admits items in prompt-length order -----------------------------------------------------------
def test_bench_groups_items_by_prompt_length(monkeypatch, tmp_path, tokenizer_dir):
    """Batches of similar lengths pad less; results and sample contents are those of doc order."""
    import evotok_cli.jobs.generation as generation
    from evotok_cli.bench.results import comparable
    from evotok_cli.bench.runner import BenchRequest, run_bench

    model = write_llada(tmp_path / "llada", tokenizer_dir, max_length=1024)
    seen: list[list[int]] = []
    real = generation.generate

    def recorded(model, name, decoder, prompts, **kw):
        seen.append([len(p.ids) for p in prompts])
        return real(model, name, decoder, prompts, **kw)

    monkeypatch.setattr(generation, "generate", recorded)
    common = {"tasks": ["countdown3"], "decoders": ["hard-mask"], "model": model, "limit": 7,
              "overrides": {"gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.5}}
    grouped = run_bench(BenchRequest(**common, batch_size=3, out=tmp_path / "grouped"))
    lengths = [n for batch in seen for n in batch]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1 and [len(b) for b in seen] == [3, 3, 1]
    seen.clear()
    plain = run_bench(BenchRequest(**common, batch_size=1, out=tmp_path / "plain"))
    assert sorted(n for batch in seen for n in batch) == lengths  # the same items, one at a time in doc order

    def results(doc: dict) -> list[dict]:  # all but the batch size each run was asked for
        rows = comparable(doc)["results"]
        return [{**r, "settings": {k: v for k, v in r["settings"].items() if k != "batch_size"}} for r in rows]

    assert results(grouped) == results(plain)

    def samples(folder: Path) -> dict[int, tuple]:
        records = [json.loads(line) for line in (folder / "samples_countdown3_hard-mask.jsonl").read_text().splitlines()]
        return {r["doc_id"]: (r["generation"], r["correct"], r["nfe"]) for r in records}

    assert samples(tmp_path / "grouped") == samples(tmp_path / "plain")


# -- --padded-attention ------------------------------------------------------------------------------------
def test_padded_attention_flag_sets_the_mode_and_is_reported(cli, tiny_llada, tmp_path, monkeypatch):
    """generate --json and bench's results.json say which path attended; masked and rowwise give hard-mask's
    tokens alike on the tiny checkpoint (std 0.3 keeps its predictions clear of near-ties; the rounding
    differences are ~1e-7)."""
    from evotok_cli.bench.runner import BenchRequest, run_bench

    prompts = ["-p", "hi", "-p", "What is 2 + 3? Tom has 12 apples and buys 5 more."]
    args = ["generate", "-m", str(tiny_llada), *prompts, "--gen-length", "8", "--block-length", "4", "--steps", "8",
            "--json"]
    seen = {}
    for mode in ("masked", "rowwise"):
        proc = cli(*args, "--padded-attention", mode)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["params"]["padded_attention"] == mode
        seen[mode] = [r["token_ids"] for r in doc["results"]]
    assert seen["masked"] == seen["rowwise"]
    proc = cli(*args, env={"EVOTOK_PADDED_ATTENTION": "masked"})
    assert json.loads(proc.stdout)["params"]["padded_attention"] == "masked"
    assert json.loads(cli(*args).stdout)["params"]["padded_attention"] == "rowwise"  # auto on CPU
    doc = run_bench(BenchRequest(tasks=["sudoku4"], decoders=["hard-mask"], model=str(tiny_llada), limit=2,
                                 batch_size=2, overrides={"gen_length": 8, "block_length": 4, "steps": 4},
                                 out=tmp_path / "bench", padded_attention="masked"))
    assert doc["model"]["padded_attention"] == "masked" and doc["config"]["padded_attention"] == "masked"
