"""`evotok generate` as a library call: prompts in, one result per prompt out (batched)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.files import atomic_open
from evotok_cli.decoding import registry
from evotok_cli.decoding.api import (
    TRACE_SCHEMA,
    GenerationRequest,
    StepEvent,
    TokenLogprob,
    check_sampling,
    parse_options,
    settings_used,
)
from evotok_cli.jobs.canvas_plan import cut_answer
from evotok_cli.runtime.device import synchronize
from evotok_cli.runtime.prompts import Prompt


def make_decoder(name: str, options: dict[str, Any], *, where: str = "--opt") -> Any:
    cls = registry.get(name)
    return cls(parse_options(cls.Config, options, decoder=name, where=where))


def check_settings(decoder: Any, *, gen_length: int, block_length: int, steps: int, temperature: float,
                   top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                   logprobs: int | None = None) -> None:
    """Validate the generation settings `decoder` reads, before the model loads (d2f, for one, has no
    block length or step budget of ours, so those are not checked for it), the sampling filters and the
    number of logprob alternatives."""
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
    check_sampling(top_k=top_k, top_p=top_p, min_p=min_p)
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise ConfigError(f"logprobs must be an integer >= 0, got {logprobs!r}", where="logprobs",
                          fix="the number of alternatives to report per token, e.g. 5; 0 for the token's own only")
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
             seeds: list[int] | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, logprobs: int | None = None) -> tuple[list[dict[str, Any]], float]:
    """Decode `prompts` in the step engine, at most `batch_size` rows at a time (a finished row's place is
    refilled at once); returns one result per prompt and the wall time. Prompt i samples from seed + i
    (or `seeds[i]`), whatever the batch size, from the distribution top_k / top_p / min_p leave
    (`decoding.api.Sampling`; None: off). With `logprobs` (a count of alternatives, 0 for none) each
    result carries its answer tokens' log-probabilities (`row_result`)."""
    from evotok_cli.decoding.engine import Engine, make_jobs

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="e.g. --batch-size 8")
    check_settings(decoder, gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, logprobs=logprobs)
    from evotok_cli.decoding.api import check_model_options

    check_model_options(getattr(decoder, "config", None), model)  # bounds that depend on the model (k_soft)
    with atomic_open(trace) if trace else nullcontext() as handle:  # a trace appears whole or not at all
        listeners = [f for f in (TraceWriter(handle, decoder_name, model) if handle else None, on_event) if f]
        request = GenerationRequest(
            prompts=[p.ids for p in prompts], gen_length=gen_length, block_length=block_length, steps=steps,
            temperature=temperature, seed=seed, seeds=seeds, trace=bool(listeners),
            on_event=(lambda e: [f(e) for f in listeners]) if listeners else None,
            top_k=top_k, top_p=top_p, min_p=min_p, logprobs=logprobs)
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


def row_result(model: Any, prompt: Prompt, row: Any, seconds: float, *,
               max_tokens: int | None = None) -> dict[str, Any]:
    """One prompt's result as `generate --json` reports it (the server answers from the same dict).

    max_tokens: the answer cut to that many tokens (`canvas_plan.cut_answer`): `token_ids` then ends at the
    cut, so `tokens == len(token_ids)` says the answer ran to the limit. A row decoded with logprobs gains
    `logprobs`, one entry per answer token (`answer_logprobs`)."""
    ids, _ = cut_answer(row.token_ids, max_tokens, model.stop_ids)
    result = {
        "prompt": prompt.text if prompt.text is not None else prompt.ids,
        "text": model.answer_text(ids),
        "token_ids": ids,
        "nfe": row.nfe,
        "seconds": seconds,  # this row's own: from joining the running batch to leaving it
        "tokens": answer_tokens(ids, model.stop_ids),
    }
    if getattr(row, "logprobs", None) is not None:
        result["logprobs"] = answer_logprobs(model, ids[:result["tokens"]], row.logprobs)
    return result


def answer_logprobs(model: Any, ids: list[int], logprobs: list[TokenLogprob | None]) -> list[dict[str, Any]]:
    """Per answer token: its id, its text alone (`model.decode`), its log-probability at the pass that
    wrote it for the last time, and the alternatives of that pass (`top`: id, text, log-probability, most
    probable first); see `decoding.api.TokenLogprob`."""
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        return {"id": token, "token": model.decode([token]), "logprob": logprob}

    return [{**entry(token, None if lp is None else lp.logprob),
             "top": [] if lp is None else [entry(i, v) for i, v in lp.top]} for token, lp in zip(ids, logprobs)]


def answer_tokens(ids: list[int], stop_ids: tuple[int, ...]) -> int:
    """Tokens up to the first stop id: what the anchors count for tokens/s (spec 6.5)."""
    return next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))


# -- seeds of sampled requests ------------------------------------------------------------------------
FRESH_SEED_LIMIT = 2**53  # fresh seeds are below it: exact as a JSON number in every client (JavaScript's too)
SEED_LIMIT = 2**63  # derived seeds are below it: a signed 64-bit integer, which torch's generators take


def derive_seed(request_seed: int, index: int) -> int:
    """The seed of row (choice) `index` of a request seeded `request_seed`: the request's own for row 0, so
    that one choice reproduces with `evotok generate --seed S`; for the others the first 63 bits of
    SHA-256("evotok-seed/1:S:i"), stable across runs, processes and platforms. Unlike seed + i, nearby
    request seeds never share a row's stream (with seed + i, request 5's row 1 is request 6's row 0)."""
    if index == 0:
        return request_seed
    digest = hashlib.sha256(f"evotok-seed/1:{request_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def fresh_seed() -> int:
    """A seed for a sampled request that names none: from the OS's random source (never a clock or a
    process-wide counter, so replicas started together differ), below FRESH_SEED_LIMIT. Returned with the
    answer, it reproduces it."""
    return secrets.randbelow(FRESH_SEED_LIMIT)
