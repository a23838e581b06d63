"""What `evotok generate` does with its flags: merge them over the --config file, the model folder's defaults
and `config.GenerateOptions`' declared ones, check everything that needs no weights, load the model,
decode (with a progress line or the live canvas) and print the answers, or one JSON document."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer

from evotok_cli.base.console import stderr
from evotok_cli.base.errors import EvotokError
from evotok_cli.base.options import merged
from evotok_cli.jobs.config import (
    GENERATE_DEFAULTS,
    GENERATE_TYPES,
    SHORTHANDS,
    GenerateOptions,
    Settings,
    model_folder,
)

SAMPLING_FILTERS = ("top_k", "top_p", "min_p")  # filters of the sampled distribution (decoding.api.Sampling)


def run(flags: dict[str, Any], *, config: Path | None, as_json: bool | None) -> None:
    """Generate for every prompt the flags give; the answers to stdout, a summary line to stderr."""
    from evotok_cli.jobs.config import generate_defaults
    from evotok_cli.jobs.generation import check_settings, make_decoder

    settings = Settings(GENERATE_DEFAULTS, config, command="generate", types=GENERATE_TYPES)
    prompts = _prompts(flags)
    decoder_name = settings.get("decoder", flags["decoder"])
    dec = make_decoder(decoder_name, _decoder_options(settings, flags))  # before the (slow) model load
    model_path = model_folder(settings.get("model", flags["model"]))
    settings.defaults = generate_defaults(model_path)  # the model's own, under YAML and flags
    values = merged(GenerateOptions, settings, flags)
    check_settings(dec, gen_length=values["gen_length"], block_length=values["block_length"], steps=values["steps"],
                   temperature=values["temperature"], **{k: values[k] for k in SAMPLING_FILTERS})
    _check_outputs(values, {"--prompts-file": flags["prompts_file"], "--config": config})
    from evotok_cli.base.threads import apply as apply_threads

    values["threads"] = apply_threads(values["threads"]).threads  # before the load: torch reads it once per op
    lm = _load(model_path, values)
    from evotok_cli.runtime.prompts import encode_prompts

    encode_prompts(prompts, lm.tokenizer, chat=values["chat_template"], vocab_size=lm.vocab_size,
                   system=values["system"], prefill=values["prefill"], mask_id=lm.mask_id)
    results, wall = _decode(lm, decoder_name, dec, prompts, values, show=bool(flags["show"]))
    if settings.get("json", as_json):
        typer.echo(json.dumps({"schema": "evotok.generate/1", "model": str(model_path), "decoder": decoder_name,
                               "params": params(lm, dec, values), "results": results}, indent=2))
    else:
        for i, r in enumerate(results):
            if len(results) > 1:
                typer.echo(f"--- [{i}]")
            typer.echo(values["prefill"] + r["text"])  # the prefill belongs to the answer a reader sees
    _summary(decoder_name, results, wall)


def _prompts(flags: dict[str, Any]) -> list[Any]:
    """--prompt texts, then --prompt-ids, then the --prompts-file lines; none at all is an error."""
    from evotok_cli.base.files import check_text
    from evotok_cli.runtime.prompts import Prompt, parse_ids, read_prompts_file

    prompts = [Prompt(check_text(t, "--prompt")) for t in flags["prompt"] or []]
    prompts += [Prompt(None, ids=parse_ids(t, "--prompt-ids")) for t in flags["prompt_ids"] or []]
    if flags["prompts_file"]:
        prompts += read_prompts_file(flags["prompts_file"])
    if not prompts:
        raise EvotokError("no prompt given", where="evotok generate",
                          fix='pass --prompt "...", --prompt-ids 1,2,3 or --prompts-file FILE.jsonl')
    return prompts


def _decoder_options(settings: Settings, flags: dict[str, Any]) -> dict[str, Any]:
    """The YAML `decoder:` section < the shorthand flags (--threshold, --remasking) < --opt key=value."""
    from evotok_cli.jobs.config import parse_opts

    options = dict(settings.decoder_options)
    for key in SHORTHANDS:
        value = settings.get(key, flags[key])
        if value is not None:
            options[key] = value
    options.update(parse_opts(flags["opt"]))
    return options


def _check_outputs(values: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Texts that must be UTF-8 and the trace file we will write (never one of the files we read), before
    the model loads."""
    from evotok_cli.base.files import check_text, not_an_input, output_file

    for key in ("system", "prefill"):
        if values[key] is not None:
            check_text(values[key], "--" + key)
    if values["trace"] is not None:
        output_file(values["trace"], "--trace")
        not_an_input(values["trace"], "--trace", inputs)


