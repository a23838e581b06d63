"""Host-device syncs per decoding pass, counted on the CPU.

A sync makes the host wait for the device: while it waits it queues no kernel, so a launch-bound pass (a
cached pass over ~32 tokens at batch 1 on a GPU) cannot overlap its launches with the previous pass's
work. `torch.cuda.set_sync_debug_mode` sees them only on CUDA; here every Python-level call that reads
a device value back is counted instead: `.item()`, `.tolist()`, `bool()` / `int()` / `float()` of a
tensor, `nonzero`, `masked_select`, `unique`, `.cpu()` / `.numpy()`, and indexing or assigning with a
boolean mask (which runs a `nonzero` to size its result). The bounds are what the decoders achieve.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.jobs.generation import make_decoder

T = torch.Tensor
READ_BACKS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
              T.masked_select, torch.masked_select, T.unique, torch.unique, T.cpu, T.numpy}
PROMPTS = [[5, 17, 33, 8, 21], [40, 41], [7, 7, 9, 100, 120, 3, 11], [9, 9, 9]]  # batch 4, left-padded


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)


class SyncCounter(TorchFunctionMode):
    """Counts the read-backs (see the module docstring) made inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_BACKS:
            self.calls[func.__name__] += 1
        elif func in (T.__getitem__, T.__setitem__) and _bool_index(args):
            self.calls[f"{func.__name__}[bool mask]"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def model(tiny_model):
    tiny_model.logits_checked = True  # the one-off NaN check of the first forward is not a per-pass cost
    return tiny_model


def _request(**kw) -> GenerationRequest:
    return GenerationRequest(prompts=PROMPTS, gen_length=16, block_length=8, steps=8, temperature=0.0, seed=0, **kw)


# Per pass: none. hard-mask's step (`llada_step`, decoding/schedule.py) and evotoken's (`evolve`) write the
# committed tokens and confidences with torch.where, not boolean indexing (whose nonzero() would be a
# read-back per read and per write), and `select_transfer` ranks with a top-k per row of a Python count.
# Without a threshold neither reads the canvas back to know whether a block is done
# (`BlockwiseDecoder._takes_pass`). Per generation: one `.tolist()` of the finished tokens.
BOUNDS = {"hard-mask": 0, "evotoken": 0}


@pytest.mark.parametrize("decoder", ["hard-mask", "evotoken"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_read_backs_per_pass_at_batch_4(model, decoder, cache):
    dec = make_decoder(decoder, {"cache": cache})
    with SyncCounter() as counter:
        out = dec.generate(model, _request())
    assert out.nfe == 8
    assert counter.total <= BOUNDS[decoder] * out.nfe + 1, counter.calls


@pytest.mark.parametrize("decoder", ["hard-mask", "evotoken"])
def test_read_backs_through_the_engine(model, decoder):
    """The CLI's path: each row a program of its own, the four sharing one forward per step."""
    dec = make_decoder(decoder, {})
    engine = Engine(model, max_rows=4)
    jobs = [engine.submit(job) for _, job in make_jobs(model, dec, _request(), cohort=4)]
    with SyncCounter() as counter:
        engine.run(jobs)
    assert len(jobs) == 4 and engine.passes == 8
    assert counter.total <= (BOUNDS[decoder] * 8 + 1) * len(jobs), counter.calls  # per row program


def test_a_threshold_reads_back_once_per_pass(model):
    """Rows finish a block at passes of their own: one `.tolist()` per pass says which (and one more per
    block, the check that finds it done)."""
    dec = make_decoder("evotoken", {"threshold": 0.5})
    with SyncCounter() as counter:
        out = dec.generate(model, _request())
    assert counter.total <= out.nfe + 2 + 1, counter.calls  # 2 blocks


def test_the_counter_sees_what_it_should():
    x = torch.arange(6)
    with SyncCounter() as counter:
        x.tolist(), x[0].item(), bool(x[1]), x.nonzero()
        x[x > 2] = 0
        _ = x[x > 0]
        x.masked_fill_(x > 4, 1)  # no read-back
    assert counter.total == 6
