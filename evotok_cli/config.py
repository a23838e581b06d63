"""Settings precedence: built-in defaults < YAML (--config) < environment (EVOTOK_*) < flags.

Typer resolves flags and EVOTOK_* variables (a flag beats its variable); an option left unset arrives as
None and is filled from the YAML file, then from the built-in default. Decoder options come from the
YAML `decoder:` section, overridden by `--opt key=value`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from evotok_cli.errors import ConfigError
from evotok_cli.files import read_text

# `evotok generate`'s built-in defaults; `evotok serve` starts from the same ones
GENERATE_DEFAULTS: dict[str, Any] = {
    "model": None, "decoder": "hard-mask", "gen_length": 128, "block_length": 32, "steps": 64,
    "temperature": 0.0, "seed": 0, "threshold": None, "remasking": None, "adapter": None, "device": "auto",
    "dtype": "auto", "chat_template": True, "system": None, "prefill": "", "batch_size": 8, "json": False,
    "trace": None,
}
GENERATE_TYPES = {"model": str, "decoder": str, "threshold": float, "remasking": str, "adapter": str, "system": str,
                  "trace": str}


def model_folder(model: str | None) -> Path:
    """The checkpoint folder a --model value names; none: the bundled model."""
    if model:
        return Path(model).expanduser()
    from evotok_cli.assets import default_model_path
    return default_model_path()


def generate_defaults(folder: Path) -> dict[str, Any]:
    """Built-in generate defaults under the model folder's own (generation_config.json's "evotok"):
    what a setting is when no flag, variable or YAML names it, for `generate` and `serve` alike."""
    from evotok_cli.runtime.checkpoint import generation_defaults

    return {**GENERATE_DEFAULTS, **generation_defaults(folder)}


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    p = Path(path).expanduser()
    text = read_text(p, what="config file", fix="pass --config with an existing UTF-8 YAML file", error=ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"invalid YAML ({problem})", where=where, fix="fix the YAML syntax") from None
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
        default = self.defaults[name]
        expected = type(default) if default is not None else self.types.get(name)
        if expected is None or value is None:
            return value
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `block_sizes: 512`
        scalars = isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value)
        if isinstance(default, str) and scalars:
            return ",".join(map(str, value))  # a comma-separated option written as a list: `block_sizes: [256, 512]`
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        example = default if default is not None else {int: 1, float: 0.5, str: "..."}.get(expected, "...")
        raise ConfigError(f"{name}: expected {expected.__name__}, got {value!r}", where=self.path,
                          fix=f"write e.g. `{name}: {example!r}`")
