"""What a fine-tune needs on a GPU, known before the weights load.

`--full` trains every weight with AdamW in fp32: 4 bytes of weight, 4 of gradient and 8 of moments per
parameter (16 bytes, 128 GB for an 8B model), more than one 80 or 141 GB GPU holds. Refusing before the
load costs nothing; running out of memory at the first optimizer step costs the load and says little.
The same sizes decide whether activation checkpointing is on by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from evotok_cli.base.errors import ConfigError

FULL_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
LOAD_BYTES_PER_PARAM = 4  # every process loads the whole fp32 model before FSDP shards it
# Saved activations per token and block, in d_model-sized bf16 vectors: the block's input, its two norms,
# q/k/v before and after RoPE (fp32), the attention output, the residual, and the 3 x d_model-wide MLP's
# gate, branch, activation and product. A rough upper bound; only used to decide a default.
ACTIVATION_VECTORS = 34
ACTIVATION_SHARE = 0.25  # checkpoint by default when activations would take more of the GPU than this


@dataclass(frozen=True)
class ModelSize:
    params: int
    layers: int
    hidden: int


def model_size(path: str) -> ModelSize:
    """Parameter count and block shape from config.json alone (the model is built on the meta device)."""
    from evotok_cli.runtime import checkpoint
    from evotok_cli.runtime.model import build_model, read_family_config

    family, config = read_family_config(checkpoint.model_dir(path))
    transformer = build_model(family, config, device=torch.device("cpu"), dtype=torch.float32)
    embedding = next(m for m in transformer.modules() if isinstance(m, torch.nn.Embedding))
    return ModelSize(params=sum(p.numel() for p in transformer.parameters()),
                     layers=len(transformer.shard_units()),
                     hidden=embedding.embedding_dim)


def gpu_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of one GPU."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def full_need(params: int, shards: int) -> int:
    """Bytes per process for weights, gradients and AdamW moments, at least the unsharded load."""
    return max(FULL_BYTES_PER_PARAM * params // max(1, shards), LOAD_BYTES_PER_PARAM * params)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def check_full(params: int, free: int, *, shards: int, device: str) -> None:
    """Refuse `--full` when its fp32 training state alone cannot fit in the GPU's free memory."""
    need = full_need(params, shards)
    if need <= free:
        return
    spread = f" sharded over {shards} processes" if shards > 1 else ""
    raise ConfigError(
        f"training all {_count(params)} weights needs {_gb(need)} per GPU{spread} "
        f"({FULL_BYTES_PER_PARAM} bytes a weight: fp32 weight, gradient and two AdamW moments), "
        f"but {device} has {_gb(free)} free", where="--full", fix=_way_out(params, free, shards))


def _way_out(params: int, free: int, shards: int) -> str:
    """FSDP over enough GPUs, unless even the fp32 model that each process loads first does not fit."""
    if LOAD_BYTES_PER_PARAM * params > free:
        return "drop --full to train a LoRA adapter (the fp32 model alone does not fit this GPU)"
    gpus = max(2, shards + 1, math.ceil(FULL_BYTES_PER_PARAM * params / free))
    return (f"shard them over {gpus} or more GPUs with torchrun --nproc_per_node {gpus} ... --fsdp, or drop "
            "--full to train a LoRA adapter")


def frozen_bytes(path: str) -> dict[str, int]:
    """The frozen base's bytes on a GPU (bf16) per --quantize mode, from config.json and the safetensors
    headers alone (`runtime/quantize.py`'s formula: the block linears in the mode, the rest in bf16)."""
    from evotok_cli.runtime import checkpoint
    from evotok_cli.runtime.model import build_model, read_family_config
    from evotok_cli.runtime.quantize import planned_bytes, quantized_names

    folder = checkpoint.model_dir(path)
    family, config = read_family_config(folder)
    shapes = checkpoint.tensor_shapes(checkpoint.find_weights(folder))
    transformer = build_model(family, config, device=torch.device("cpu"), dtype=torch.float32)  # meta: free
    return planned_bytes({n: (shape, "BF16") for n, (shape, _, _) in shapes.items()},
                         set(quantized_names(transformer)))


def check_frozen(need: dict[str, int], mode: str, free: int, *, device: str) -> None:
    """Refuse a LoRA run whose frozen base cannot fit the GPU's free memory, naming a --quantize mode that
    would (QLoRA), if any."""
    if need[mode] <= free:
        return
    fits = [m for m in ("int8", "int4") if m != mode and need[m] <= free]
    fix = (f"--quantize {fits[0]} holds them in {_gb(need[fits[0]])} (QLoRA)" if fits
           else "use a GPU with more free memory")
    held = "bf16" if mode == "none" else mode
    raise ConfigError(f"the frozen base's {held} weights need {_gb(need[mode])}, but {device} has {_gb(free)} free",
                      where="--quantize" if mode != "none" else "--model", fix=fix)


def activation_bytes(size: ModelSize, tokens: int) -> int:
    """Rough bf16 activation memory of one forward over `tokens` positions, kept for its backward."""
    return tokens * size.layers * size.hidden * ACTIVATION_VECTORS * 2


def checkpointing_default(*, cuda: bool, full: bool, size: ModelSize | None, tokens: int, total: int) -> bool:
    """On a GPU: on for --full (the training state leaves little room), or when one micro-batch's
    activations would take more than a quarter of the GPU. Off on the CPU (memory is rarely the limit
    there and recomputing costs a third more time)."""
    if not cuda:
        return False
    if full:
        return True
    return size is not None and activation_bytes(size, tokens) > ACTIVATION_SHARE * total


def plan(cfg: Any, device: str, *, shards: int) -> bool:
    """On a GPU, before the weights load: refuse a --full run whose training state cannot fit, or a LoRA
    run whose frozen base cannot (`check_frozen`, --quantize counted), and decide activation
    checkpointing (the flag, or the rule in `checkpointing_default`)."""
    from evotok_cli.runtime.device import resolve_device

    gpu = resolve_device(device)
    gpu = gpu if gpu.index is not None else torch.device("cuda", torch.cuda.current_device())
    size = model_size(cfg.model) if cfg.full or cfg.activation_checkpointing is None else None
    free, total = gpu_memory(gpu)
    if cfg.full:
        check_full(size.params, free, shards=shards, device=str(gpu))
    else:  # LoRA: the frozen base in bf16, or in --quantize's bytes
        check_frozen(frozen_bytes(cfg.model), cfg.quantize, free, device=str(gpu))
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    return checkpointing_default(cuda=True, full=cfg.full, size=size, tokens=cfg.batch_size * cfg.max_length,
                                 total=total)
