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
             on_batch: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Decode `prompts` in batches; returns one result per prompt and the total wall time."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="e.g. --batch-size 8")
    check_settings(decoder, gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature)
    results: list[dict[str, Any]] = []
    wall = 0.0
    with atomic_open(trace) if trace else nullcontext() as handle:  # a trace appears whole or not at all
        for batch, first in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[first:first + batch_size]
            writer = TraceWriter(handle, decoder_name, model, first) if handle else None
            listeners = [f for f in (writer, on_event) if f]
            request = GenerationRequest(
                prompts=[p.ids for p in chunk], gen_length=gen_length, block_length=block_length, steps=steps,
                temperature=temperature, seed=None if seed is None else seed + first, trace=bool(listeners),
                on_event=(lambda e, ls=listeners: [f(e) for f in ls]) if listeners else None, on_pass=on_pass)
            synchronize(model.device)
            t0 = time.perf_counter()
            out = decoder.generate(model, request)
            synchronize(model.device)
            seconds = time.perf_counter() - t0
            wall += seconds
            for prompt, row in zip(chunk, out.rows):
                answer = answer_tokens(row.token_ids, model.stop_ids)
                results.append({
                    "prompt": prompt.text if prompt.text is not None else prompt.ids,
                    "text": model.answer_text(row.token_ids),
                    "token_ids": row.token_ids,
                    "nfe": row.nfe,
                    "batch": batch,
                    "batch_seconds": seconds,  # rows of a batch finish together: the time is the batch's
                    "tokens": answer,
                })
            if on_batch is not None:
                on_batch(len(results), len(prompts))
    return results, wall


def answer_tokens(ids: list[int], stop_ids: tuple[int, ...]) -> int:
    """Tokens up to the first stop id: what the anchors count for tokens/s (spec 6.5)."""
    return next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
