"""A checked request -> what the engine decodes, built by the functions `evotok generate` uses.

Settings resolve as in `generate` minus its flags, variables and YAML: the request's field, else the
model folder's generation_config.json "evotok" defaults, else generate's built-in defaults. Decoder
options and settings are checked by `make_decoder` and `check_settings`; prompts are encoded by
`encode_prompts` (chat: the model's chat template, then its prefill; completions: the raw text).

`max_tokens` is an upper bound, not the canvas (CANVAS_RULE): a diffusion decoder writes a fixed-length
span, so the canvas is chosen from the settings and the answer is cut at `max_tokens` tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from evotok_cli.base.errors import ConfigError, EvotokError
from evotok_cli.decoding.api import GenerationRequest, settings_used
from evotok_cli.runtime.prompts import Prompt, encode_prompts
from evotok_cli.serve.schema import ApiError, CompletionFields, bad

# where a library error points (a generate flag) -> the request field that set it
PARAMS = {"--gen-length": "gen_length", "--block-length": "block_length", "--steps": "steps",
          "--temperature": "temperature", "--decoder": "decoder", "options": "options", "--opt": "options",
          "--prompt-ids": "prompt", "--prompt": "prompt", "--top-k": "top_k", "--top-p": "top_p", "--min-p": "min_p"}


CANVAS_RULE = ("the canvas is gen_length if the request sets it; else, when max_tokens is omitted or at least the "
               "default gen_length, exactly the default settings (the text evotok generate gives); else the "
               "smallest whole number of blocks holding max_tokens, with the default steps per block (a prompt "
               "too long for that canvas gets one block of exactly max_tokens). The answer is cut at max_tokens "
               "tokens (finish_reason length).")


def valid_layout(gen_length: int, block_length: int, steps: int) -> bool:
    """Whether the settings form whole blocks with whole steps per block (else check_settings says why)."""
    return (0 < block_length <= gen_length and gen_length % block_length == 0
            and steps % (gen_length // block_length) == 0)


def one_block(max_tokens: int, gen_length: int, steps: int) -> tuple[int, int, int]:
    """A canvas of exactly max_tokens positions in one block, at the default steps per token (at least one
    step, at most one per position): for a prompt that leaves no room for a whole block."""
    per_token = steps / gen_length
    return max_tokens, max_tokens, max(1, min(max_tokens, round(max_tokens * per_token)))


@dataclass
class Served:
    """The model a server decodes with, and what every request starts from."""

    model: Any
    name: str  # its id in /v1/models: the folder name
    adapter: str | None
    decoder: str  # the server's default decoder
    defaults: dict[str, Any]  # config.generate_defaults(model folder)
    classes: dict[str, type] = field(default_factory=dict)  # installed decoders, looked up once at start

    def make_decoder(self, name: str, options: dict[str, Any]) -> Any:
        """`generation.make_decoder` without its per-call entry-point scan (tens of ms, in the event loop):
        the same option parsing on a class found at start; an unknown name takes the registry's path and
        its one-line error."""
        from evotok_cli.decoding.api import parse_options
        from evotok_cli.jobs.generation import make_decoder

        cls = self.classes.get(name)
        if cls is None:
            return make_decoder(name, options, where="options")
        return cls(parse_options(cls.Config, options, decoder=name, where="options"))


@dataclass
class Plan:
    """One request, ready for `make_jobs`: rows are the prompts, each repeated n times in a row."""

    decoder_name: str
    decoder: Any
    rows: list[Prompt]
    request: GenerationRequest
    prompt_tokens: int  # each distinct prompt counted once, as OpenAI does
    settings: dict[str, Any]
    max_tokens: int | None = None  # the answer is cut at this many tokens
    seeds: list[int] | None = None  # each row's (choice's) seed
    stops: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


def api_error(exc: EvotokError, fallback: str | None = None) -> ApiError:
    """A library's one-line error as a 400 naming the request field (flags renamed to fields)."""
    param = PARAMS.get(exc.where or "", fallback)
    text = exc.what + (f" ({exc.fix})" if exc.fix else "") if exc.where in PARAMS else exc.line()
    for flag, name in PARAMS.items():
        if flag.startswith("--"):
            text = text.replace(flag + " ", name + "=").replace(flag, name)
    return bad(" ".join(text.split()), param)


