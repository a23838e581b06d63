"""`evotok serve`: the command. Only typer loads with the CLI; fastapi, uvicorn and torch load inside."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import from_flags, with_options
from evotok_cli.serve.config import ServeOptions, check, limits


@with_options(ServeOptions)  # --model ... --compile, from ServeOptions' fields; they arrive in **options
def serve(**options: Any) -> None:
    """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming,
    n, stop, seed, and evotok's decoder, options, steps and block_length), /v1/models, plus a live page
    at /, /health and /metrics. The model loads once; every request's rows decode together in one
    step engine. Schema and examples: docs/serve.md.

    Examples:

    \b
      evotok serve --port 8000
      curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "Sudoku 4x4 (0 = blank):\\n0012|0230|4320|0103"}]}'
      evotok serve -m ./LLaDA-8B-Instruct -d evotoken --host 0.0.0.0 --api-key "$KEY"
    """
    opts = from_flags(ServeOptions, options)
    check(opts)
    replicated = opts.replicas is not None or opts.ray_address is not None or opts.min_replicas is not None
    if replicated:  # Ray Serve replicas (serve/ray_app.py), checked before anything loads
        from evotok_cli.serve import ray_app

        ray_app.check_scaling(opts)
        ray_app.require_ray("--ray-address" if opts.replicas is None and opts.ray_address else "--replicas")
    folder, defaults = _prepare(opts)
    if opts.compile:  # before the port is bound, like every check that needs no weights
        from evotok_cli.runtime.compile import check_compile
        from evotok_cli.runtime.device import resolve_device

        opts.compile = check_compile(resolve_device(opts.device), opts.compile)  # a level: False, True or "max"
    if replicated:
        ray_app.run(folder, defaults, opts, _start)
        return
    from evotok_cli.serve.server import address, bind, run

    guard = limits(opts)
    sock = bind(opts.host, opts.port)
    try:
        service, app = _start(folder, defaults, opts, guard)
    except BaseException:
        sock.close()
        raise
    _announce(service, opts, address(sock))
    run(app, sock, service, grace=opts.grace, limits=guard)
    print("evotok serve: stopped", file=sys.stderr)


def _announce(service: Any, opts: ServeOptions, where: str) -> None:
    from evotok_cli.base.console import stderr

    err = stderr()
    served = service.served
    err.print(f"evotok serve: {served.name} ({served.model.device}, default decoder {opts.decoder}) on {where}; "
              f"max rows {opts.max_rows}, queue {opts.max_queue}, timeout {opts.timeout:g}s"
              f"{', API key required' if opts.api_key else ''}; SIGTERM or Ctrl-C stops", highlight=False)
    if opts.api_key is None and opts.host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {opts.host} without --api-key: anyone who can reach it can use it",
                  highlight=False)


def _prepare(opts: ServeOptions) -> tuple[Path, dict]:
    """Every check that needs no weights, before the port is bound: decoder, folder, its defaults, device."""
    from evotok_cli.base.files import input_dir
    from evotok_cli.jobs.config import generate_defaults, model_folder
    from evotok_cli.jobs.generation import check_settings, make_decoder
    from evotok_cli.runtime.checkpoint import model_dir
    from evotok_cli.runtime.device import resolve_device, resolve_dtype

    dec = make_decoder(opts.decoder, {}, where="--decoder")
    folder = model_dir(model_folder(opts.model))
    if opts.adapter is not None:
        input_dir(opts.adapter, what="adapter folder", error=ConfigError, fix="pass the folder of a PEFT LoRA adapter")
    defaults = generate_defaults(folder)
    check_settings(dec, gen_length=defaults["gen_length"], block_length=defaults["block_length"],
                   steps=defaults["steps"], temperature=defaults["temperature"])
    resolve_dtype(opts.dtype, resolve_device(opts.device))
    from evotok_cli.base.threads import apply as apply_threads

    apply_threads(opts.threads)  # before the port is bound and the model loads
    return folder, defaults


def _start(folder: Path, defaults: dict, opts: ServeOptions, guard: Any) -> tuple:
    """Load the model once, start its engine, build the app."""
    from evotok_cli.decoding import registry
    from evotok_cli.runtime.model import load_model
    from evotok_cli.serve.app import create_app
    from evotok_cli.serve.config import origins
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    lm = load_model(folder, adapter=opts.adapter, device=opts.device, dtype=opts.dtype, compile=opts.compile,
                    lora_mode=opts.lora_mode, padded_attention=opts.padded_attention, quantize=opts.quantize)
    decoders = [e.name for e in registry.discover().values() if e.ok]
    adapter = Path(opts.adapter).name if opts.adapter else None
    served = Served(lm, name=opts.served_model_name or folder.name, adapter=adapter,
                    decoder=opts.decoder, defaults=defaults, classes={name: registry.get(name) for name in decoders})
    service = Service(served, max_rows=opts.max_rows, max_queue=opts.max_queue, timeout=opts.timeout,
                      max_tokens_in_flight=opts.max_tokens_in_flight)
    return service, create_app(service, api_key=opts.api_key, decoders=decoders, strict=opts.strict,
                               allowed_origins=origins(opts.allowed_origins), limits=guard)


def register(app: typer.Typer) -> None:
    """Add `evotok serve` to the main app (called from evotok_cli/cli/app.py)."""
    app.command("serve")(serve)
