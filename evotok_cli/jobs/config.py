"""Settings precedence: built-in defaults < YAML (--config) < environment (EVOTOK_*) < flags; and
`evotok generate`'s options, declared once.

Typer resolves flags and EVOTOK_* variables (a flag beats its variable); an option left unset arrives as
None and is filled from the YAML file, then from the built-in default. Decoder options come from the
YAML `decoder:` section, overridden by `--opt key=value`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.files import read_text
from evotok_cli.base.options import like, option, seed_option, yaml_defaults
from evotok_cli.base.threads import THREADS_HELP
from evotok_cli.decoding.api import CommitOptions
from evotok_cli.runtime.compile import HELP as COMPILE_HELP
from evotok_cli.runtime.compile import compile_level

MODEL_HELP = ("checkpoint folder (Hugging Face layout), or a hub id org/name in the local Hugging Face cache "
              "(`evotok download org/name` fetches one); default: the bundled model")
SHORTHANDS = tuple(f.name for f in fields(CommitOptions))  # decoder options that are generate flags too


def _env(name: str) -> str:
    return "EVOTOK_" + name.upper()


def _shorthand(name: str) -> Any:
    """A flag (and --config key) that sets the decoder option `name`, with the decoder option's help and
    choices; the decoder checks the value."""
    declared = next(f for f in fields(CommitOptions) if f.name == name)
    hint = get_type_hints(CommitOptions)[name]
    choices = " | ".join(get_args(hint)) + ": " if get_origin(hint) is Literal else ""
    return option(None, f"{choices}{declared.metadata['help']} (same as --opt {name}=X)", envvar=_env(name))


@dataclass
class GenerateOptions:
    """Every `evotok generate` option but --config and --json: its flag, --help text, default and --config key.
    The defaults of gen_length, block_length, steps and prefill yield to the model folder's own
    (`generate_defaults`); `evotok serve` starts from the same defaults."""

    prompt: list[str] | None = option(None, "prompt text (repeat for a batch)", flags=("--prompt", "-p"),
                                      cli_type=list[str], yaml=False)
    prompt_ids: list[str] | None = option(None, "prompt as token ids, e.g. 1,2,3 (repeatable)", cli_type=list[str],
                                          yaml=False)
    prompts_file: str | None = option(None, 'JSONL: {"prompt": ...}, {"prompt_ids": [...]} or {"messages": [...]} '
                                      'per line (`evotok chat --log` writes the last); - reads standard input',
                                      cli_type=Path, yaml=False)
    model: str | None = option(None, MODEL_HELP, flags=("--model", "-m"), envvar=_env("model"))
    decoder: str = option("hard-mask", "hard-mask | evotoken | d2f | any installed plugin", flags=("--decoder", "-d"),
                          envvar=_env("decoder"))
    gen_length: int = option(128, "tokens to generate", shown="the model's generation_config.json, else 128",
                             envvar=_env("gen_length"))
    block_length: int = option(32, "semi-autoregressive block size", shown="the model's, else 32",
                               envvar=_env("block_length"))
    steps: int = option(64, "forward-pass budget (steps = gen length: 1 token per step)", shown="the model's, else 64",
                        envvar=_env("steps"))
    temperature: float = option(0.0, "0 = greedy", envvar=_env("temperature"))
    seed: int = seed_option(0, "random seed", envvar=_env("seed"))
    top_k: int | None = option(None, "sample only from the k most probable tokens (at temperature > 0)",
                               envvar=_env("top_k"), shown="off")
    top_p: float | None = option(None, "sample only from the most probable tokens whose probability sums to p, "
                                 "in (0, 1] (nucleus; at temperature > 0)", envvar=_env("top_p"), shown="off")
    min_p: float | None = option(None, "sample only from tokens with at least p times the most probable one's "
                                 "probability, in [0, 1] (at temperature > 0)", envvar=_env("min_p"), shown="off")
    threshold: float | None = _shorthand("threshold")
    remasking: str | None = _shorthand("remasking")
    opt: list[str] | None = option(None, "decoder option key=value (repeatable); see `evotok decoders --details NAME`",
                                   flags=("--opt", "-o"), cli_type=list[str], yaml=False)
    adapter: str | None = option(None, "PEFT LoRA adapter folder, applied at load (see --lora-mode)",
                                 envvar=_env("adapter"))
    lora_mode: str = option("auto", "merged | unmerged | auto: merge the adapter into the weights (fastest), or keep "
                            "it beside them (bf16 rounds small merged deltas away)", envvar=_env("lora_mode"),
                            shown="auto, unmerged only where a merge would lose most of the delta")
    compile: bool | str = option(False, COMPILE_HELP, flags=("--compile",), cli_type=str, shown="off",
                                 envvar=_env("compile"), read=compile_level)  # False | True | "max"
    padded_attention: str = option("auto", "auto | masked | rowwise: prompts of different lengths in one batch "
                                   "are attended by one masked call per layer (fast on a GPU; equal to each prompt "
                                   "alone up to rounding) or one call per row (bit-exact)",
                                   shown="auto: rowwise on CPU, masked elsewhere", envvar=_env("padded_attention"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N", envvar=_env("device"))
    threads: int | None = option(None, THREADS_HELP, min=1, what="threads", example=1, shown="")
    dtype: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16", shown="",
                        envvar=_env("dtype"))
    quantize: str = option("none", "none | int8 | int4: the transformer blocks' linear weights in 8 or 4 bits "
                           "(bitsandbytes; about 0.5x / 0.3x their bytes; tokens may differ; an adapter stays "
                           "unmerged beside them)", envvar=_env("quantize"))
    chat_template: bool = option(True, "wrap text prompts in the model's chat template", shown="on",
                                 flags=("--chat-template/--no-chat-template",), envvar=_env("chat_template"))
    system: str | None = option(None, "system message for the chat template")
    prefill: str = option("", 'text placed after the chat template, before the answer, e.g. "<reasoning>"',
                          shown="the model's generation_config.json, else none", envvar=_env("prefill"))
    batch_size: int = option(8, "prompts decoded together", envvar=_env("batch_size"))
    trace: str | None = option(None, "write every forward pass's token states to this JSONL file", cli_type=Path)
    show: bool = option(False, "watch the canvas evolve live on stderr, states in colour", yaml=False)


# how the model loads: `GenerateOptions`' own, in the order the other commands' --help lists them
LOADING = ("device", "threads", "dtype", "lora_mode", "compile", "padded_attention", "quantize")


def loads_model(*, before: str | None = None, leave_out: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Give another command's options class (decorated under its `@dataclass`) `GenerateOptions`' model-loading
    options, in `LOADING`'s order: after its own fields, or before its field `before`. Declared once here, a
    help line or default changed in `GenerateOptions` changes in every command that loads a model."""
    def add(cls: type) -> type:
        hints = get_type_hints(GenerateOptions)
        names = [name for name in LOADING if name not in leave_out]
        own = list(inspect.get_annotations(cls).items())
        at = [name for name, _ in own].index(before) if before is not None else len(own)
        cls.__annotations__ = dict(own[:at] + [(name, hints[name]) for name in names] + own[at:])
        for name in names:
            setattr(cls, name, like(GenerateOptions, name))
        return cls
    return add


