"""A checked request -> what the engine decodes, built by the functions `evotok generate` uses.

Settings resolve as in `generate` minus its flags, variables and YAML: the request's field, else the
model folder's generation_config.json "evotok" defaults, else generate's built-in defaults. Decoder
options and settings are checked by `make_decoder` and `check_settings`; prompts are encoded by
`encode_prompts` (chat: the model's chat template, then its prefill; completions: the raw text).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from evotok_cli.decoding.api import GenerationRequest, settings_used
from evotok_cli.errors import EvotokError
from evotok_cli.prompts import Prompt, encode_prompts
from evotok_cli.serve.schema import ApiError, CompletionFields, bad

# where a library error points (a generate flag) -> the request field that set it
PARAMS = {"--gen-length": "max_tokens", "--block-length": "block_length", "--steps": "steps",
          "--temperature": "temperature", "--decoder": "decoder", "options": "options", "--opt": "options",
          "--prompt-ids": "prompt", "--prompt": "prompt"}


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
        from evotok_cli.generation import make_decoder

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


def api_error(exc: EvotokError, fallback: str | None = None) -> ApiError:
    """A library's one-line error as a 400 naming the request field (flags renamed to fields)."""
    param = PARAMS.get(exc.where or "", fallback)
    text = exc.what + (f" ({exc.fix})" if exc.fix else "") if exc.where in PARAMS else exc.line()
    for flag, name in PARAMS.items():
        if flag.startswith("--"):
            text = text.replace(flag + " ", name + "=").replace(flag, name)
    return bad(" ".join(text.split()), param)


def make_plan(fields: CompletionFields, served: Served) -> Plan:
    from evotok_cli.generation import check_settings

    name = fields.decoder or served.decoder
    d = served.defaults
    try:
        decoder = served.make_decoder(name, fields.options)
        settings = {"gen_length": fields.max_tokens or d["gen_length"],
                    "block_length": fields.block_length or d["block_length"],
                    "steps": fields.steps or d["steps"],
                    "temperature": d["temperature"] if fields.temperature is None else fields.temperature,
                    "seed": d["seed"] if fields.seed is None else fields.seed}
        check_settings(decoder, **{k: settings[k] for k in ("gen_length", "block_length", "steps", "temperature")})
    except EvotokError as exc:
        raise api_error(exc, "decoder") from None
    prompts = _encode(fields, served, d["prefill"] if fields.chat else "")
    longest = max(len(p.ids) for p in prompts)
    limit = served.model.max_length
    if longest + settings["gen_length"] > limit:
        raise ApiError(400, f"a prompt of {longest} tokens plus max_tokens={settings['gen_length']} exceeds the "
                       f"model's context of {limit} tokens", param="messages" if fields.chat else "prompt",
                       code="context_length_exceeded")
    rows = [p for p in prompts for _ in range(fields.n)]
    request = GenerationRequest(prompts=[p.ids for p in rows], gen_length=settings["gen_length"],
                                block_length=settings["block_length"], steps=settings["steps"],
                                temperature=settings["temperature"], seed=settings["seed"])
    used = settings_used(decoder)
    shown = {k: v for k, v in settings.items() if k in used or k == "seed"}
    return Plan(name, decoder, rows, request, sum(len(p.ids) for p in prompts), shown)


def _encode(fields: CompletionFields, served: Served, prefill: str) -> list[Prompt]:
    """Token ids of each prompt, exactly as generate encodes them (a copy: the fields stay as sent)."""
    prompts = copy.deepcopy(fields.prompts)
    model = served.model
    param = "messages" if fields.chat else "prompt"
    try:
        encode_prompts(prompts, model.tokenizer, chat=fields.chat, vocab_size=model.vocab_size, prefill=prefill)
    except EvotokError as exc:
        raise api_error(exc, param) from None
    except Exception as exc:  # the chat template's own refusal (jinja's raise_exception), or its bugs
        raise bad(f"the model's chat template cannot render these messages ({type(exc).__name__}: {exc})",
                  param) from None
    for p in prompts:
        if not p.ids:
            raise bad("a prompt encodes to no tokens", param)
    return prompts
