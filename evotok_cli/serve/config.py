"""Every `evotok serve` option, declared once (see `options.option`): the command's flags and --help text are
derived from these fields. What it shares with `evotok generate` (the model, its adapter, the decoder and
how the model loads) is `GenerateOptions`' own declaration. Light on purpose (no torch): the CLI imports it at
start-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import flag, like, option, shown
from evotok_cli.jobs.config import GenerateOptions, loads_model


@dataclass
@loads_model()
class ServeOptions:
    """The options of `evotok serve`, in --help's order (the model-loading ones, last, are `evotok generate`'s:
    `loads_model`). It has no --config: a flag left unset is the default."""

    model: str | None = like(GenerateOptions, "model")
    adapter: str | None = like(GenerateOptions, "adapter")
    decoder: str = like(GenerateOptions, "decoder",
                        help="default decoder of requests that name none (a request's `decoder` field wins)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port (0: any free port, printed at start)", min=0, max=65535, cli_range=True)
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on /v1/* and /metrics",
                                 envvar="EVOTOK_API_KEY")
    served_model_name: str | None = option(None, "the model's id in /v1/models and requests' `model` (default: the "
                                           "model folder's name)")
    allowed_origins: str | None = option(None, "CORS: comma-separated origins allowed to call the API from a "
                                         "browser (e.g. https://app.example.com), or * for any; default none")
    strict: bool = option(False, "refuse unknown request fields with 400 instead of ignoring them with a warning")
    max_rows: int = option(16, "rows decoded together (one per prompt x n)", min=1, max=4096, cli_range=True)
    max_tokens_in_flight: int | None = option(None, "canvas positions (prompt + generated) decoded at once; a request "
                                              "waits until its rows fit", min=1, max=2**31 - 1, cli_range=True,
                                              shown="65536 on a CPU, from free memory on CUDA")
    max_queue: int = option(64, "requests that may wait for room; more get 503", min=0, cli_range=True)
    timeout: float = option(600.0, "seconds per request, queue included; then 504")
    grace: float = option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    allowed_hosts: str | None = option(None, "Host headers answered, any port: names or addresses separated by commas "
                                       "(.example.com: it and its subdomains), or * for any; others get 421. "
                                       "Default: the names --host is reached by (127.0.0.1: 127.0.0.1, localhost, "
                                       "[::1]; 0.0.0.0: those, any IP address and this machine's name)",
                                       shown="--host's names")
    max_connections: int = option(256, "open connections served at once; a request on one more gets 503",
                                  min=1, max=65536, cli_range=True)
    read_timeout: float = option(30.0, "seconds a client gets to send a request's line and headers, and its body "
                                 "(plus 1 s per 64 KiB), or to go on reading an answer; slower ones are dropped")
    replicas: int | None = option(None, "serve with N Ray Serve replicas (one model and step engine each) behind "
                                  "Ray's proxy; needs the ray extra", shown="one process, no Ray")
    ray_address: str | None = option(None, "join this Ray cluster (`auto`: the local node's) instead of starting "
                                     "one", shown=None)
    min_replicas: int | None = option(None, "autoscale replicas between --min-replicas and --max-replicas",
                                      shown=None)
    max_replicas: int | None = option(None, "upper bound of autoscaling", shown=None)
    target_ongoing_requests: float | None = option(None, "autoscaling's target of requests per replica",
                                                   shown="--max-rows")


def check(opts: ServeOptions) -> None:
    """The options' one-line errors that need no model folder, in the order the command has always checked."""
    from evotok_cli.base.files import check_text
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.lora import check_lora_mode
    from evotok_cli.runtime.quantize import check_quantize

    _check_seconds(opts, "timeout", positive=True)
    _check_seconds(opts, "grace", positive=False)
    _check_seconds(opts, "read_timeout", positive=True)
    if not opts.host.strip():
        raise ConfigError("empty host", where="--host", fix="e.g. --host 127.0.0.1")
    if opts.api_key is not None and not check_text(opts.api_key, "--api-key").strip():
        raise ConfigError("empty API key", where="--api-key", fix="pass a non-empty key, or leave --api-key out")
    allowed_hosts(opts)
    check_lora_mode(opts.lora_mode)
    check_padded_mode(opts.padded_attention)
    check_quantize(opts.quantize)
    check_served_name(opts.served_model_name)
    origins(opts.allowed_origins)


def check_served_name(name: str | None) -> None:
    """A model id clients can send back: printable, no surrounding spaces, not empty."""
    if name is None:
        return
    if not name.strip() or name != name.strip() or not name.isprintable() or len(name) > 256:
        raise ConfigError(f"{name!r} is not a usable model id (printable, no surrounding spaces, 1 to 256 "
                          "characters)", where="--served-model-name", fix="e.g. --served-model-name evotok-tiny")


def origins(value: str | None) -> list[str]:
    """--allowed-origins as a list: "*" alone, or origins scheme://host[:port] (what browsers send)."""
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")]
    if items == ["*"]:
        return items
    for item in items:
        scheme, sep, rest = item.partition("://")
        plain = item.isprintable() and not any(c.isspace() for c in item)
        if item == "*" or not sep or scheme not in ("http", "https") or not rest or "/" in rest or not plain:
            raise ConfigError(f"{item!r} is not an origin", where="--allowed-origins",
                              fix="pass scheme://host[:port] items separated by commas, e.g. "
                                  "--allowed-origins https://app.example.com,http://localhost:3000, or * alone")
    return items


def limits(opts: ServeOptions) -> Any:
    """The limits the server puts on clients (`guard.Limits`), from the checked options."""
    from evotok_cli.serve.guard import Limits

    return Limits(hosts=allowed_hosts(opts), read_timeout=opts.read_timeout, max_connections=opts.max_connections)


def allowed_hosts(opts: ServeOptions) -> frozenset[str] | None:
    """--allowed-hosts as the set the server compares Host headers with (None: any host), its default the
    names --host is reached by (`guard.default_hosts`)."""
    from evotok_cli.serve.guard import default_hosts, host_name

    if opts.allowed_hosts is None:
        return default_hosts(opts.host)
    items = [item.strip() for item in opts.allowed_hosts.split(",")]
    if items == ["*"]:
        return None
    fix = ("pass host names or addresses separated by commas, without ports: any port is allowed; e.g. "
           "--allowed-hosts localhost,evotok.example.com,.internal.example.com, or * alone for any host")
    for item in items:
        if not _host_entry(item):
            raise ConfigError(f"{item!r} is not a host name or address", where="--allowed-hosts", fix=fix)
    return frozenset(host_name(item) for item in items)


def _host_entry(item: str) -> bool:
    """A host name (an optional leading dot: its subdomains too), an IPv4 address or an IPv6 one (bracketed
    or not); no port, scheme, path, space or wildcard."""
    import ipaddress

    try:
        ipaddress.ip_address(item[1:-1] if item.startswith("[") and item.endswith("]") else item)
        return True
    except ValueError:
        pass
    labels = (item[1:] if item.startswith(".") else item).rstrip(".").split(".")
    return len(item) <= 253 and all(
        0 < len(label) <= 63 and all(c.isascii() and (c.isalnum() or c in "-_") for c in label) for label in labels)


def _check_seconds(opts: ServeOptions, name: str, *, positive: bool) -> None:
    value = getattr(opts, name)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        f = next(f for f in dataclasses.fields(ServeOptions) if f.name == name)
        raise ConfigError(f"{value} is not a {'positive' if positive else 'non-negative'} number of seconds",
                          where=flag(f), fix=f"e.g. {flag(f)} {shown(f)}")
