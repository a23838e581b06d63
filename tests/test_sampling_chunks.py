"""Gumbel-max sampling at temperature > 0 in row chunks (`schedule.gumbel_candidates`): the tokens and the
random stream of one draw over the whole batch, with float64 temporaries of one chunk."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from evotok_cli.decoding import schedule
from evotok_cli.decoding.schedule import gumbel_candidates, release_draws


def unchunked(logits: torch.Tensor, temperature: float, generator, exclude: int | None = None) -> torch.Tensor:
    """The sampler before chunking: one float64 draw and whole-batch temporaries."""
    scores = logits.to(torch.float64)
    u = generator.gumbel if hasattr(generator, "gumbel") else torch.rand(
        scores.shape, dtype=torch.float64, generator=generator)
    scores = scores.exp() / (-torch.log(u)) ** temperature
    if exclude is not None:
        scores[..., exclude] = float("-inf")
    return scores.argmax(dim=-1)


def flat_logits(batch: int = 6, length: int = 5, vocab: int = 700) -> torch.Tensor:
    """Flat-ish logits: many close competitors, so a changed draw or score would change tokens."""
    return torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0)) * 0.3


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("chunk_elems", [1, 5 * 700, 2 * 5 * 700 + 1, 1 << 22])  # 1 row, 1, 2, all 6 rows
def test_chunks_sample_the_tokens_and_stream_of_one_draw(temperature, chunk_elems):
    logits = flat_logits()
    before, after = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    expected = unchunked(logits, temperature, before, exclude=2)
    got = gumbel_candidates(logits, temperature, after, exclude=2, chunk_elems=chunk_elems)
    assert torch.equal(got, expected) and (got != 2).all()
    assert torch.equal(before.get_state(), after.get_state())  # the same numbers consumed: later draws agree


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_release_draws_are_read_in_chunks_and_left_untouched(temperature):
    logits = flat_logits()
    draws = release_draws(torch.Generator().manual_seed(3), 6, 5, 700, temperature=temperature,
                          random_remasking=False, device=torch.device("cpu"))
    kept = draws.gumbel.clone()
    got = gumbel_candidates(logits, temperature, draws, exclude=2, chunk_elems=700)
    assert torch.equal(got, unchunked(logits, temperature, draws, exclude=2))
    assert torch.equal(draws.gumbel, kept)


class Float64Peak(TorchDispatchMode):
    """Peak bytes of live float64 storages over the ops run inside it (a storage lives while some tensor
    the ops returned for it does)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if any(r() is not None for r in v[1])}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (storage.nbytes(), []))[1].append(weakref.ref(t))
        self.peak = max(self.peak, sum(size for size, _ in self.live.values()))
        return out


def float64_peak(logits: torch.Tensor, chunk_elems: int | None) -> int:
    with Float64Peak() as tracker:
        gumbel_candidates(logits, 1.0, torch.Generator().manual_seed(0), exclude=2, chunk_elems=chunk_elems)
    return tracker.peak


def test_float64_temporaries_are_one_chunks():
    logits = flat_logits(batch=8, length=4, vocab=1000)
    row_bytes = 4 * 1000 * 8
    assert float64_peak(logits, chunk_elems=2 * 4 * 1000) <= 2 * (2 * row_bytes)  # noise + scores, 2 rows
    assert float64_peak(logits, chunk_elems=1) <= 2 * row_bytes  # at least one row a chunk
    assert float64_peak(logits, chunk_elems=1 << 30) >= 2 * (8 * row_bytes)  # the tracker sees whole batches
    with Float64Peak() as tracker:
        unchunked(logits, 1.0, torch.Generator().manual_seed(0), exclude=2)
    assert tracker.peak >= 3 * (8 * row_bytes)  # what chunking saves


@pytest.mark.parametrize("decoder", ["hard-mask", "evotoken"])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_decoders_sample_the_same_tokens_at_any_chunk_size(monkeypatch, tiny_model, decoder, temperature):
    """A batch decoded as one program (one generator over its rows, as a KV-cache cohort is)."""
    from evotok_cli.decoding.api import GenerationRequest
    from evotok_cli.jobs.generation import make_decoder

    dec = make_decoder(decoder, {})
    request = GenerationRequest(prompts=[[5, 17, 33, 8, 21], [40, 41], [7, 9, 100]], gen_length=8,
                                block_length=4, steps=8, temperature=temperature, seed=11)
    whole = dec.generate(tiny_model, request)
    monkeypatch.setattr(schedule, "SAMPLE_CHUNK_ELEMS", 1)  # one row at a time
    chunked = dec.generate(tiny_model, request)
    assert [r.token_ids for r in chunked.rows] == [r.token_ids for r in whole.rows]
