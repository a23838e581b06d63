"""The decoder contract: a `name`, a typed `Config` dataclass, and `generate(model, request) -> result`.

Options reach a decoder as strings (`--opt key=value`, YAML) and are parsed and range-checked here, from
the dataclass field types and their metadata, so every plugin gets the same one-line errors for free.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args, get_origin, runtime_checkable

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import option as _declare
from evotok_cli.base.values import Bounds


def option(default: Any, help: str, *, min: float | None = None, max: float | str | None = None,
           min_open: bool = False, max_open: bool = False) -> Any:
    """A decoder option: its default, one line of help, and its allowed range. A `max` that is a name
    ("vocab_size") is that property of the model: `check_model_options` checks it once the model is known.

    The same declaration as a command option (`options.option`), without a flag of its own: a decoder
    option is set by `--opt key=value` or YAML, and its range is checked by the same `values.Bounds`."""
    return _declare(default, help, min=min, max=max, min_open=min_open, max_open=max_open, cli=None)


# -- the commit rule the blockwise decoders share ------------------------------------------------
def remasking_option() -> Any:
    return option("low_confidence", "rank masked positions by the candidate's probability, or randomly")


def threshold_option() -> Any:
    return option(None, "Fast-dLLM parallel decoding: commit every candidate with confidence >= this instead of "
                        "the schedule's count (always at least one per pass)", min=0.0, max=1.0, min_open=True)


@dataclass
class CommitOptions:
    """How a blockwise decoder (hard-mask, evotoken) picks what a pass commits: options of those decoders,
    declared here once for them and for `evotok generate`'s shorthand flags (`--remasking X` is
    `--opt remasking=X`), whose help is theirs."""

    remasking: Literal["low_confidence", "random"] = remasking_option()
    threshold: float | None = threshold_option()


class Sampling(float):
    """A sampling temperature that carries the filters of the distribution it samples from: `top_k`,
    `top_p` and `min_p` (None: off). It is the temperature (a float: compared, multiplied, passed as
    `temperature` like any other), so that the filters reach `gumbel_candidates` through every decoder's
    `update(..., temperature)`, third-party ones included, without a new argument on any hook.

    The filters shape the candidate distribution p = softmax(logits / T), [MASK] left out, where a
    decoder samples (T > 0), in this order, each over what the previous one kept, renormalised:
    `top_k` keeps the k most probable tokens (and any tied with the k-th); `top_p` the smallest set of
    most probable tokens whose probability sums to at least top_p (ties in the lower id's favour);
    `min_p` the tokens with at least min_p times the probability of the most probable one. The most
    probable token always survives, so at T = 0 (the argmax) the filters change nothing, and the
    confidences that rank candidates for commitment are untouched: a filter changes which candidate a
    position draws, never how candidates are ranked.
    """

    top_k: int | None
    top_p: float | None
    min_p: float | None

    def __new__(cls, temperature: float, *, top_k: int | None = None, top_p: float | None = None,
                min_p: float | None = None) -> Sampling:
        value = super().__new__(cls, temperature)
        value.top_k, value.top_p, value.min_p = top_k, top_p, min_p
        return value

    def __repr__(self) -> str:
        return f"Sampling({float(self)!r}, top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p})"

    @property
    def filtered(self) -> bool:
        """Whether a filter can remove a token (top_p 1, min_p 0 and no top_k remove none)."""
        return (self.top_k is not None or (self.top_p is not None and self.top_p < 1)
                or (self.min_p is not None and self.min_p > 0))


TOP_K, TOP_P, MIN_P = Bounds(min=1), Bounds(min=0, max=1, min_open=True), Bounds(min=0, max=1)  # the filters


def check_sampling(*, top_k: int | None, top_p: float | None, min_p: float | None) -> None:
    """The filters' ranges, checked before the model loads: top_k >= 1, top_p in (0, 1], min_p in [0, 1]."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not TOP_K.contains(top_k)):
        raise ConfigError(f"top-k must be an integer {TOP_K.phrase()}, got {top_k}", where="--top-k",
                          fix="e.g. --top-k 50, or leave it out for no top-k filter")
    if top_p is not None and not TOP_P.contains(top_p):  # nan fails too
        raise ConfigError(f"top-p must be {TOP_P.phrase()}, got {top_p}", where="--top-p",
                          fix="e.g. --top-p 0.9, or leave it out for no top-p filter")
    if min_p is not None and not MIN_P.contains(min_p):
        raise ConfigError(f"min-p must be {MIN_P.phrase()}, got {min_p}", where="--min-p",
                          fix="e.g. --min-p 0.05, or leave it out for no min-p filter")


@dataclass
class GenerationRequest:
    """What every decoder is asked to do, for a batch of prompts (token ids, different lengths)."""

    prompts: list[list[int]]
    gen_length: int = 128
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    seed: int | None = None  # row i draws from seed + i, unless `seeds` names each row's seed
    seeds: list[int | None] | None = None
    trace: bool = False  # build a StepEvent per forward pass and row
    on_event: Callable[[StepEvent], None] | None = None  # receives StepEvents when trace is on
    on_pass: Callable[[int], None] | None = None  # called after each forward pass with the pass count
    on_final: Callable[[FinalPrefix], None] | None = None  # a decoder with `final_events`: the final prefix grew
    top_k: int | None = None  # filters of the sampled distribution (`Sampling`); None: off
    top_p: float | None = None
    min_p: float | None = None
    logprobs: int | None = None  # collect each token's log-probability and this many alternatives (`TokenLogprob`)
    # a program whose rows finish at passes of their own (d2f's merged rows) hands a finished row's result
    # here at once, (row, its one-row GenerationResult), rather than only with every row's at the end
    on_row: Callable[[int, GenerationResult], None] | None = None
    # a merged program whose rows need no lockstep (d2f's) may take rows while it runs: it sets `joins.accept`
    # (decoding/merging.MergedRows); None for every other request
    joins: Any = None

    @property
    def sampling(self) -> Sampling:
        """The temperature with the request's filters, as decoders pass it to `gumbel_candidates`."""
        return Sampling(self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


@dataclass
class TokenLogprob:
    """A generated position's token as the decoder had it at the pass that wrote it for the last time (its
    commit, or its last revision to another token): its log-probability under the model's distribution of
    that pass (log-softmax of the pass's logits at temperature 1, [MASK] left out, before temperature,
    sampling filters and decoder options that forbid tokens), and the `top` most probable tokens then as
    (token id, log-probability), most probable first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowResult:
    token_ids: list[int]  # the whole generated span (gen_length ids)
    nfe: int  # forward passes this row needed (as if it had been decoded alone)
    # with request.logprobs: one per generated position (None where no pass wrote it, e.g. d2f's unused blocks)
    logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenerationResult:
    rows: list[RowResult]
    nfe: int  # forward passes the batch ran
    seconds: float = 0.0


TRACE_SCHEMA = "evotok.trace/1"  # a trace line: this, decoder, prompt_index, mask_id, model, then a StepEvent's fields
TRACE_BLOCK_KEYS = ("start", "end", "state", "fully_activated", "progress")  # each of StepEvent.blocks (d2f)
TRACE_BLOCK_STATES = ("active", "to_cache", "in_cache")


@dataclass
class StepEvent:
    """One forward pass as seen by one row; the trace schema of docs/trace.md, declared here only (a trace
    line is these fields without `row`; `viz.trace.Step` reads one back as a subclass of this).

    Positions are indices into the generated span. `states[i]` is the input state of position i in this
    pass (mask | soft_mask | soft | decoded); `candidates[i]` the (token, weight) pairs of its soft input;
    `tokens`/`confidence` the discrete slot after this pass's update.
    """

    step: int
    row: int
    block: tuple[int, int]
    states: list[str]
    tokens: list[int]
    confidence: list[float | None]
    committed: list[int]
    revised: list[int]
    candidates: list[list[tuple[int, float]]] | None = None
    blocks: list[dict[str, Any]] | None = None  # d2f: the block pipeline after this pass


@dataclass
class FinalPrefix:
    """A row's generated positions before `end` can no longer change: what a streamed answer needs, without
    a per-pass trace (`GenerationRequest.on_final`; a decoder whose class sets `final_events` sends one
    per block boundary, one device read of the canvas per block)."""

    row: int
    tokens: list[int]  # the generated span now; positions from `end` on may still change
    end: int


def row_seed(request: GenerationRequest, row: int) -> int | None:
    """The seed of one row's random generator: rows never share a stream, so a row samples the same
    tokens whatever batch it is decoded in."""
    if request.seeds is not None:
        return request.seeds[row]
    return None if request.seed is None else request.seed + row


GENERATION_SETTINGS = ("gen_length", "block_length", "steps", "temperature")


class Decoder(Protocol):
    """A decoder plugin. Optional: `settings_used`, the generation settings it reads (default: all of
    GENERATION_SETTINGS), so that the CLI validates and reports only those; and
    `check_settings(gen_length=..., block_length=..., steps=...)`, its own early check of them (raise
    ConfigError), run before the model loads; and `block_constraint`, the block size its options fix (or
    None), which a canvas planned for a `max_tokens` cap must be a whole number of (`canvas_plan`). A decoder
    that also writes `program` (a `ProgramDecoder`, below) shares the step engine's forwards with other rows;
    one with only `generate` is run whole when its turn comes."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None: ...

    def generate(self, model: Any, request: GenerationRequest) -> GenerationResult: ...


@runtime_checkable
class ProgramDecoder(Protocol):
    """A decoder the step engine can interleave with others: besides `generate` (`Decoder`), a `program(model, request)`
    that yields its passes (decoding/engine.py). Every built-in decoder is one; a decoder with `generate`
    alone (an older third-party plugin) still runs, decoded whole when its turn comes. Optional, both False
    when absent: `split(request)`, each row a program of its own (its own random stream and KV slots);
    `sequential(request)`, the rows decoded in turn as one program (rng=reference). Read them through
    `splits_rows` and `decodes_in_turn`."""

    def program(self, model: Any, request: GenerationRequest) -> Generator[Any, Any, GenerationResult]: ...


def splits_rows(decoder: Any, request: GenerationRequest) -> bool:
    """Whether the engine runs each of `request`'s rows as a program of its own (`ProgramDecoder.split`)."""
    return isinstance(decoder, ProgramDecoder) and bool(getattr(decoder, "split", lambda r: False)(request))


def decodes_in_turn(decoder: Any, request: GenerationRequest) -> bool:
    """Whether `request`'s rows are one program decoded row after row (`ProgramDecoder.sequential`)."""
    return isinstance(decoder, ProgramDecoder) and bool(getattr(decoder, "sequential", lambda r: False)(request))


def settings_used(decoder: Any) -> tuple[str, ...]:
    """The generation settings `decoder` (a class or an instance) reads."""
    return tuple(getattr(decoder, "settings_used", GENERATION_SETTINGS))


# -- option parsing ------------------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        text = str(value)
        if text not in [str(a) for a in args]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, args))}", where=where,
                              fix=f"use {key}={args[0]}")
        return next(a for a in args if str(a) == text)
    if origin in (typing.Union, types.UnionType):
        if (value is None or str(value).lower() in ("none", "null", "")) and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if not isinstance(value, str):  # a YAML 1 or 0 where true/false belongs
                raise ValueError
            text = value.strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation in (int, float, str) and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ValueError  # a YAML true, list, mapping or null where a number or a name belongs
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if annotation is float:
            number = float(value)
            if not math.isfinite(number):  # nan would slip through every range check
                raise ConfigError(f"{key}={value!r} is not a finite number", where=where,
                                  fix=f"give {key} a finite number")
            return number
        if annotation is str:
            return str(value)
    except (ValueError, OverflowError):
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{key}={value!r} is not a valid {kind}", where=where, fix=f"give {key} a {kind}") from None
    return value


