"""`evotok generate` as a library call: prompts in, one result per prompt out (batched)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from evotok_cli.decoding import registry
from evotok_cli.decoding.api import GenerationRequest, StepEvent, parse_options, settings_used
from evotok_cli.errors import ConfigError
from evotok_cli.files import atomic_open
from evotok_cli.prompts import Prompt
from evotok_cli.runtime.device import synchronize

TRACE_SCHEMA = "evotok.trace/1"


def make_decoder(name: str, options: dict[str, Any], *, where: str = "--opt") -> Any:
    cls = registry.get(name)
    return cls(parse_options(cls.Config, options, decoder=name, where=where))


def check_settings(decoder: Any, *, gen_length: int, block_length: int, steps: int, temperature: float) -> None:
    """Validate the generation settings `decoder` reads, before the model loads (d2f, for one, has no
    block length or step budget of ours, so those are not checked for it)."""
    import math

    from evotok_cli.decoding.schedule import block_layout

    used = settings_used(decoder)
    if "block_length" in used or "steps" in used:
        block_layout(gen_length, block_length, steps)
    elif gen_length <= 0:
        raise ConfigError(f"gen length must be positive, got {gen_length}", where="--gen-length",
                          fix="e.g. --gen-length 128")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}", where="--temperature",
                          fix="e.g. 0 for greedy decoding, or 0.5")
    own_check = getattr(decoder, "check_settings", None)
    if own_check is not None:
        own_check(gen_length=gen_length, block_length=block_length, steps=steps)


def split_options(decoders: list[str], options: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Give each decoder the options it knows; an option no selected decoder knows is an error."""
    known = {d: {f.name for f in dataclasses.fields(registry.get(d).Config)} for d in decoders}
    for key in options:
        if not any(key in names for names in known.values()):
            # let the first decoder's parser produce the one-line error with its suggestions
            parse_options(registry.get(decoders[0]).Config, {key: options[key]}, decoder=decoders[0], where=where)
    return {d: {k: v for k, v in options.items() if k in known[d]} for d in decoders}


class TraceWriter:
    """Append one JSON line per forward pass and row (schema in docs/trace.md)."""

    def __init__(self, handle: TextIO, decoder: str, model: Any, offset: int = 0):
        self.handle, self.decoder, self.model, self.offset = handle, decoder, model, offset

    def __call__(self, event: StepEvent) -> None:
        record = {"schema": TRACE_SCHEMA, "decoder": self.decoder, "prompt_index": self.offset + event.row,
                  "mask_id": self.model.mask_id, "model": str(self.model.path)}  # `evotok trace` finds the tokenizer
        record.update(dataclasses.asdict(event))
        record.pop("row")
        self.handle.write(json.dumps(record) + "\n")


def generate(model: Any, decoder_name: str, decoder: Any, prompts: list[Prompt], *, gen_length: int,
             block_length: int, steps: int, temperature: float, seed: int | None, batch_size: int = 8,
             trace: Path | None = None, on_pass: Callable[[int], None] | None = None,
             on_event: Callable[[StepEvent], None] | None = None,
             on_batch: Callable[[int, int], None] | None = None,
             seeds: list[int] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Decode `prompts` in the step engine, at most `batch_size` rows at a time (a finished row's place is
    refilled at once); returns one result per prompt and the wall time. Prompt i samples from seed + i
    (or `seeds[i]`), whatever the batch size."""
    from evotok_cli.decoding.engine import Engine, make_jobs

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="e.g. --batch-size 8")
    check_settings(decoder, gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature)
    with atomic_open(trace) if trace else nullcontext() as handle:  # a trace appears whole or not at all
        listeners = [f for f in (TraceWriter(handle, decoder_name, model) if handle else None, on_event) if f]
        request = GenerationRequest(
            prompts=[p.ids for p in prompts], gen_length=gen_length, block_length=block_length, steps=steps,
            temperature=temperature, seed=seed, seeds=seeds, trace=bool(listeners),
            on_event=(lambda e: [f(e) for f in listeners]) if listeners else None)
        engine = Engine(model, max_rows=batch_size)
        jobs = make_jobs(model, decoder, request, cohort=batch_size)
        done_rows = [0]

        def on_done(job: Any) -> None:
            done_rows[0] += job.rows
            if on_batch is not None and job.error is None:
                on_batch(done_rows[0], len(prompts))

        for _, job in jobs:
            job.on_done = on_done
            engine.submit(job)

        synchronize(model.device)
        t0 = time.perf_counter()
        engine.run(on_step=(lambda e: on_pass(e.steps)) if on_pass is not None else None)
        synchronize(model.device)
        wall = time.perf_counter() - t0
    errors = [job.error for _, job in jobs if job.error is not None]
    if errors:
        raise errors[0]
    results = [row_result(model, prompts[first + offset], row, job.seconds)
               for first, job in jobs for offset, row in enumerate(job.result.rows)]
    return results, wall


def row_result(model: Any, prompt: Prompt, row: Any, seconds: float) -> dict[str, Any]:
    """One prompt's result as `generate --json` reports it (the server answers from the same dict)."""
    return {
        "prompt": prompt.text if prompt.text is not None else prompt.ids,
        "text": model.answer_text(row.token_ids),
        "token_ids": row.token_ids,
        "nfe": row.nfe,
        "seconds": seconds,  # this row's own: from joining the running batch to leaving it
        "tokens": answer_tokens(row.token_ids, model.stop_ids),
    }


def answer_tokens(ids: list[int], stop_ids: tuple[int, ...]) -> int:
    """Tokens up to the first stop id: what the anchors count for tokens/s (spec 6.5)."""
    return next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
