"""`evotok info`, `evotok download` and `evotok decoders`: the commands that describe what is installed or
on disk without decoding anything. `register` adds them to the app, at their place in `--help`'s list."""

from __future__ import annotations

import json

import typer

from evotok_cli.base.console import stderr
from evotok_cli.base.errors import EvotokError
from evotok_cli.jobs.config import MODEL_HELP, model_folder


def register(app: typer.Typer) -> None:
    for command in (info, download, decoders):
        app.command()(command)


# -- info ----------------------------------------------------------------------------------------
def info(
    model: str | None = typer.Argument(None, help=MODEL_HELP, show_default=False),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder to check against the model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document (schema evotok.info/1)"),
    system: bool = typer.Option(False, "--system", help="describe this machine instead: cores, the CPU threads "
                                "evotok will use and why, accelerators and their free memory"),
) -> None:
    """Describe a checkpoint without loading its weights: architecture, size, special ids, tokenizer,
    shards and (with --adapter) which modules a LoRA adapter matches, every class of tensor it carries
    (LoRA pairs per target, modules_to_save tensors, and in capitals what its adapter_config.json does not
    declare, which --adapter refuses), how large its deltas are next to the weights (only the adapted
    layers' weights are read), and how much of them a bf16 merge would lose. `weight_bytes` is what the
    weights would hold under each --quantize mode (none, int8, int4), computed from the headers alone.

    Examples: evotok info ./LLaDA-8B-Instruct --adapter ./EvoToken_LLaDA_Instruct_8B_Lora;  evotok info --system
    """
    if system:
        return _system_info(as_json)
    from evotok_cli.runtime.lora import adapter_summary
    from evotok_cli.runtime.model import inspect_model
    from evotok_cli.runtime.quantize import bytes_summary

    facts = inspect_model(model_folder(model), adapter=adapter)
    if as_json:
        typer.echo(json.dumps({"schema": "evotok.info/1", **facts}, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if key == "adapter" and value:
            value = adapter_summary(value)
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "weight_bytes":
            value = bytes_summary(value)
        table.add_row(key, str(value))
    from evotok_cli.base.console import console
    console().print(table)


def _system_info(as_json: bool) -> None:
    """`evotok info --system`: what the compute commands will use on this machine, and why."""
    import torch

    from evotok_cli.base.threads import system_facts
    from evotok_cli.runtime.device import describe_runtime

    facts = {"cpu": describe_runtime(torch.device("cpu"), torch.float32)["device_name"], **system_facts()}
    if as_json:
        typer.echo(json.dumps({"schema": "evotok.info/1", "system": facts}, indent=2))
        return
    for key, value in facts.items():
        typer.echo(f"{key:<22} {value}")


# -- download ------------------------------------------------------------------------------------
def download(
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="Hugging Face model or adapter id"),
    revision: str | None = typer.Option(None, "--revision", help="branch, tag or commit (default: main)",
                                        show_default=False),
) -> None:
    """Download a model or adapter from the Hugging Face hub into its local cache: only safetensors
    weights, JSON configs and tokenizer files (never pickled weights or remote code). Afterwards
    `-m ORG/NAME` and `--adapter ORG/NAME` find it there, offline; they never download by themselves.

    Example: evotok download GSAI-ML/LLaDA-8B-Instruct && evotok generate -m GSAI-ML/LLaDA-8B-Instruct -p "..."
    """
    from evotok_cli.runtime.hub import download as fetch

    folder = fetch(repo_id, revision=revision)
    files = sorted(p.name for p in folder.iterdir())
    stderr().print(f"{repo_id}: {len(files)} files in {folder}; use it with -m {repo_id} (or --adapter {repo_id})",
                   highlight=False)


# -- decoders ------------------------------------------------------------------------------------
def decoders(
    name: str | None = typer.Argument(None, help="show the options of this decoder (same as --details NAME)",
                                      show_default=False),
    details: str | None = typer.Option(None, "--details", help="show the options of one decoder", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document (schema evotok.decoders/1)"),
) -> None:
    """List installed decoders (built-in and third-party, from the `evotok.decoders` entry points),
    whether each loads, and with NAME (or --details NAME) its options (set them with --opt key=value).

    Examples: evotok decoders;  evotok decoders evotoken;  evotok decoders --details d2f --json
    """
    from evotok_cli.decoding import registry
    from evotok_cli.decoding.api import describe_options

    if name and details and name != details:
        raise EvotokError(f"two decoders asked for ({name} and --details {details})", where="evotok decoders",
                          fix="name one decoder")
    details = details or name
    if details:
        cls = registry.get(details, where="evotok decoders" if name else "--details")
        rows = describe_options(cls.Config)
        if as_json:
            typer.echo(json.dumps({"schema": "evotok.decoders/1", "name": details, "options": rows}, indent=2,
                                  default=str))
            return
        from rich.table import Table
        table = Table(title=f"{details}: options (--opt key=value, or `decoder:` in --config)")
        for col in ("option", "type", "default", "range", "help"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["type"], str(r["default"]), r["range"], r["help"])
        from evotok_cli.base.console import console
        console().print(table)
        return
    entries = registry.discover()
    if as_json:
        typer.echo(json.dumps({"schema": "evotok.decoders/1", "decoders": [
            {"name": e.name, "package": e.package, "version": e.version, "entry_point": e.value, "ok": e.ok,
             "error": e.error, "shadowed": e.shadowed} for e in entries.values()]}, indent=2))
        return
    from rich.table import Table
    table = Table()
    for col in ("decoder", "package", "version", "status"):
        table.add_column(col)
    for e in entries.values():
        status = "ok" if e.ok else f"error: {e.error}"
        if e.shadowed:
            status += f" (also registered by {', '.join(e.shadowed)}, which is not used)"
        table.add_row(e.name, e.package, e.version, status)
    from evotok_cli.base.console import console
    console().print(table)