def make_plan(fields: CompletionFields, served: Served) -> Plan:
    from evotok_cli.decoding.api import check_model_options
    from evotok_cli.jobs.canvas_plan import block_constraint, plan_canvas
    from evotok_cli.jobs.generation import check_settings, derive_seed

    name = fields.decoder or served.decoder
    d = served.defaults
    temperature = d["temperature"] if fields.temperature is None else fields.temperature
    resolved = (fields.gen_length or d["gen_length"], fields.block_length or d["block_length"],
                fields.steps or d["steps"])
    try:
        decoder = served.make_decoder(name, fields.options)
        check_model_options(getattr(decoder, "config", None), served.model, where="options")  # k_soft <= vocab
    except EvotokError as exc:
        raise api_error(exc, "decoder") from None
    layout = resolved
    block = block_constraint(decoder)
    if fields.gen_length is None and valid_layout(*resolved):
        p = plan_canvas(gen_length=resolved[0], block_length=resolved[1], steps=resolved[2],
                        max_tokens=fields.max_tokens, block=block)
        layout = (p.gen_length, p.block_length, p.steps)
    prompts = encode(fields, served, d["prefill"] if fields.chat else "")
    longest = max(len(p.ids) for p in prompts)
    limit = served.model.max_length
    if (layout != resolved and block is None and fields.max_tokens is not None
            and longest + layout[0] > limit >= longest + fields.max_tokens):
        layout = one_block(fields.max_tokens, *resolved[::2])
    settings = dict(zip(("gen_length", "block_length", "steps"), layout), temperature=temperature,
                    seed=request_seed(fields, d, temperature))
    filters = fields.sampling_filters
    logprobs = fields.top_logprobs if fields.logprobs else None
    try:
        check_settings(decoder, **{k: settings[k] for k in ("gen_length", "block_length", "steps", "temperature")},
                       **filters, logprobs=logprobs)
    except EvotokError as exc:
        raise api_error(exc, "decoder") from None
    if longest + settings["gen_length"] > limit:
        asked = f"max_tokens={fields.max_tokens}" if fields.max_tokens is not None else "the default max_tokens"
        raise ApiError(400, f"a prompt of {longest} tokens plus a canvas of {settings['gen_length']} tokens ({asked}) "
                       f"exceeds the model's context of {limit} tokens", param="messages" if fields.chat else "prompt",
                       code="context_length_exceeded")
    rows = [p for p in prompts for _ in range(fields.n)]
    seeds = [derive_seed(settings["seed"], i) for i in range(len(rows))]
    request = GenerationRequest(prompts=[p.ids for p in rows], gen_length=settings["gen_length"],
                                block_length=settings["block_length"], steps=settings["steps"],
                                temperature=settings["temperature"], seeds=seeds, logprobs=logprobs, **filters)
    used = settings_used(decoder)
    shown = {k: v for k, v in settings.items() if k in used or k == "seed"}
    shown.update(filters)
    return Plan(name, decoder, rows, request, sum(len(p.ids) for p in prompts), shown, max_tokens=fields.max_tokens,
                seeds=seeds, stops=fields.stop, logprobs=fields.logprobs, top_logprobs=fields.top_logprobs)


def request_seed(fields: CompletionFields, defaults: dict[str, Any], temperature: float) -> int:
    """The request's seed; sampling without one draws a fresh seed (reported in the answer) so that two
    unseeded requests differ, as OpenAI's do; greedy decoding keeps the default, which it never reads."""
    from evotok_cli.jobs.generation import fresh_seed

    if fields.seed is not None:
        return fields.seed
    if temperature > 0:
        return fresh_seed()
    return defaults["seed"]


def encode(fields: CompletionFields, served: Served, prefill: str) -> list[Prompt]:
    """Token ids of each prompt, exactly as generate encodes them (a copy: the fields stay as sent)."""
    prompts = copy.deepcopy(fields.prompts)
    model = served.model
    param = "messages" if fields.chat else "prompt"
    try:
        encode_prompts(prompts, model.tokenizer, chat=fields.chat, vocab_size=model.vocab_size, prefill=prefill,
                       mask_id=model.mask_id)  # a mask among given ids would be rewritten as generated
    except EvotokError as exc:
        raise template_error(exc, model.tokenizer, param) or api_error(exc, param) from None
    except Exception as exc:  # the chat template's own refusal (jinja's raise_exception), or its bugs
        raise bad(f"the model's chat template cannot render these messages ({type(exc).__name__}: {exc})",
                  param) from None
    for p in prompts:
        if not p.ids:
            raise bad("a prompt encodes to no tokens", param)
    return prompts


def template_error(exc: EvotokError, tokenizer: Any, param: str) -> ApiError | None:
    """A chat template's failure as the client should see it: the problem, without the template's path on
    this server (its `where`) or the CLI's fix; the full line goes to the server's log. None for any other
    error."""
    import sys

    from evotok_cli.runtime.chat_template import where

    if tokenizer is None or exc.where is None or exc.where != where(tokenizer):
        return None
    print(f"warning: {exc.line()}", file=sys.stderr, flush=True)
    what = exc.what.removeprefix("the chat template ")
    fix = ("send messages the template accepts" if isinstance(exc, ConfigError)
           else "the model folder on the server needs a repaired chat template; tell the server's operator")
    return bad(" ".join(f"the model's chat template {what} ({fix})".split()), param)
