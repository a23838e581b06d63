"""Every `evotok finetune` option, declared once: its default, help, flag and bounds (see `options.option`).

`evotok finetune`'s flags, its --config keys, its --help text and the range errors are derived from these
fields, and training_args.json records them. Light on purpose (no torch): the CLI imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import check_bounds, flag, option, seed_option
from evotok_cli.base.threads import THREADS_HELP

OBJECTIVES = ("cts", "sft", "d2f")
QUANTIZE_MODES = ("none", "int8", "int4")  # runtime/quantize.py's MODES, without importing torch here
CTS_MIN_RESPONSE = 32  # the EvoToken recipe skips responses shorter than this


def _min_response(values: dict[str, Any]) -> int:
    """The objective's default; an explicit 0 stays 0."""
    return CTS_MIN_RESPONSE if values["objective"] == "cts" else 1


@dataclass
class TrainConfig:
    data: str = option(cli=False, yaml=False)  # the command's argument
    model: str = option(help="checkpoint folder (Hugging Face layout); default: the bundled model",
                        flags=("--model", "-m"), envvar="EVOTOK_MODEL")
    out: str = option(help="output folder (adapter or full checkpoint)", cli_type=Path)
    objective: str = option("cts", "cts (continuous trajectory supervision) | sft (LLaDA masked SFT, the "
                            "FT-baseline) | d2f (asymmetric distillation)", choices=OBJECTIVES, what="objective")
    full: bool = option(False, "train all weights and write a full checkpoint, or a LoRA adapter",
                        flags=("--full/--lora",), shown="LoRA")
    lora_r: int = option(128, "LoRA rank", min=1, what="LoRA rank")
    lora_alpha: float = option(256.0, "LoRA alpha", min=0, min_open=True)
    lora_dropout: float = option(0.05, min=0, max=1, max_open=True)
    lora_targets: list[str] = option(["q_proj", "k_proj", "v_proj"], "module names", what="module names")
    adapter: str | None = option(None, "merge this adapter into the model before training")
    quantize: str = option("none", "none | int8 | int4: train LoRA over a frozen quantized base (QLoRA; "
                           "bitsandbytes); the adapter loads on the unquantized base too",
                           choices=QUANTIZE_MODES, what="quantization mode")
    epochs: float = option(1.0, finite=True, example=3)
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)", min=1, example=1000)
    lr: float = option(1e-5, "peak learning rate", shown="1e-5", min=0, min_open=True, finite=True,
                       what="learning rate")
    weight_decay: float = option(0.1, min=0)
    warmup: int = option(0, "warmup steps", min=0, example=100)
    batch_size: int = option(2, "sequences per micro-batch", min=1, what="batch size")
    grad_accum: int = option(4, "micro-batches per optimizer step", min=1)
    max_length: int = option(1024, "skip longer examples", min=8)
    min_response: int = option(1, "skip responses shorter than this many tokens", min=0, example=CTS_MIN_RESPONSE,
                               shown=f"{CTS_MIN_RESPONSE} for cts, as the EvoToken recipe; else 1",
                               unset=_min_response)
    response_length: int | None = option(None, "pad every response with EOS to this many tokens (the generation "
                                         "window)", min=1, example=256)
    max_grad_norm: float = option(1.0, cli=False, yaml=False, min=0, min_open=True, example="1.0")
    trajectory_steps: int = option(4, "CTS: unrolled passes K", min=1)
    decode_counts: list[int] = option([1, 2, 4, 8], "CTS: tokens decoded per pass, drawn per batch", min=1,
                                      what="counts")
    block_sizes: list[int] = option([512], "CTS: training block lengths", min=1, what="sizes")
    alpha_range: list[float] = option([0.5, 1.0], "CTS: alpha ~ U(lo, hi) per sample and pass", min=0, max=1,
                                      pair=True)
    k_soft: int = option(3, "CTS: top-k of the soft state", min=1)
    d2f_block_size: int = option(16, cli=False, min=1)
    d2f_mask_range: list[float] = option([0.2, 0.7], cli=False, min=0, max=1, pair=True)
    seed: int = seed_option(42)
    save_every: int = option(500, "checkpoint every N optimizer steps", min=1)
    keep_checkpoints: int = option(3, "keep the last N", min=0, unit="(0 keeps all)")
    log_every: int = option(10, cli=False, min=1)
    skip_invalid: bool = option(False, "count and skip malformed lines instead of stopping")
    device: str = option("auto")
    threads: int | None = option(None, THREADS_HELP, min=1, what="threads", example=1, shown="")
    fsdp: bool = option(False, "shard weights, gradients and optimiser state over the processes of torchrun / "
                        "accelerate launch (also on with accelerate's FSDP config)")
    activation_checkpointing: bool | None = option(
        None, "recompute each transformer block's activations in the backward instead of keeping them",
        flags=("--activation-checkpointing/--no-activation-checkpointing",),
        shown="on a GPU with --full or when a micro-batch's activations would fill a quarter of it; off on the "
              "CPU")  # None: on where memory needs it (memory.checkpointing_default)
    pg_timeout: float = option(30.0, "minutes the processes of a multi-process run wait for each other before "
                               "the job fails", envvar="EVOTOK_PG_TIMEOUT", min=0, min_open=True, finite=True,
                               unit="minutes")

    def validate(self) -> None:
        """Types, then each option's declared range, then what depends on two options."""
        self._check_types()
        check_bounds(self)
        if not (self.epochs > 0 or self.max_steps):
            raise ConfigError("nothing to train", where="--epochs", fix="set --epochs or --max-steps")
        if self.objective == "d2f" and self.full:
            raise ConfigError("d2f distils the model without its adapter into the adapter, so it needs LoRA",
                              where="--full", fix="drop --full")
        self._check_quantize()
        self._check_model()

    def _check_quantize(self) -> None:
        """QLoRA trains an adapter beside frozen quantized weights: nothing that would change those weights."""
        if self.quantize == "none":
            return
        for bad, where, why in ((self.full, "--full", "quantized weights cannot be trained; train a LoRA adapter"),
                                (self.adapter, "--adapter", "merging an adapter into the base before quantizing it "
                                 "would round the adapter away; train without --adapter, or without --quantize"),
                                (self.fsdp, "--fsdp", "quantized weights are not sharded; run one process")):
            if bad:
                raise ConfigError(f"{where} does not go with --quantize {self.quantize}", where=where,
                                  fix=f"{why}, or use --quantize none")

    def _check_model(self) -> None:
        """The options the model's config.json bounds, before any weights load: a --response-length that
        leaves no room for a prompt in its context, a --k-soft above its vocabulary (a top-k over fewer
        tokens). A folder that cannot be read is the loader's to report."""
        import warnings

        from evotok_cli.base.errors import EvotokError
        from evotok_cli.runtime.model import read_family_config

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the loader warns about the config once, later
                _, config = read_family_config(Path(self.model).expanduser())
            context, vocab = int(config.max_sequence_length), int(config.vocab_size)
        except (EvotokError, OSError, TypeError, ValueError, AttributeError):
            return
        if self.response_length is not None and self.response_length >= context:
            raise ConfigError(f"{self.response_length} tokens leave no room for a prompt in the model's context of "
                              f"{context} tokens", where="--response-length",
                              fix=f"pick fewer than {context} tokens, leaving room for the prompt")
        if self.k_soft > vocab:
            raise ConfigError(f"k_soft {self.k_soft} is above the model's vocabulary of {vocab} tokens",
                              where="--k-soft", fix=f"pick --k-soft in [1, {vocab}]")

    def _check_types(self) -> None:
        """A value of the wrong type (from a YAML config) is one line, not a TypeError further on."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                raise ConfigError(f"expected {_type_name(hints[f.name])}, got {value!r}", where=flag(f),
                                  fix="check the flag or the --config value")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if args:  # a union, e.g. int | None
        return any(_has_type(value, a) for a in args)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)

