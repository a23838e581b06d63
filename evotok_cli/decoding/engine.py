"""The step engine: a set of live jobs, one forward per step over every row that needs one.

A decoder writes its decoding as a *program*: a generator that yields a `ForwardPass` (the inputs of one
forward over its rows), receives that pass's logits, updates its own state, and finally returns its
`GenerationResult`. The engine owns the loop and the K/V memory: each step it collects the pending pass
of every live job and runs them all as ONE batched forward, whatever their decoder, options, prompt
length, block, window or cache state (uncached, prefix- and dual-cached windows, d2f's block-causal
pipeline, guidance's paired rows), then hands each program its logits. A program that wants a KV cache
does not hold one: its pass says `kv_length` (its canvas length) and `start` (where the fed window sits),
and the engine gives each of its rows a slot of the pool (`runtime/cache.py: KVPool`), writes the
window's keys and values there and attends over everything written so far (refresh what is fed, reuse
the rest). Jobs join at any step and leave when their program returns or is cancelled; their rows and
slots are refilled from the queue at once.

Why this keeps tokens exact: the shared forward packs the rows' input embeddings end to end into one batch row, and
the runtime attends each row over its own keys (its slot, or its fed positions) with its own mask. Two
pools (`make_pool`, chosen once per engine): per-row caches attended one row at a time (`RowBatch`,
`attention.attend_rows`: bit for bit the row alone; the CPU default, `--padded-attention rowwise`), or
one pool tensor per layer written and read through index tensors with one masked call per layer
(`PagedRows`, `attention.attend_paged`: the row alone up to float rounding; the GPU default and any
compiled forward, whose graphs then never depend on the mix of rows: sizes come in buckets). The LM head
runs only at the positions each row asks for (a per-row gather). Each program then updates from its own
logits with its own random generator: every row is a program of its own (`make_jobs`), so every row has
its own stream; rows of several requests admitted in the same step with the same decoder, options and
shape are merged into ONE program over a left-padded canvas that keeps a stream per row
(decoding/merging.py), so that the programs' Python per step grows with those groups, not the rows.
The built-in decoders ask for that update as an `Update`: the engine runs the step's
requests of every group of rows that share a decoder, options and window shape as ONE call on stacked
tensors (the function the row alone runs; per-row generators and counts as lists), and writes each row's
results back in one call, so that the decoders' host work per step grows with the groups, not the rows.

Host work per step: the engine makes at most one device-to-host copy per step, for every row that asked
(`HostRead`: threshold liveness, d2f's block progress and EOS, finished rows' tokens). Capacity: rows
(`max_rows`) and, when given, canvas positions in flight (`max_tokens`, `default_tokens_in_flight`); a
step that runs out of memory is retried split in two before any row fails.

A pass that still carries a cache object of its own (`cache=`, the interface before the pool) runs alone,
as before; `drive(model, program)` runs one program alone: what `decoder.generate` does for library
callers.
"""

from __future__ import annotations

from typing import Any

import torch

from evotok_cli.decoding.api import GenerationResult
from evotok_cli.decoding.background import BackgroundEngine
from evotok_cli.decoding.jobs import decode_together, make_jobs, shifted_listener
from evotok_cli.decoding.memory import CPU_TOKENS_IN_FLIGHT, default_tokens_in_flight
from evotok_cli.decoding.passes import ForwardPass, HostRead, Program, Update, read_all, run_updates
from evotok_cli.decoding.rows import make_pool, run_paged, run_pass, run_rows
from evotok_cli.decoding.stepper import Engine, Job

__all__ = ["CPU_TOKENS_IN_FLIGHT", "BackgroundEngine", "Engine", "ForwardPass", "HostRead", "Job", "Program",
           "Update", "decode_together", "default_tokens_in_flight", "drive", "make_jobs", "make_pool",
           "read_all", "run_paged", "run_pass", "run_rows", "run_updates", "shifted_listener"]


@torch.no_grad()  # what the program runs too (a program's own tensor work never needs autograd)
def drive(model: Any, program: Program) -> GenerationResult:
    """Run one program to its end, alone (its KV slots in a pool of its own)."""
    pool, owner = make_pool(model), object()
    try:
        p = next(program)
        while True:
            if isinstance(p, HostRead):
                p = program.send(p.tensor.tolist())
            elif isinstance(p, Update):
                p = program.send(p.run())
            else:
                p = program.send(run_rows(model, [(owner, p)], pool)[0] if p.cache is None else run_pass(model, p))
    except StopIteration as done:
        return done.value
