"""Weight-only int8 / int4 quantization of the transformer blocks' linear layers, through bitsandbytes.

Why bitsandbytes (docs/models.md, "Smaller cards"): with our torch (a CPU build here, CUDA builds on GPUs)
it is the one well-kept library whose int8 *and* int4 weight-only layers run on both the CPU and CUDA.
torchao 0.18's Int8WeightOnlyConfig runs on the CPU, but its Int4WeightOnlyConfig has no CPU path
(the plain and preshuffled formats need the CUDA-only mslk package, plain_int32 refuses the CPU device,
tile_packed_to_4d needs CUDA), so it could not serve `--quantize int4` here.

What is quantized: every nn.Linear inside the block list (attention and MLP projections), never the token
embedding, the LM head or the norms (the LM head is applied as `F.linear(x, head.weight)` by the model,
and at a 126k vocabulary it is also where rounding would move the logits most). int8 is LLM.int8's
row-wise absmax code (threshold 0: no fp16 outlier columns), int4 is NF4 in blocks of 64 with fp32
block scales (QLoRA's code, no double quantization, so the byte count is a plain formula). Quantized
runs are not token-exact: they are a different model, close to the original.

An adapter is never merged into quantized weights: `runtime/model.py` applies it unmerged first
(`LoRALinear`), and `quantize_net` then quantizes the base under the adapter (`QuantizedLoRA`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evotok_cli.base.errors import ConfigError
from evotok_cli.runtime.lora_precision import LoRALinear

MODES = ("none", "int8", "int4")
INT4_BLOCK = 64  # NF4 block: one fp32 absmax per 64 weights
INSTALL = 'pip install -e ".[quantize]"'
DEVICES = ("cpu", "cuda")
DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
          "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def check_quantize(mode: Any, where: str = "--quantize") -> str:
    """A valid mode name, or one line naming the three."""
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}", where=where,
                          fix="use none, int8 (about half the linear-layer bytes) or int4 (about a quarter)")
    return mode


def backend(mode: str, where: str = "--quantize") -> Any:
    """bitsandbytes, imported only when a quantized mode is asked for (it pulls in much of torch)."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"--quantize {mode} needs bitsandbytes, which is not installed ({exc.msg})", where=where,
                          fix=f"{INSTALL}, or use --quantize none") from None
    return bitsandbytes


def check_supported(mode: str, device: torch.device, dtype: torch.dtype, where: str = "--quantize") -> None:
    """Refuse a device or dtype the backend has no kernel for, naming the mode that works there."""
    if mode == "none":
        return
    if device.type not in DEVICES:
        raise ConfigError(f"--quantize {mode} runs on the CPU and CUDA only, not on {device.type}", where=where,
                          fix="use --device cpu or cuda, or --quantize none")
    if dtype not in DTYPES[device.type]:
        name = str(dtype).removeprefix("torch.")
        raise ConfigError(f"--quantize {mode} computes in float32, bfloat16 or float16, not {name}", where=where,
                          fix="use --dtype float32 or bfloat16, or --quantize none")
    backend(mode, where)


def quantized_names(net: nn.Module) -> list[str]:
    """The linear layers `quantize_net` replaces: those inside the block list (full module names)."""
    blocks_name = getattr(net, "blocks_name", None)
    if blocks_name is None:
        return []
    prefix = blocks_name + "."
    return [n for n, m in net.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]


def _quantized_linear(bnb: Any, weight: torch.Tensor, bias: torch.Tensor | None, mode: str,
                      device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `weight` quantized on `device`. Built from a CPU copy: Int8Params
    quantizes only when moved off the CPU (or to it), and the float copy is then dropped."""
    out_features, in_features = weight.shape
    dtype = weight.dtype
    w = weight.detach().to("cpu")
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                  compress_statistics=False, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=INT4_BLOCK, compress_statistics=False,
                                         quant_type="nf4", module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu"), requires_grad=False)
    return layer.to(device)


class QuantizedLoRA(nn.Module):
    """A quantized base layer with an adapter beside it: y = round(base(x) + s B A x), the adapter branch in
    fp32 and added once to the base's output (QLoRA's inference form). The adapter's A and s * B are
    fp32 buffers, never merged into the quantized weights (they would be rounded away at 4 bits)."""

    def __init__(self, base: nn.Module, lora: LoRALinear):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.register_buffer("lora_A", lora.lora_A, persistent=False)  # (r, in)
        self.register_buffer("lora_B", lora.lora_B, persistent=False)  # (out, r), scale folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = F.linear(F.linear(x.float(), self.lora_A), self.lora_B)
        return (y.float() + delta).to(x.dtype)


def quantize_net(net: nn.Module, mode: str, device: torch.device) -> int:
    """Replace the block linears of `net` (float weights, on any device) by `mode` layers on `device`, an
    unmerged adapter's layers by `QuantizedLoRA`; return how many were replaced. "none" changes nothing."""
    if mode == "none":
        return 0
    bnb = backend(mode)
    names = quantized_names(net)
    for name in names:
        module = net.get_submodule(name)
        parent, _, child = name.rpartition(".")
        layer = _quantized_linear(bnb, module.weight, module.bias, mode, device)
        if isinstance(module, LoRALinear):
            layer = QuantizedLoRA(layer, module).to(device)
        setattr(net.get_submodule(parent), child, layer)
    return len(names)


# -- bytes ---------------------------------------------------------------------------------------------

ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}


def linear_bytes(shape: tuple[int, ...], mode: str, itemsize: int) -> float:
    """Bytes of one (out, in) linear weight stored in `mode`: int8 is 1 byte a weight and one fp32 scale
    per output row; int4 half a byte a weight and one fp32 absmax per block of 64."""
    out_features, in_features = shape
    n = out_features * in_features
    if mode == "int8":
        return n + 4 * out_features
    if mode == "int4":
        return n / 2 + 4 * -(-n // INT4_BLOCK)
    return n * itemsize


def planned_bytes(tensors: dict[str, tuple[tuple[int, ...], str]], quantized: set[str]) -> dict[str, int]:
    """Weight bytes per mode from names, shapes and safetensors dtypes alone (no weights read): the
    `quantized` linear weights at the mode's size, every other tensor (biases included) at its dtype."""
    out = {}
    for mode in MODES:
        total = 0.0
        for name, (shape, dtype) in tensors.items():
            size = ITEMSIZE.get(dtype, 4)
            if name.removesuffix(".weight") in quantized and name.endswith(".weight") and len(shape) == 2:
                total += linear_bytes(shape, mode, size)
            else:
                total += size * _numel(shape)
        out[mode] = int(total)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def stored_bytes(net: nn.Module) -> int:
    """Bytes the loaded weights really hold: parameters and buffers (adapter buffers excluded), plus the
    scales bitsandbytes keeps outside its parameters (int8 row scales, int4 block absmax)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in net.parameters():
        add(p)
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            add(state.absmax)
    for module in net.modules():
        state = getattr(module, "state", None)  # Linear8bitLt keeps its row scales here after a forward
        add(getattr(state, "SCB", None))
    return total


def human_bytes(n: float) -> str:
    """Decimal units, as model cards state them (16.1 GB for LLaDA-8B in bf16)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def bytes_summary(per_mode: dict[str, int]) -> str:
    """`planned_bytes` in one line for `evotok info`: "none: 16.1 GB, int8: 8.6 GB, int4: 5.4 GB"."""
    return ", ".join(f"{mode}: {human_bytes(n)}" for mode, n in per_mode.items()) + " (--quantize; block linears only)"