# `evotok generate`'s built-in defaults and the types of those that are None, as its --config file is checked
GENERATE_DEFAULTS, GENERATE_TYPES = yaml_defaults(GenerateOptions)
GENERATE_DEFAULTS["json"] = False


def model_folder(model: str | Path | None) -> Path:
    """The checkpoint folder a --model value names: a folder, or a hub id `org/name` found in the Hugging Face
    cache (runtime/hub.py; offline, never downloaded here); none: the bundled model."""
    from evotok_cli.runtime import hub

    if model and hub.is_hub_id(model):
        return hub.resolve(str(model))
    if model:
        return Path(model).expanduser()
    from evotok_cli.assets import default_model_path
    return default_model_path()


def checked_model_folder(model: str | Path | None) -> Path:
    """`model_folder`, checked now: a missing folder, a file or a link loop fails here, before planning."""
    from evotok_cli.runtime.checkpoint import model_dir
    return model_dir(model_folder(model))


def generate_defaults(folder: Path) -> dict[str, Any]:
    """Built-in generate defaults under the model folder's own (generation_config.json's "evotok"):
    what a setting is when no flag, variable or YAML names it, for `generate` and `serve` alike."""
    from evotok_cli.runtime.checkpoint import generation_defaults

    return {**GENERATE_DEFAULTS, **generation_defaults(folder)}