def _check_range(key: str, value: Any, meta: dict[str, Any], where: str) -> None:
    """The declared range (a model-property bound waits for `check_model_options`)."""
    if value is None or isinstance(value, (str, bool)):
        return
    bounds = Bounds.of(meta)
    if not bounds.contains(value):
        span = bounds.resolved().interval()
        raise ConfigError(f"{key}={value} is out of range {span}", where=where, fix=f"pick {key} in {span}")


@functools.lru_cache(maxsize=64)
def _type_hints(config_cls: type) -> dict[str, Any]:
    """The config's resolved annotations, once per class (a server parses every request's options: 0.3 ms)."""
    return typing.get_type_hints(config_cls)


def parse_options(config_cls: type, options: dict[str, Any], *, decoder: str, where: str = "--opt") -> Any:
    """Build `config_cls` from string/YAML values, with a one-line error for each bad key or value."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = _type_hints(config_cls)
    values: dict[str, Any] = {}
    for key, raw in options.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"options: {', '.join(fields) or 'none'}"
            raise ConfigError(f"decoder {decoder!r} has no option {key!r}", where=where, fix=hint)
        value = _coerce(raw, hints[name], name, where)
        _check_range(name, value, dict(fields[name].metadata), where)
        values[name] = value
    config = config_cls(**values)
    check = getattr(config, "validate", None)
    if check is not None:
        check(where)
    return config


def check_model_options(config: Any, model: Any, where: str = "--opt") -> None:
    """The options whose upper bound is a property of the model (`option(max="vocab_size")`), once the
    model is known: a top-k above the vocabulary is one line here, not an index error mid-decode."""
    if not dataclasses.is_dataclass(config):
        return
    for f in dataclasses.fields(config):
        bounds, value = Bounds.of(f.metadata), getattr(config, f.name)
        if bounds.model_bound is None or value is None or isinstance(value, bool):
            continue
        known = bounds.resolved(model)
        if known.above(value):
            raise ConfigError(f"{f.name}={value} is above the model's {bounds.model_bound.replace('_', ' ')} "
                              f"({known.max})", where=where, fix=f"pick {f.name} in {known.interval()}")


def describe_options(config_cls: type) -> list[dict[str, Any]]:
    """name, type, default, range and help of each option (for `evotok decoders --details`)."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        ann = hints[f.name]
        kind = "|".join(map(str, get_args(ann))) if get_origin(ann) is Literal else getattr(ann, "__name__", str(ann))
        rows.append({"name": f.name, "type": str(kind).replace("typing.", ""), "default": f.default,
                     "range": Bounds.of(f.metadata).interval(), "help": f.metadata.get("help", "")})
    return rows
