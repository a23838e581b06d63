"""The `evotok` command line. Each command is a thin function over the library; heavy imports (torch,
transformers) happen inside the commands so that `evotok --help` is instant."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer

from evotok_cli import __version__
from evotok_cli.config import GENERATE_DEFAULTS, GENERATE_TYPES, generate_defaults, model_folder
from evotok_cli.errors import EvotokError

app = typer.Typer(
    name="evotok",
    help="Run, fine-tune and benchmark masked diffusion language models with progressive token evolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_HELP = "checkpoint folder (Hugging Face layout); default: the bundled model"
def _stderr() -> Any:
    from evotok_cli.console import stderr
    return stderr()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evotok {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """evotok: masked diffusion LMs (LLaDA, Dream, D2F) with EvoToken progressive token evolution.

    Start with `evotok generate --prompt "..."` (uses the bundled model), then `evotok bench`.
    """


def _model_path(model: str | None) -> Path:
    return model_folder(model)


# -- info ----------------------------------------------------------------------------------------
@app.command()
def info(
    model: str | None = typer.Argument(None, help=MODEL_HELP, show_default=False),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder to check against the model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document (schema evotok.info/1)"),
) -> None:
    """Describe a checkpoint without loading its weights: architecture, size, special ids, tokenizer,
    shards and (with --adapter) which modules a LoRA adapter matches.

    Example: evotok info ./LLaDA-8B-Instruct --adapter ./EvoToken_LLaDA_Instruct_8B_Lora
    """
    from evotok_cli.runtime.model import inspect_model

    facts = inspect_model(_model_path(model), adapter=adapter)
    if as_json:
        typer.echo(json.dumps({"schema": "evotok.info/1", **facts}, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if key == "adapter" and value:
            value = (("MATCHES NOTHING in this model (--adapter refuses it): " if value["matches_nothing"] else "")
                     + f"r={value['r']} alpha={value['lora_alpha']:g}{' rsLoRA' if value['rslora'] else ''}, "
                     f"{value['merged_modules']} modules: "
                     + ", ".join(f"{k} x{n}" for k, n in sorted(value["matched"].items()))
                     + ("; " + "; ".join(value["notes"]) if value["notes"] else ""))
        elif key == "parameters":
            value = f"{value:,}"
        table.add_row(key, str(value))
    from evotok_cli.console import console
    console().print(table)


# -- decoders ------------------------------------------------------------------------------------
@app.command()
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
        from evotok_cli.console import console
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
    from evotok_cli.console import console
    console().print(table)


# -- generate ------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="prompt text (repeat for a batch)"),
    prompt_ids: list[str] = typer.Option(None, "--prompt-ids", help="prompt as token ids, e.g. 1,2,3 (repeatable)"),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help='JSONL: {"prompt": ...} or {"prompt_ids": [...]} per line'),
    model: str | None = typer.Option(None, "--model", "-m", envvar="EVOTOK_MODEL", help=MODEL_HELP, show_default=False),
    decoder: str | None = typer.Option(None, "--decoder", "-d", envvar="EVOTOK_DECODER", help="hard-mask | evotoken | d2f | any installed plugin [default: hard-mask]", show_default=False),
    gen_length: int | None = typer.Option(None, "--gen-length", envvar="EVOTOK_GEN_LENGTH", help="tokens to generate [default: the model's generation_config.json, else 128]", show_default=False),
    block_length: int | None = typer.Option(None, "--block-length", envvar="EVOTOK_BLOCK_LENGTH", help="semi-autoregressive block size [default: the model's, else 32]", show_default=False),
    steps: int | None = typer.Option(None, "--steps", envvar="EVOTOK_STEPS", help="forward-pass budget (steps = gen length: 1 token per step) [default: the model's, else 64]", show_default=False),
    temperature: float | None = typer.Option(None, "--temperature", envvar="EVOTOK_TEMPERATURE", help="0 = greedy [default: 0]", show_default=False),
    seed: int | None = typer.Option(None, "--seed", envvar="EVOTOK_SEED", help="random seed [default: 0]", show_default=False),
    threshold: float | None = typer.Option(None, "--threshold", envvar="EVOTOK_THRESHOLD", help="confidence threshold for parallel decoding (Fast-dLLM)", show_default=False),
    remasking: str | None = typer.Option(None, "--remasking", envvar="EVOTOK_REMASKING", help="low_confidence | random", show_default=False),
    opt: list[str] = typer.Option(None, "--opt", "-o", help="decoder option key=value (repeatable); see `evotok decoders --details NAME`"),
    adapter: str | None = typer.Option(None, "--adapter", envvar="EVOTOK_ADAPTER", help="PEFT LoRA adapter folder, merged at load", show_default=False),
    device: str | None = typer.Option(None, "--device", envvar="EVOTOK_DEVICE", help="auto | cpu | cuda | cuda:N [default: auto]", show_default=False),
    dtype: str | None = typer.Option(None, "--dtype", envvar="EVOTOK_DTYPE", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16", show_default=False),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template", envvar="EVOTOK_CHAT_TEMPLATE", help="wrap text prompts in the model's chat template [default: on]", show_default=False),
    system: str | None = typer.Option(None, "--system", help="system message for the chat template", show_default=False),
    prefill: str | None = typer.Option(None, "--prefill", envvar="EVOTOK_PREFILL", help='text placed after the chat template, before the answer, e.g. "<reasoning>" [default: the model\'s generation_config.json, else none]', show_default=False),
    batch_size: int | None = typer.Option(None, "--batch-size", envvar="EVOTOK_BATCH_SIZE", help="prompts decoded together [default: 8]", show_default=False),
    trace: Path | None = typer.Option(None, "--trace", help="write every forward pass's token states to this JSONL file", show_default=False),
    show: bool = typer.Option(False, "--show", help="watch the canvas evolve live on stderr, states in colour"),
    config: Path | None = typer.Option(None, "--config", "-c", envvar="EVOTOK_CONFIG", help="YAML file with defaults for any option above, and a `decoder:` section", show_default=False),
    as_json: bool | None = typer.Option(None, "--json", help="print one JSON document (schema evotok.generate/1)", show_default=False),
) -> None:
    """Generate with a diffusion LM. The answer goes to stdout, a summary (NFE, tokens/s) to stderr.

    Precedence: flags > EVOTOK_* environment variables > --config YAML > the model folder's
    generation_config.json ("evotok": {gen_length, block_length, steps, prefill}) > built-in defaults.

    Examples:

      evotok generate --prompt "What is 7 + 8?"

      evotok generate -p "..." --decoder evotoken --opt alpha=0.7 --opt k_soft=3 --steps 128 --gen-length 128

      evotok generate --model ./LLaDA-8B-Instruct --adapter ./EvoToken-LoRA -d evotoken -p "..." --json
    """
    from evotok_cli.config import Settings, parse_opts
    from evotok_cli.files import check_text, output_file
    from evotok_cli.prompts import Prompt, encode_prompts, parse_ids, read_prompts_file

    s = Settings(GENERATE_DEFAULTS, config, command="generate", types=GENERATE_TYPES)
    get = s.get
    prompts: list[Prompt] = [Prompt(check_text(t, "--prompt")) for t in prompt or []]
    prompts += [Prompt(None, ids=parse_ids(t, "--prompt-ids")) for t in prompt_ids or []]
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        raise EvotokError("no prompt given", where="evotok generate",
                          fix='pass --prompt "...", --prompt-ids 1,2,3 or --prompts-file FILE.jsonl')
    decoder_name = get("decoder", decoder)
    options = dict(s.decoder_options)
    for key, value in (("threshold", get("threshold", threshold)), ("remasking", get("remasking", remasking))):
        if value is not None:
            options[key] = value
    options.update(parse_opts(opt))
    from evotok_cli.generation import generate as run_generation
    from evotok_cli.generation import make_decoder

    dec = make_decoder(decoder_name, options)  # validate options before the (slow) model load
    from evotok_cli.generation import check_settings

    model_path = _model_path(get("model", model))
    s.defaults = generate_defaults(model_path)  # the model's own, under YAML and flags
    gen_length_v, block_v, steps_v = get("gen_length", gen_length), get("block_length", block_length), get("steps", steps)
    temperature_v = get("temperature", temperature)
    check_settings(dec, gen_length=gen_length_v, block_length=block_v, steps=steps_v, temperature=temperature_v)
    system_v, prefill_v, trace_v = get("system", system), get("prefill", prefill), get("trace", trace)
    for text, flag in ((system_v, "--system"), (prefill_v, "--prefill")):
        if text is not None:
            check_text(text, flag)
    if trace_v is not None:
        output_file(trace_v, "--trace")

    from evotok_cli.runtime.model import load_model

    lm = load_model(model_path, adapter=get("adapter", adapter), device=get("device", device), dtype=get("dtype", dtype))
    encode_prompts(prompts, lm.tokenizer, chat=get("chat_template", chat_template), vocab_size=lm.vocab_size,
                   system=system_v, prefill=prefill_v)
    err = _stderr()
    json_out = get("json", as_json)
    from evotok_cli.viz.live import LiveCanvas
    live = LiveCanvas(lm, err) if show else None  # the live canvas replaces the progress line
    progress = _progress(err, enabled=live is None, prompts=len(prompts))
    with live or nullcontext(), progress:
        results, wall = run_generation(
            lm, decoder_name, dec, prompts, gen_length=gen_length_v, block_length=block_v, steps=steps_v,
            temperature=temperature_v, seed=get("seed", seed),
            batch_size=get("batch_size", batch_size), trace=trace_v, on_pass=progress.on_pass,
            on_event=live.update if live else None, on_batch=progress.on_batch)
    from evotok_cli.decoding.api import settings_used

    used = settings_used(dec)
    params = {**{k: v for k, v in (("gen_length", gen_length_v), ("block_length", block_v), ("steps", steps_v))
                 if k in used},
              "temperature": temperature_v, "seed": get("seed", seed),
              "batch_size": get("batch_size", batch_size), "adapter": get("adapter", adapter),
              "chat_template": get("chat_template", chat_template), "prefill": get("prefill", prefill),
              "device": str(lm.device),
              "dtype": str(lm.dtype).removeprefix("torch."), "decoder_options": _jsonable(vars(dec.config))}
    if json_out:
        from evotok_cli.bench.results import versions
        from evotok_cli.runtime.device import describe_runtime

        params["runtime"], params["versions"] = describe_runtime(lm.device, lm.dtype), versions()
        typer.echo(json.dumps({"schema": "evotok.generate/1", "model": str(model_path), "decoder": decoder_name,
                               "params": params, "results": results}, indent=2))
    else:
        for i, r in enumerate(results):
            if len(results) > 1:
                typer.echo(f"--- [{i}]")
            typer.echo(params["prefill"] + r["text"])  # the prefill belongs to the answer a reader sees
    total_tokens = sum(r["tokens"] for r in results)
    nfe = max(r["nfe"] for r in results)
    err.print(f"[dim]{decoder_name}: NFE {nfe}, {total_tokens} answer tokens in {wall:.2f}s "
              f"({total_tokens / max(wall, 1e-9):.1f} tok/s, "
              f"{total_tokens / max(nfe, 1) / len(results):.2f} tok/NFE per prompt)[/dim]")


class _progress:
    """Forward passes as a transient line on a terminal; in a log (stderr piped), a plain line per tenth
    of the prompts and at least every 30 s."""

    def __init__(self, console: Any, enabled: bool, prompts: int):
        from evotok_cli.console import PlainProgress

        self.console, self.bar, self.task, self.done = console, None, None, 0
        self.terminal = enabled and console.is_terminal
        # one prompt: only the 30 s heartbeat; a batch: also each tenth of the prompts
        self.plain = (PlainProgress(console, "generate", prompts if prompts > 1 else None)
                      if enabled and not self.terminal else None)

    def __enter__(self) -> _progress:
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

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)) for k, v in d.items()}


# -- init-model ----------------------------------------------------------------------------------
@app.command("init-model")
def init_model(
    out: Path = typer.Argument(..., help="folder to create"),
    layers: int = typer.Option(2, "--layers", help="transformer blocks"),
    hidden: int = typer.Option(64, "--hidden", help="d_model"),
    heads: int = typer.Option(4, "--heads", help="attention heads"),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="key/value heads (default: = heads)"),
    mlp: int | None = typer.Option(None, "--mlp", help="MLP hidden size (default: 8/3 * hidden, rounded)"),
    max_length: int = typer.Option(1024, "--max-length", help="max_sequence_length"),
    vocab_size: int = typer.Option(512, "--vocab-size", help="BPE vocabulary to train on the built-in corpus"),
    real_vocab: bool = typer.Option(False, "--real-vocab", help="LLaDA's 126464-token vocabulary and special ids, no tokenizer (for speed benchmarks; prompt with --prompt-ids)"),
    tokenizer_from: Path | None = typer.Option(None, "--tokenizer-from", help="copy the tokenizer (and special ids) of this checkpoint"),
    corpus: Path | None = typer.Option(None, "--corpus", help="train the BPE tokenizer on this .jsonl/.txt (default: a built-in sample)"),
    shard_mb: float | None = typer.Option(None, "--shard-mb", help="split the weights into shards of this size"),
    seed: int = typer.Option(0, "--seed"),
    std: float = typer.Option(0.02, "--std", help="init standard deviation"),
) -> None:
    """Write a randomly initialised LLaDA-layout checkpoint (config.json, safetensors, tokenizer): the
    starting point of pretraining from scratch, and a stand-in for tests and speed benchmarks.

    Example: evotok init-model /tmp/tiny-llada --layers 2 --hidden 64 && evotok generate -m /tmp/tiny-llada -p "hi"
    """
    from evotok_cli.runtime.init import create_model

    folder = create_model(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, mlp=mlp,
                          max_length=max_length, vocab_size=vocab_size, real_vocab=real_vocab,
                          tokenizer_from=tokenizer_from, corpus=corpus, shard_mb=shard_mb, seed=seed, std=std)
    _stderr().print(f"wrote {folder}")


# -- finetune ------------------------------------------------------------------------------------
FINETUNE_DEFAULTS: dict[str, Any] = {
    "model": None, "out": None, "objective": "cts", "full": False, "lora_r": 128, "lora_alpha": 256.0,
    "lora_dropout": 0.05, "lora_targets": "q_proj,k_proj,v_proj", "adapter": None, "epochs": 1.0,
    "max_steps": None, "lr": 1e-5, "weight_decay": 0.1, "warmup": 0, "batch_size": 2, "grad_accum": 4,
    "max_length": 1024, "min_response": None, "response_length": None, "trajectory_steps": 4,
    "decode_counts": "1,2,4,8", "block_sizes": "512", "alpha_range": "0.5,1.0", "k_soft": 3,
    "d2f_block_size": 16, "d2f_mask_range": "0.2,0.7", "seed": 42, "save_every": 500, "keep_checkpoints": 3,
    "log_every": 10, "skip_invalid": False, "device": "auto", "json": False, "fsdp": False,
    "activation_checkpointing": None, "pg_timeout": 30.0,
}


FINETUNE_TYPES = {"model": str, "out": str, "adapter": str, "max_steps": int, "min_response": int,
                  "response_length": int, "activation_checkpointing": bool}


def _csv(text: Any, kind: type, where: str) -> list:
    from evotok_cli.errors import ConfigError

    items = list(text) if isinstance(text, (list, tuple)) else [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [kind(t) for t in items]
    except (ValueError, TypeError):
        raise ConfigError(f"{text!r} is not a comma-separated list of {kind.__name__}", where=where,
                          fix="write e.g. 1,2,4,8" if kind is int else "write e.g. 0.5,1.0") from None


@app.command()
def finetune(
    data: Path = typer.Argument(..., help='JSONL: {"prompt","response"}, {"messages":[...]} or {"question","answer"}'),
    model: str | None = typer.Option(None, "--model", "-m", envvar="EVOTOK_MODEL", help=MODEL_HELP, show_default=False),
    out: Path | None = typer.Option(None, "--out", help="output folder (adapter or full checkpoint)", show_default=False),
    objective: str | None = typer.Option(None, "--objective", help="cts (continuous trajectory supervision) | sft (LLaDA masked SFT, the FT-baseline) | d2f (asymmetric distillation) [default: cts]", show_default=False),
    full: bool | None = typer.Option(None, "--full/--lora", help="train all weights and write a full checkpoint, or a LoRA adapter [default: LoRA]", show_default=False),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank [default: 128]", show_default=False),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha [default: 256]", show_default=False),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="[default: 0.05]", show_default=False),
    lora_targets: str | None = typer.Option(None, "--lora-targets", help="module names [default: q_proj,k_proj,v_proj]", show_default=False),
    adapter: str | None = typer.Option(None, "--adapter", help="merge this adapter into the model before training", show_default=False),
    epochs: float | None = typer.Option(None, "--epochs", help="[default: 1]", show_default=False),
    max_steps: int | None = typer.Option(None, "--max-steps", help="optimizer steps (overrides --epochs)", show_default=False),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate [default: 1e-5]", show_default=False),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="[default: 0.1]", show_default=False),
    warmup: int | None = typer.Option(None, "--warmup", help="warmup steps [default: 0]", show_default=False),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per micro-batch [default: 2]", show_default=False),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="micro-batches per optimizer step [default: 4]", show_default=False),
    max_length: int | None = typer.Option(None, "--max-length", help="skip longer examples [default: 1024]", show_default=False),
    min_response: int | None = typer.Option(None, "--min-response", help="skip responses shorter than this many tokens [default: 32 for cts, as the EvoToken recipe; else 1]", show_default=False),
    response_length: int | None = typer.Option(None, "--response-length", help="pad every response with EOS to this many tokens (the generation window)", show_default=False),
    trajectory_steps: int | None = typer.Option(None, "--trajectory-steps", help="CTS: unrolled passes K [default: 4]", show_default=False),
    decode_counts: str | None = typer.Option(None, "--decode-counts", help="CTS: tokens decoded per pass, drawn per batch [default: 1,2,4,8]", show_default=False),
    block_sizes: str | None = typer.Option(None, "--block-sizes", help="CTS: training block lengths [default: 512]", show_default=False),
    alpha_range: str | None = typer.Option(None, "--alpha-range", help="CTS: alpha ~ U(lo, hi) per sample and pass [default: 0.5,1.0]", show_default=False),
    k_soft: int | None = typer.Option(None, "--k-soft", help="CTS: top-k of the soft state [default: 3]", show_default=False),
    seed: int | None = typer.Option(None, "--seed", help="[default: 42]", show_default=False),
    save_every: int | None = typer.Option(None, "--save-every", help="checkpoint every N optimizer steps [default: 500]", show_default=False),
    keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", help="keep the last N [default: 3]", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
    skip_invalid: bool | None = typer.Option(None, "--skip-invalid", help="count and skip malformed lines instead of stopping", show_default=False),
    device: str | None = typer.Option(None, "--device", help="[default: auto]", show_default=False),
    fsdp: bool | None = typer.Option(None, "--fsdp", help="shard weights, gradients and optimiser state over the processes of torchrun / accelerate launch (also on with accelerate's FSDP config)", show_default=False),
    activation_checkpointing: bool | None = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="recompute each transformer block's activations in the backward instead of keeping them [default: on a GPU with --full or when a micro-batch's activations would fill a quarter of it; off on the CPU]", show_default=False),
    pg_timeout: float | None = typer.Option(None, "--pg-timeout", envvar="EVOTOK_PG_TIMEOUT", help="minutes the processes of a multi-process run wait for each other before the job fails [default: 30]", show_default=False),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with defaults for any option above", show_default=False),
    as_json: bool | None = typer.Option(None, "--json", help="print a JSON summary (schema evotok.finetune/1)", show_default=False),
) -> None:
    """Fine-tune a diffusion LM: continuous trajectory supervision (CTS, EvoToken's recipe), LLaDA's
    masked SFT (the paper's FT-baseline, also used to pretrain from scratch), or D2F distillation.

    Writes a PEFT adapter (or with --full a Hugging Face checkpoint), training_args.json, loss_log.jsonl
    and loss.png into --out, which must not hold another run. Interrupt at any time: a checkpoint is
    saved (exit code 130 for Ctrl-C, 143 for SIGTERM); continue the same run with --resume.

    Examples:

      evotok data sudoku4 --n 200 --out train.jsonl && evotok finetune train.jsonl --out runs/cts --max-steps 50

      evotok finetune s1k.jsonl -m ./LLaDA-8B-Instruct --out runs/evotoken-lora --epochs 60 --min-response 32
    """
    from evotok_cli.config import Settings
    from evotok_cli.training.trainer import StopRequested, TrainConfig, Trainer

    s = Settings(FINETUNE_DEFAULTS, config, command="finetune", types=FINETUNE_TYPES)
    get = s.get
    if s.decoder_options:
        raise EvotokError("`decoder:` has no meaning for finetune", where=str(config), fix="remove that section")
    out_dir, model_dir = get("out", out), get("model", model)
    if out_dir is None:
        raise EvotokError("no output folder", where="evotok finetune", fix="pass --out DIR")
    min_resp = get("min_response", min_response)
    if min_resp is None:  # the objective's default; an explicit 0 stays 0
        min_resp = 32 if get("objective", objective) == "cts" else 1
    cfg = TrainConfig(
        data=str(data), model=str(_model_path(model_dir)), out=str(out_dir),
        objective=get("objective", objective), full=get("full", full), lora_r=get("lora_r", lora_r),
        lora_alpha=float(get("lora_alpha", lora_alpha)), lora_dropout=get("lora_dropout", lora_dropout),
        lora_targets=_csv(get("lora_targets", lora_targets), str, "--lora-targets"), adapter=get("adapter", adapter),
        epochs=float(get("epochs", epochs)), max_steps=get("max_steps", max_steps), lr=float(get("lr", lr)),
        weight_decay=float(get("weight_decay", weight_decay)), warmup=get("warmup", warmup),
        batch_size=get("batch_size", batch_size), grad_accum=get("grad_accum", grad_accum),
        max_length=get("max_length", max_length),
        min_response=min_resp,
        response_length=get("response_length", response_length),
        trajectory_steps=get("trajectory_steps", trajectory_steps),
        decode_counts=_csv(get("decode_counts", decode_counts), int, "--decode-counts"),
        block_sizes=_csv(get("block_sizes", block_sizes), int, "--block-sizes"),
        alpha_range=_csv(get("alpha_range", alpha_range), float, "--alpha-range"), k_soft=get("k_soft", k_soft),
        d2f_block_size=get("d2f_block_size", None),
        d2f_mask_range=_csv(get("d2f_mask_range", None), float, "d2f_mask_range"),
        seed=get("seed", seed), save_every=get("save_every", save_every),
        keep_checkpoints=get("keep_checkpoints", keep_checkpoints), log_every=get("log_every", None),
        skip_invalid=get("skip_invalid", skip_invalid), device=get("device", device), fsdp=get("fsdp", fsdp),
        activation_checkpointing=get("activation_checkpointing", activation_checkpointing),
        pg_timeout=float(get("pg_timeout", pg_timeout)))
    err = _stderr()
    trainer = Trainer(cfg, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    trainer.preflight(resume)  # data file, --out, one run per folder: before the model loads
    trainer.setup()
    bar = _TrainProgress(err, trainer.total_steps, cfg.log_every)
    try:
        with bar:
            summary = trainer.train(resume=resume, progress=bar.update)
    except StopRequested as exc:  # typer.Exit would be swallowed (standalone_mode=False): exit 130 / 143
        raise SystemExit(exc.exit_code) from None
    if not summary:  # a non-main process of a data-parallel run: rank 0 reports
        return
    if get("json", as_json):
        typer.echo(json.dumps(summary, indent=2))
    else:
        err.print(f"wrote {summary['kind']} to {summary['out']} (step {summary['steps']}, "
                  f"final loss {summary['final_loss']:.4f})")


class _TrainProgress:
    """A rich progress bar on a terminal; otherwise a plain line every `every` steps, and at least every
    30 s and every 10% of the steps, so a log file shows a slow run is alive."""

    SECONDS = 30.0

    def __init__(self, console: Any, total: int, every: int):
        import time

        self.console, self.total, self.every, self.bar, self.task = console, total, every, None, None
        self.tenth = max(1, -(-total // 10))
        self.clock = time.monotonic
        self.last = self.clock()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, info="")
        return self

    def update(self, step: int, total: int, record: dict[str, Any]) -> None:
        passes = " ".join(f"{x:.3f}" for x in record["pass_losses"]) if len(record["pass_losses"]) > 1 else ""
        info = (f"loss {record['loss']:.4f}{' [' + passes + ']' if passes else ''} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif (step % self.every == 0 or step % self.tenth == 0 or step == total
              or self.clock() - self.last >= self.SECONDS):
            self.console.print(f"step {step}/{total} {info}")
            self.last = self.clock()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


# -- data ----------------------------------------------------------------------------------------
@app.command()
def data(
    tasks: list[str] = typer.Argument(..., help="synthetic task names (sudoku4, arith-small, arith, countdown3)"),
    split: str = typer.Option("train", "--split", help="train | test (disjoint by construction)"),
    n: int = typer.Option(1000, "--n", help="problems per task"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="JSONL file to write"),
    cuts: bool = typer.Option(False, "--cuts", help="also write each problem cut after every '=' of its "
                              "reasoning, the text before the cut as prefill (see the description)"),
) -> None:
    """Write problems of the bundled model's synthetic tasks as training JSONL
    ({"prompt", "response", "prefill"}), interleaved across tasks, deterministic in the seed.

    With --cuts, a problem whose reasoning has calculation steps ("10-5=5. 5*2=10.") is written once whole
    and once more per "=", with the reasoning up to that "=" moved into the prefill, which masked-diffusion
    training never masks. A result is then learnt from operands that are certainly visible; in whole
    answers its copies (the next step's operand, the boxed answer) are usually visible too, and the model
    learns to copy them instead of computing.

    Example: evotok data sudoku4 arith countdown3 --n 1000 --out train.jsonl
    """
    from evotok_cli.bench.tasks.synthetic import write_training_data

    count = write_training_data(tasks, split=split, n=n, seed=seed, out=out, cuts=cuts)
    _stderr().print(f"wrote {count} examples to {out}")


from evotok_cli.bench.cli import register as _register_bench  # noqa: E402 (bench, score, report)

_register_bench(app)

from evotok_cli.viz.cli import register as _register_viz  # noqa: E402 (trace)

_register_viz(app)

from evotok_cli.serve.cli import register as _register_serve  # noqa: E402 (serve)

_register_serve(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except EvotokError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's own errors (typer vendors click in newer versions: match by shape)
        if not hasattr(exc, "exit_code"):
            raise
        _handle_click(exc)
    if isinstance(code, int) and code:
        sys.exit(code)


def _handle_click(exc: Exception) -> None:
    name = type(exc).__name__
    if name == "Exit":
        sys.exit(exc.exit_code)
    if name == "Abort":
        print("aborted", file=sys.stderr)
        sys.exit(130)
    if not hasattr(exc, "format_message"):
        raise exc
    if name == "NoArgsIsHelpError":  # `evotok` or `evotok bench` alone: show the help, as asked
        print(exc.format_message())
        sys.exit(0)
    ctx = getattr(exc, "ctx", None)
    command = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    hint = f" (see `{ctx.command_path if ctx is not None else ('evotok ' + command).strip()} --help`)"
    message = exc.format_message()
    envvar = getattr(getattr(exc, "param", None), "envvar", None)
    if isinstance(envvar, str) and not _value_came_from_env(exc.param, envvar):
        message = message.replace(f" (env var: '{envvar}')", "")  # name the variable only when it was used
    print("error: " + " ".join(message.split()) + hint, file=sys.stderr)
    sys.exit(exc.exit_code)


def _value_came_from_env(param: Any, envvar: str) -> bool:
    """True when the bad value was read from `envvar`: it is set and no flag of `param` was given."""
    if envvar not in os.environ:
        return False
    flags = [o for o in getattr(param, "opts", []) + getattr(param, "secondary_opts", []) if o.startswith("-")]
    given = any(arg == f or (f.startswith("--") and arg.startswith(f + "=")) or
                (not f.startswith("--") and arg.startswith(f) and len(arg) > len(f)) for arg in sys.argv[1:] for f in flags)
    return not given