def _strict_loader() -> type:
    """yaml's SafeLoader, stricter: a key written twice in one mapping and aliases (`*name`) are refused.
    A second key would silently win over the first; aliases are what a "billion laughs" file multiplies
    into gigabytes of nested lists, and an options file has no use for them."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor}: aliases are not "
                                                  "supported in evotok config files", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first given on line {earlier.start_mark.line + 1}",
                        key_node.start_mark)
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    p = Path(path).expanduser()
    text = read_text(p, what="config file", fix="pass --config with an existing UTF-8 YAML file", error=ConfigError)
    try:
        data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"invalid YAML ({problem})", where=where, fix="fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError("invalid YAML (nested too deeply)", where=str(p), fix="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of option: value", where=str(p), fix="write e.g. `gen_length: 128`")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_opts(pairs: list[str] | None, where: str = "--opt") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{pair!r} is not key=value", where=where, fix="write e.g. --opt alpha=0.7")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


class Settings:
    """Merge one command's flags with its YAML file and built-in defaults, type-checking YAML values."""

    def __init__(self, defaults: dict[str, Any], config_path: str | Path | None, *, command: str,
                 types: dict[str, type] | None = None):
        self.defaults = defaults
        self.types = types or {}  # the type of each option whose default is None
        self.path = str(config_path) if config_path else None
        self.yaml = load_yaml(config_path)
        self.decoder_options: dict[str, Any] = {}
        section = self.yaml.pop("decoder", None)
        if section is not None:
            if not isinstance(section, dict):
                raise ConfigError("`decoder:` must be a mapping of option: value", where=self.path,
                                  fix="write e.g. `decoder: {alpha: 0.7}`")
            self.decoder_options = {str(k).replace("-", "_"): v for k, v in section.items()}
        unknown = sorted(set(self.yaml) - set(defaults))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
            hint = f"did you mean {close[0]}?" if close else f"`evotok {command} --help` lists the options"
            raise ConfigError(f"unknown option {unknown[0]!r} for `evotok {command}`", where=self.path, fix=hint)

    def get(self, name: str, flag_value: Any) -> Any:
        if flag_value is not None:
            return flag_value
        if name in self.yaml:
            return self._typed(name, self.yaml[name])
        return self.defaults[name]

    def _typed(self, name: str, value: Any) -> Any:
        """A YAML value as the option's type: a number where a number belongs (never a boolean, a list or
        null), a boolean where a boolean belongs (never 0 or 1)."""
        default = self.defaults[name]
        listed = self.types.get(name) is list  # a comma-separated option: text, a number or a list of them
        expected = str if listed else type(default) if default is not None else self.types.get(name)
        if value is None and default is None:
            return None  # null: unset, as when the file leaves it out
        if expected is None:
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if expected is float and number:
            return float(value)
        if expected is str and number:
            return str(value)  # e.g. `block_sizes: 512`
        if listed and isinstance(value, list) and all(_scalar(v) for v in value):
            return ",".join(map(str, value))  # a comma-separated option written as a list: `block_sizes: [256, 512]`
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        if listed:
            wanted, example = "a list of numbers or names", f"[{default or '...'}]"
        else:
            wanted = expected.__name__
            example = repr(default if default is not None else {int: 1, float: 0.5, str: "..."}.get(expected, "..."))
        also = ", or leave it out for the default" if value is None else ""
        raise ConfigError(f"{name}: expected {wanted}, got {_shown(value)}", where=self.path,
                          fix=f"write e.g. `{name}: {example}`{also}")


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A YAML value as the file spells it (true, null, [1, 2]), text quoted, cut short."""
    import json

    text = repr(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else \
        json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
