"""Load a checkpoint folder into a `DiffusionModel`: the small protocol every decoder talks to.

Decoders see only: embed ids, embed soft mixtures, forward embeddings (with an optional attention mask
and cache), the mask / stop ids, whether logits are shifted, and the maximum length.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotok_cli.base import stopping
from evotok_cli.base.errors import CheckpointError, ConfigError
from evotok_cli.runtime import checkpoint
from evotok_cli.runtime import tokenizer as tok
from evotok_cli.runtime.architectures import Family, detect_family
from evotok_cli.runtime.device import resolve_device, resolve_dtype
from evotok_cli.runtime.lora import AdapterReport, LoRAPair, check_lora_mode, merge_adapter, resolve_adapter


def _from_config(key: str) -> property:
    """A read-only value of the model's config.json under the name decoders use (`mask_token_id` is
    `mask_id`); an int."""
    return property(lambda self: getattr(self.config, key))


@dataclass
class DiffusionModel:
    net: nn.Module
    family: Family
    config: Any
    tokenizer: Any
    path: Path
    weights: checkpoint.WeightFiles | None
    adapter: AdapterReport | None = None
    eot_id: int | None = None
    quantize: str = "none"  # none | int8 | int4: the block linears' weights (`runtime/quantize.py`)
    compiled_forward: Callable[..., torch.Tensor] | None = field(default=None, repr=False)  # --compile
    compile_level: bool | str = True  # with compiled_forward: True (on) or "max" (`runtime/compile.py`)
    padded_mode: str = "auto"  # auto | masked | rowwise: how this model attends a padded batch (`runtime/attention.py`)
    logits_checked: bool = field(default=False, repr=False)  # see `_check_finite`

    # -- the protocol decoders use ---------------------------------------------------------------
    mask_id = _from_config("mask_token_id")
    eos_id = _from_config("eos_token_id")
    max_length = _from_config("max_sequence_length")
    vocab_size = _from_config("vocab_size")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: EOS and the chat end-of-turn token."""
        return tuple(i for i in (self.eos_id, self.eot_id) if i is not None)

    @property
    def shifted_logits(self) -> bool:
        return bool(getattr(self.net, "shifted_logits", False))

    @property
    def compiled(self) -> bool | str:
        """False, True or "max" (what --json params and results.json record as `compile`)."""
        return self.compile_level if self.compiled_forward is not None else False

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def padded_attention(self) -> str:
        """How a padded batch is attended by this model on its device: "masked" or "rowwise" (its
        `padded_mode` resolved; what every forward it runs is handed)."""
        from evotok_cli.runtime.attention import resolved_mode
        return resolved_mode(self.device, self.padded_mode)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net.embed(ids)

    def embed_soft(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.net.embed_soft(ids, weights)

    def __call__(self, input_ids=None, **kwargs) -> torch.Tensor:
        kwargs.setdefault("padded_attention", self.padded_attention)  # an argument: no process-wide mode
        logits = (self.compiled_forward or self.net)(input_ids, **kwargs)
        if not self.logits_checked:
            self._check_finite(logits)
        return logits

    def _check_finite(self, logits: torch.Tensor) -> None:
        """NaN/inf weights (or an adapter or dtype that overflows) poison every logit of the first forward
        pass; checking that pass once, not each step, stops them before they decode into garbage."""
        if logits.numel() == 0:
            return
        if not bool(torch.isfinite(logits).all()):
            source = "its weights" + (f" or the adapter {self.adapter.path}" if self.adapter else "")
            dtype = str(self.dtype).removeprefix("torch.")
            fix = f"{source} hold NaN/inf values" + ("" if dtype == "float32" else f" or overflow in {dtype}")
            fix += ": download them again" + ("" if dtype == "float32" else ", or try --dtype float32")
            raise CheckpointError("the model's first forward pass gave NaN or infinite logits", where=str(self.path),
                                  fix=fix)
        self.logits_checked = True

    def new_cache(self, batch: int, length: int):
        return self.net.new_cache(batch, length)

    # -- text --------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def answer_text(self, ids: list[int]) -> str:
        """The generated span cut at the first stop id, special tokens dropped."""
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids[:cut])
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

    # -- facts for `evotok info` -------------------------------------------------------------------
    def parameter_count(self) -> int:
        """By the weights' logical shapes: a quantized int4 layer packs two weights a byte (`quant_state`)."""
        total = 0
        for p in self.net.parameters():
            state = getattr(p, "quant_state", None)
            total += state.shape.numel() if state is not None else p.numel()
        return total

    def info(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "family": self.family.name,
            "architecture": self.family.architectures[0],
            "parameters": self.parameter_count(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "quantize": self.quantize,
            "vocab_size": self.config.vocab_size,
            "mask_id": self.mask_id,
            "eos_id": self.eos_id,
            "eot_id": self.eot_id,
            "max_length": self.max_length,
            "layers": self.config.n_layers,
            "hidden": self.config.d_model,
            "heads": self.config.n_heads,
            "kv_heads": self.config.n_kv_heads,
            "tokenizer": self.tokenizer is not None,
            "chat_template": tok.has_chat_template(self.tokenizer),
            "shards": len(self.weights.files) if self.weights else 0,
            "adapter": None if self.adapter is None else {
                "path": self.adapter.path, "r": self.adapter.r, "lora_alpha": self.adapter.lora_alpha,
                "rslora": self.adapter.use_rslora, "merged_modules": self.adapter.merged_modules,
                "matched": self.adapter.matched, "unmatched_targets": self.adapter.unmatched_targets,
                "matches_nothing": self.adapter.matches_nothing, "notes": self.adapter.partial,
                "mode": self.adapter.mode, "delta": self.adapter.delta.as_dict() if self.adapter.delta else None,
                "tensors": self.adapter.tensors,
            },
            "unknown_config_keys": list(self.config.unknown_keys),
        }


def read_family_config(folder: Path) -> tuple[Family, Any]:
    raw = checkpoint.read_config(folder)
    where = str(folder / "config.json")
    family = detect_family(raw, where)
    config = family.load().Config.from_hf(raw, where)
    if config.unknown_keys:
        warnings.warn(f"{where}: ignoring unknown config keys {', '.join(config.unknown_keys)}", stacklevel=2)
    return family, config


def build_model(family: Family, config: Any, *, device: torch.device, dtype: torch.dtype,
                meta: bool = True) -> nn.Module:
    """Build on the meta device (no memory, no init) when weights will be assigned right after."""
    cls = family.load().Model
    if meta:
        with torch.device("meta"):
            return cls(config)
    with torch.device(device):
        return cls(config).to(dtype)


def load_model(path: str | Path, *, adapter: str | Path | None = None, device: str = "auto",
               dtype: str = "auto", load_tokenizer: bool = True, compile: bool | str = False,
               lora_mode: str = "merged", padded_attention: str | None = None,
               quantize: str = "none") -> DiffusionModel:
    """Load a checkpoint folder for decoding. `compile`: run the forward under torch.compile
    (`runtime/compile.py`); `lora_mode`: merged | unmerged | auto (`runtime/lora.py`), merged by default
    (what fine-tuning starts from); `padded_attention`: auto | masked | rowwise, this model's own
    (`DiffusionModel.padded_mode`, `runtime/attention.py`), None is auto; `quantize`: none | int8 | int4, the block
    linears' weights after loading and after an adapter is applied, always unmerged (`runtime/quantize.py`)."""
    from evotok_cli.runtime.attention import check_padded_mode
    from evotok_cli.runtime.compile import check_compile, compile_forward
    from evotok_cli.runtime.quantize import check_quantize

    check_lora_mode(lora_mode)
    check_quantize(quantize)
    padded_mode = check_padded_mode(padded_attention or "auto")
    folder = checkpoint.model_dir(path)
    family, config = read_family_config(folder)
    weights = checkpoint.find_weights(folder)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    compile = check_compile(dev, compile)  # before the (slow) weight load; False, True or "max"
    if quantize != "none":
        _check_quantized_load(quantize, dev, dt, compile=compile, adapter=adapter, lora_mode=lora_mode)
    net = build_model(family, config, device=dev, dtype=dt)
    expected = {n: tuple(p.shape) for n, p in net.named_parameters()}
    checkpoint.check_tensors(expected, checkpoint.tensor_shapes(weights), str(folder))
    # quantizing: the float weights stay on the CPU and each block linear moves to the GPU quantized, so
    # the card never holds the full-precision model (8B in bf16 would not fit a 12 GB card)
    load_device = str(dev) if dev.type == "cuda" and quantize == "none" else "cpu"
    state = {name: t.to(dt) for name, t in checkpoint.iter_tensors(weights, load_device)}
    net.load_state_dict(state, strict=True, assign=True)
    del state
    net.to(dev if quantize == "none" else "cpu").eval().requires_grad_(False)
    report = (merge_adapter(net, resolve_adapter(folder, adapter), family.name,
                            mode=lora_mode if quantize == "none" else "unmerged") if adapter else None)
    if quantize != "none":
        from evotok_cli.runtime.quantize import quantize_net
        quantize_net(net, quantize, dev)
        net.to(dev)
        if report is not None:
            report.mode = "unmerged (quantized base)"
    tokenizer = tok.load_tokenizer(folder) if load_tokenizer else None
    module = family.load()
    eot = next((t for t in (tok.token_id(tokenizer, s) for s in module.EOT_TOKENS) if t is not None), None)
    stopping.check()  # a SIGTERM swallowed while the libraries loaded (base/stopping.py): stop before any work
    return DiffusionModel(net=net, family=family, config=config, tokenizer=tokenizer, path=folder,
                          weights=weights, adapter=report, eot_id=eot, quantize=quantize,
                          compiled_forward=compile_forward(net, compile) if compile else None,
                          compile_level=compile or True, padded_mode=padded_mode)


def _check_quantized_load(mode: str, device: torch.device, dtype: torch.dtype, *, compile: bool,
                          adapter: str | Path | None, lora_mode: str) -> None:
    """What a quantized load refuses before any weight is read: a device or dtype the backend cannot run,
    torch.compile (not tried over the backend's kernels), and merging an adapter into quantized weights."""
    from evotok_cli.runtime.quantize import check_supported

    if compile:
        raise ConfigError(f"--compile is not supported with --quantize {mode} (torch.compile over the quantized "
                          "kernels is untested)", where="--compile", fix="drop --compile, or use --quantize none")
    if adapter and lora_mode == "merged":
        raise ConfigError(f"an adapter cannot be merged into {mode} weights (its small deltas would be rounded "
                          "away)", where="--lora-mode",
                          fix="use --lora-mode unmerged or auto (both keep it beside the quantized base)")
    check_supported(mode, device, dtype)  # last: it imports the backend, the flags' conflicts need none


def inspect_model(path: str | Path, *, adapter: str | Path | None = None) -> dict[str, Any]:
    """Everything `evotok info` shows, from config and safetensors headers only (no weights read), with the
    weight bytes each --quantize mode would hold (`runtime/quantize.py`)."""
    from evotok_cli.runtime.quantize import planned_bytes, quantized_names

    folder = checkpoint.model_dir(path)
    family, config = read_family_config(folder)
    weights = checkpoint.find_weights(folder)
    shapes = checkpoint.tensor_shapes(weights)
    net = build_model(family, config, device=torch.device("cpu"), dtype=torch.float32)  # meta: free
    checkpoint.check_tensors({n: tuple(p.shape) for n, p in net.named_parameters()}, shapes, str(folder))
    # on meta: names and shapes only; the adapted layers' weights are read to size the deltas
    report = (merge_adapter(net, resolve_adapter(folder, adapter), family.name, strict=False,
                            weight_of=_weight_reader(shapes)) if adapter else None)
    tokenizer = tok.load_tokenizer(folder)
    module = family.load()
    eot = next((t for t in (tok.token_id(tokenizer, s) for s in module.EOT_TOKENS) if t is not None), None)
    view = DiffusionModel(net=net, family=family, config=config, tokenizer=tokenizer, path=folder,
                          weights=weights, adapter=report, eot_id=eot)
    info = view.info()
    dtypes = sorted({dt for _, dt, _ in shapes.values()})
    info["dtype"] = dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)
    info.pop("device")
    info.pop("quantize")  # how a load is asked for, not a fact of the folder: weight_bytes shows every mode
    info["size_bytes"] = sum(p.stat().st_size for p in weights.files)
    info["weight_bytes"] = planned_bytes({n: (s, dt) for n, (s, dt, _) in shapes.items()}, set(quantized_names(net)))
    if info["adapter"] is not None:
        info["adapter"]["quantized_base"] = "unmerged"  # --quantize never merges an adapter (runtime/quantize.py)
    return info


def _weight_reader(shapes: dict[str, tuple[tuple[int, ...], str, Path]]) -> Callable[[LoRAPair], torch.Tensor]:
    """An adapted layer's weight read from the checkpoint files (one tensor, not the whole model), so that
    `evotok info` sizes an adapter's deltas against the real weights."""
    def weight_of(pair: LoRAPair) -> torch.Tensor:
        name = pair.name + ".weight"
        with checkpoint._open(shapes[name][2], "cpu") as f:
            return f.get_tensor(name)
    return weight_of
