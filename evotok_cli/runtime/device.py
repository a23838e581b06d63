"""Choose the device and dtype once.

CUDA runs bf16 (what the official checkpoints and runs use; fp32 would double memory for nothing) with
PyTorch's SDPA kernels; the CPU runs fp32, because bf16 matmuls are slow there and fp32 is the reference
precision in which our decoders are token-exact with the official code.
"""

from __future__ import annotations

import torch

from evotok_cli.base.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", where="--device", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but is not available", where="--device",
                          fix="use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"no GPU {device.index} (found {torch.cuda.device_count()})", where="--device",
                          fix="pick an existing GPU index")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device type {device.type!r}", where="--device", fix="use auto, cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", where="--dtype", fix="use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Honest timing: wait for queued GPU work before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_runtime(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Where a result came from: two runs that differ in these may differ in their tokens (kernels,
    reduction orders and precision change with each)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_available_bytes() -> int | None:
    """The host's MemAvailable (what can be allocated without swapping), or None where /proc says nothing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
