"""Every `evotok serve` option, declared once (see `options.option`): the command's flags and --help text are
derived from these fields. What it shares with `evotok generate` (the model, its adapter, the decoder and
how the model loads) is `GenerateOptions`' own declaration. Light on purpose (no torch): the CLI imports it at
start-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from evotok_cli.config import GenerateOptions
from evotok_cli.errors import ConfigError
from evotok_cli.options import flag, like, option, shown


@dataclass
class ServeOptions:
    """The options of `evotok serve`, in --help's order. It has no --config: a flag left unset is the default."""

    model: str | None = like(GenerateOptions, "model")
    adapter: str | None = like(GenerateOptions, "adapter")
    decoder: str = like(GenerateOptions, "decoder",
                        help="default decoder of requests that name none (a request's `decoder` field wins)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port (0: any free port, printed at start)", min=0, max=65535, cli_range=True)
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on /v1/* and /metrics",
                                 envvar="EVOTOK_API_KEY")
    max_rows: int = option(16, "rows decoded together (one per prompt x n)", min=1, max=4096, cli_range=True)
    max_queue: int = option(64, "requests that may wait for room; more get 503", min=0, cli_range=True)
    timeout: float = option(600.0, "seconds per request, queue included; then 504")
    grace: float = option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    device: str = like(GenerateOptions, "device")
    dtype: str = like(GenerateOptions, "dtype")
    lora_mode: str = like(GenerateOptions, "lora_mode")
    compile: bool = like(GenerateOptions, "compile")
    padded_attention: str = like(GenerateOptions, "padded_attention")


def check(opts: ServeOptions) -> None:
    """The options' one-line errors that need no model folder, in the order the command has always checked."""
    from evotok_cli.files import check_text
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.lora import check_lora_mode

    _check_seconds(opts, "timeout", positive=True)
    _check_seconds(opts, "grace", positive=False)
    if not opts.host.strip():
        raise ConfigError("empty host", where="--host", fix="e.g. --host 127.0.0.1")
    if opts.api_key is not None and not check_text(opts.api_key, "--api-key").strip():
        raise ConfigError("empty API key", where="--api-key", fix="pass a non-empty key, or leave --api-key out")
    check_lora_mode(opts.lora_mode)
    check_padded_mode(opts.padded_attention)


def _check_seconds(opts: ServeOptions, name: str, *, positive: bool) -> None:
    value = getattr(opts, name)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        f = next(f for f in dataclasses.fields(ServeOptions) if f.name == name)
        raise ConfigError(f"{value} is not a {'positive' if positive else 'non-negative'} number of seconds",
                          where=flag(f), fix=f"e.g. {flag(f)} {shown(f)}")