def _load(model_path: Path, values: dict[str, Any]) -> Any:
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.lora import check_lora_mode
    from evotok_cli.runtime.model import load_model
    from evotok_cli.runtime.quantize import check_quantize

    return load_model(model_path, adapter=values["adapter"], device=values["device"], dtype=values["dtype"],
                      compile=values["compile"], lora_mode=check_lora_mode(values["lora_mode"]),
                      padded_attention=check_padded_mode(values["padded_attention"]),
                      quantize=check_quantize(values["quantize"]))


def _decode(lm: Any, decoder_name: str, dec: Any, prompts: list[Any], values: dict[str, Any], *,
            show: bool) -> tuple[list[dict[str, Any]], float]:
    from evotok_cli.jobs.generation import generate
    from evotok_cli.viz.live import LiveCanvas

    err = stderr()
    live = LiveCanvas(lm, err) if show else None  # the live canvas replaces the progress line
    progress = PassProgress(err, enabled=live is None, prompts=len(prompts))
    with live or nullcontext(), progress:
        return generate(lm, decoder_name, dec, prompts, gen_length=values["gen_length"],
                        block_length=values["block_length"], steps=values["steps"],
                        temperature=values["temperature"], seed=values["seed"], batch_size=values["batch_size"],
                        trace=values["trace"], on_pass=progress.on_pass, on_event=live.update if live else None,
                        on_batch=progress.on_batch, **{k: values[k] for k in SAMPLING_FILTERS})


def params(lm: Any, dec: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run as --json reports them: the generation settings the decoder reads, the
    options as given, the device, dtype, compile, LoRA and padded-attention modes as the model was loaded,
    the runtime and the package versions."""
    from evotok_cli.base.provenance import jsonable, versions
    from evotok_cli.decoding.api import settings_used
    from evotok_cli.runtime.device import describe_runtime

    used = settings_used(dec)
    out = {k: values[k] for k in ("gen_length", "block_length", "steps") if k in used}
    out.update({k: values[k] for k in ("temperature", "seed", *SAMPLING_FILTERS, "batch_size", "adapter",
                                       "chat_template", "prefill", "threads")})
    out.update({"device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), "compile": lm.compiled,
                "lora_mode": lm.adapter.mode if lm.adapter else None, "padded_attention": lm.padded_attention,
                "quantize": lm.quantize,
                "decoder_options": jsonable(vars(dec.config)), "runtime": describe_runtime(lm.device, lm.dtype),
                "versions": versions()})
    return out


def _summary(decoder_name: str, results: list[dict[str, Any]], wall: float) -> None:
    total_tokens = sum(r["tokens"] for r in results)
    nfe = max(r["nfe"] for r in results)
    stderr().print(f"[dim]{decoder_name}: NFE {nfe}, {total_tokens} answer tokens in {wall:.2f}s "
                   f"({total_tokens / max(wall, 1e-9):.1f} tok/s, "
                   f"{total_tokens / max(nfe, 1) / len(results):.2f} tok/NFE per prompt)[/dim]")


class PassProgress:
    """Forward passes as a transient line on a terminal; in a log (stderr piped), a plain line per tenth
    of the prompts and at least every 30 s."""

    def __init__(self, console: Any, enabled: bool, prompts: int):
        from evotok_cli.base.console import PlainProgress

        self.console, self.bar, self.task, self.done = console, None, None, 0
        self.terminal = enabled and console.is_terminal
        # one prompt: only the 30 s heartbeat; a batch: also each tenth of the prompts
        self.plain = (PlainProgress(console, "generate", prompts if prompts > 1 else None)
                      if enabled and not self.terminal else None)

    def __enter__(self) -> PassProgress:
        if self.terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.bar = Progress(SpinnerColumn(), TextColumn("forward passes: {task.completed}"), TimeElapsedColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("decode", total=None)
        return self

    def on_pass(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=n)
        elif self.plain is not None:
            self.plain.update(self.done, f"prompts done, batch at pass {n}")

    def on_batch(self, done: int, total: int) -> None:
        self.done = done
        if self.plain is not None:
            self.plain.update(done, "prompts done")

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
