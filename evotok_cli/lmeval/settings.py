"""The model_args of the `evotok` lm-eval model: which are settings (the rest are decoder options), their
types and checks, how a request's `max_gen_toks` scales the canvas, and where an answer is cut. Kept apart
from the model class so that it reads (and is tested) without lm-eval installed."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass
from typing import Any

from evotok_cli.base.errors import ConfigError
from evotok_cli.jobs.canvas_plan import CanvasPlan

log = logging.getLogger("evotok_cli.lmeval.model")  # the logger name users already configure

WHERE = "--model_args"
IGNORED = ("trust_remote_code", "max_batch_size")  # sent by the harness; evotok runs no remote code
REPEAT_STRIDE = 2 ** 20  # seed offset between repeats of one request


@dataclass
class EvalSettings:
    """The model_args that are not decoder options."""

    model: str | None = None
    adapter: str | None = None
    decoder: str = "hard-mask"
    gen_length: int = 256
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    lora_mode: str = "auto"  # a bf16 merge would round a small adapter away: `generate`'s default
    padded_attention: str = "auto"
    quantize: str = "none"  # none | int8 | int4, as `generate --quantize` (runtime/quantize.py)
    threads: int | None = None  # CPU threads, as `generate --threads` (evotok_cli/base/threads.py); None: the default
    mc_num: int = 128
    mc_batch_size: int = 32
    stop_at_eos: bool = True


SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(EvalSettings)}


def coerce(key: str, value: Any) -> Any:
    """A model_args value as its setting's type, with a one-line error (lm-eval passes strings or
    numbers, depending on how the arguments were given)."""
    kind = SETTING_TYPES[key]
    if "None" in kind and (value is None or str(value).lower() in ("none", "")):
        return None
    try:
        if "int" in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
        if "float" in kind:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if "bool" in kind:
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text in ("true", "1", "yes")
    except ValueError:
        name = kind.split(" ")[0]
        raise ConfigError(f"{key}={value!r} is not a valid {name}", where=WHERE, fix=f"give {key} a {name}") from None
    return str(value)


def parse_model_args(args: dict[str, Any]) -> tuple[EvalSettings, dict[str, Any]]:
    """Split model_args into evotok's settings and the decoder's options (validated later)."""
    args = dict(args)
    if "pretrained" in args:
        if args.get("model") is not None:
            raise ConfigError("both model and pretrained given", where=WHERE,
                              fix="give the checkpoint once: model=PATH")
        args["model"] = args.pop("pretrained")
    for key in IGNORED:
        args.pop(key, None)
    if str(args.get("batch_size", "1")).startswith("auto"):
        raise ConfigError("batch_size=auto is not supported", where=WHERE, fix="give a number, e.g. batch_size=8")
    ours = {k: coerce(k, v) for k, v in args.items() if k in SETTING_TYPES}
    if "seed" in ours:
        from evotok_cli.base.options import check_seed

        check_seed(ours["seed"], where=WHERE)
    options = {k: v for k, v in args.items() if k not in SETTING_TYPES}
    return EvalSettings(**ours), options


def check_options(decoder_name: str, options: dict[str, Any]) -> Any:
    """The decoder with its options; an unknown key is named with the closest setting or option."""
    from evotok_cli.decoding import registry
    from evotok_cli.jobs.generation import make_decoder

    fields = [f.name for f in dataclasses.fields(registry.get(decoder_name, where=WHERE).Config)]
    for key in options:
        if key.replace("-", "_") not in fields:
            close = difflib.get_close_matches(key, [*SETTING_TYPES, *fields], n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else f"settings: {', '.join(SETTING_TYPES)}"
            raise ConfigError(f"{key!r} is neither an evotok setting nor an option of decoder {decoder_name!r}",
                              where=WHERE, fix=hint)
    return make_decoder(decoder_name, options, where=WHERE)


def harness_device(device: str) -> str:
    """The harness's --device (its command line sends cuda:0 by default): `auto` where CUDA is missing."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("evotok: --device %s asked for but CUDA is not available; using auto", device)
        return "auto"
    return str(device)


def scaled_settings(settings: EvalSettings, decoder: Any, max_gen_toks: int | None) -> CanvasPlan:
    """The canvas of a request (gen_length, block_length, steps) for its `max_gen_toks`.

    Below model_args' gen_length it is the canvas `evotok serve` plans for a `max_tokens` cap
    (jobs/canvas_plan.py: `plan_canvas`): whole blocks of the decoder's `block_constraint` (d2f's
    block_size) or else of block_length, with the steps per block kept, so a d2f with a block_size gets a
    budget it accepts. Above it the canvas grows by the same rule: lm-eval's max_gen_toks is the length
    a task asks for (its `hf` model generates up to it), where a server's max_tokens is only a cap. A
    decoder that reads neither blocks nor steps and fixes no block (d2f without block_size) gets
    max_gen_toks as it is. The answer is cut to max_gen_toks tokens afterwards (`cut_answer`)."""
    from evotok_cli.decoding.api import settings_used
    from evotok_cli.jobs.canvas_plan import block_constraint, plan_canvas

    defaults = CanvasPlan(settings.gen_length, settings.block_length, settings.steps)
    if max_gen_toks is None:
        return defaults
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ConfigError(f"max_gen_toks={max_gen_toks!r} is not a whole number >= 1", where="generation_kwargs",
                          fix="e.g. max_gen_toks: 256")
    used, block = settings_used(decoder), block_constraint(decoder)
    if "block_length" not in used and "steps" not in used and block is None:
        return CanvasPlan(max_gen_toks, settings.block_length, settings.steps)
    if max_gen_toks < settings.gen_length:
        return plan_canvas(gen_length=settings.gen_length, block_length=settings.block_length, steps=settings.steps,
                           max_tokens=max_gen_toks, block=block)
    unit = block or settings.block_length
    blocks = -(-max_gen_toks // unit)
    per_block = settings.steps // (settings.gen_length // settings.block_length)
    return CanvasPlan(blocks * unit, unit, blocks * per_block)


def cut_at(text: str, until: list[str]) -> str:
    """The text before the earliest stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
