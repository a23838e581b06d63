"""`evotok serve`: the command. Only typer loads with the CLI; fastapi, uvicorn and torch load inside."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer

from evotok_cli.errors import ConfigError

MODEL_HELP = "checkpoint folder (Hugging Face layout); default: the bundled model"


def serve(
    model: str | None = typer.Option(None, "--model", "-m", envvar="EVOTOK_MODEL", help=MODEL_HELP, show_default=False),
    adapter: str | None = typer.Option(None, "--adapter", envvar="EVOTOK_ADAPTER",
                                       help="PEFT LoRA adapter folder, merged at load", show_default=False),
    decoder: str = typer.Option("hard-mask", "--decoder", "-d", envvar="EVOTOK_DECODER",
                                help="default decoder of requests that name none (a request's `decoder` field wins)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed at start)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="EVOTOK_API_KEY",
                                       help="require `Authorization: Bearer KEY` on /v1/* and /metrics",
                                       show_default=False),
    max_rows: int = typer.Option(16, "--max-rows", min=1, max=4096, help="rows decoded together (one per prompt x n)"),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="requests that may wait for room; more get 503"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds per request, queue included; then 504"),
    grace: float = typer.Option(30.0, "--grace", help="seconds in-flight requests get to finish after SIGTERM"),
    device: str = typer.Option("auto", "--device", envvar="EVOTOK_DEVICE", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", envvar="EVOTOK_DTYPE",
                              help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming,
    n, stop, seed, and evotok's decoder, options, steps and block_length), /v1/models, plus a live page
    at /, /health and /metrics. The model loads once; every request's rows decode together in one
    step engine. Schema and examples: docs/serve.md.

    Examples:

    \b
      evotok serve --port 8000
      curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "What is 7 + 8?"}]}'
      evotok serve -m ./LLaDA-8B-Instruct -d evotoken --host 0.0.0.0 --api-key "$KEY"
    """
    from evotok_cli.files import check_text

    _check_seconds(timeout, "--timeout", positive=True)
    _check_seconds(grace, "--grace", positive=False)
    if not host.strip():
        raise ConfigError("empty host", where="--host", fix="e.g. --host 127.0.0.1")
    if api_key is not None and not check_text(api_key, "--api-key").strip():
        raise ConfigError("empty API key", where="--api-key", fix="pass a non-empty key, or leave --api-key out")
    served_parts = _prepare(model, adapter, decoder, device, dtype)
    from evotok_cli.serve.server import address, bind, run

    sock = bind(host, port)
    try:
        service, app = _start(*served_parts, adapter=adapter, device=device, dtype=dtype, max_rows=max_rows,
                              max_queue=max_queue, timeout=timeout, api_key=api_key)
    except BaseException:
        sock.close()
        raise
    from evotok_cli.console import stderr

    err = stderr()
    served = service.served
    err.print(f"evotok serve: {served.name} ({served.model.device}, default decoder {decoder}) on {address(sock)}; "
              f"max rows {max_rows}, queue {max_queue}, timeout {timeout:g}s"
              f"{', API key required' if api_key else ''}; SIGTERM or Ctrl-C stops", highlight=False)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
                  highlight=False)
    run(app, sock, service, grace=grace)
    print("evotok serve: stopped", file=sys.stderr)


def _check_seconds(value: float, flag: str, *, positive: bool) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{value} is not a {'positive' if positive else 'non-negative'} number of seconds",
                          where=flag, fix=f"e.g. {flag} {600 if positive else 30}")


def _prepare(model: str | None, adapter: str | None, decoder: str, device: str, dtype: str) -> tuple[Path, str, dict]:
    """Every check that needs no weights, before the port is bound: decoder, folder, its defaults, device."""
    from evotok_cli.config import generate_defaults, model_folder
    from evotok_cli.files import input_dir
    from evotok_cli.generation import check_settings, make_decoder
    from evotok_cli.runtime.checkpoint import model_dir
    from evotok_cli.runtime.device import resolve_device, resolve_dtype

    dec = make_decoder(decoder, {}, where="--decoder")
    folder = model_dir(model_folder(model))
    if adapter is not None:
        input_dir(adapter, what="adapter folder", error=ConfigError, fix="pass the folder of a PEFT LoRA adapter")
    defaults = generate_defaults(folder)
    check_settings(dec, gen_length=defaults["gen_length"], block_length=defaults["block_length"],
                   steps=defaults["steps"], temperature=defaults["temperature"])
    resolve_dtype(dtype, resolve_device(device))
    return folder, decoder, defaults


def _start(folder: Path, decoder: str, defaults: dict, *, adapter: str | None, device: str, dtype: str, max_rows: int,
           max_queue: int, timeout: float, api_key: str | None) -> tuple:
    """Load the model once, start its engine, build the app."""
    from evotok_cli.decoding import registry
    from evotok_cli.runtime.model import load_model
    from evotok_cli.serve.app import create_app
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    lm = load_model(folder, adapter=adapter, device=device, dtype=dtype)
    decoders = [e.name for e in registry.discover().values() if e.ok]
    served = Served(lm, name=folder.name, adapter=Path(adapter).name if adapter else None, decoder=decoder,
                    defaults=defaults, classes={name: registry.get(name) for name in decoders})
    service = Service(served, max_rows=max_rows, max_queue=max_queue, timeout=timeout)
    return service, create_app(service, api_key=api_key, decoders=decoders)


def register(app: typer.Typer) -> None:
    """Add `evotok serve` to the main app (called from evotok_cli/cli.py)."""
    app.command("serve")(serve)
