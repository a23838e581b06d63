"""`--compile`: run the model's forward under `torch.compile`, and the checks of the load options.

Why: a cached pass over ~32 tokens at batch 1 is bound by kernel launches, not by the GPU (unfused fp32
RMSNorm and RoPE and their casts: ~1,500 small kernels per forward of LLaDA-8B); inductor fuses them.

What is compiled: the whole forward of the network (embedding, the block stack, the head), not each block
on its own. A block reaches the KV cache through its layer index, an integer that torch.compile treats as
a constant: compiled one by one, every block of a cached model is a graph of its own (32 for LLaDA-8B,
beyond the recompile limit). Over the whole forward the layer loop unrolls into one graph.

Recompiles are bounded by the call forms, not by lengths: `dynamic=True` makes sequence lengths, batch
sizes above 1, `start` and the logits slice symbolic, so a canvas that grows or a block that moves reuses
the graph. A new graph is built for each form a decoder uses: batch 1 or more (torch specialises sizes 0
and 1), input ids / soft inputs / embeddings, with or without a cache, padded or not, `start` 0 or not.
A decoding run meets 2 to 4 of them; we raise torch's per-function limit to `RECOMPILE_LIMIT` so that a
server mixing decoders keeps its graphs, and beyond it torch runs the new form eagerly (correct, slower).

Tokens: a compiled forward fuses and reorders floating-point reductions, so logits differ from eager by
rounding (~1e-6 relative in fp32): decoded tokens are the same unless two candidates tie that closely
(tests/test_compile.py checks hard-mask and evotoken on the tiny model).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from evotok_cli.errors import ConfigError, EvotokError

RECOMPILE_LIMIT = 32


def check_compile(device: torch.device) -> None:
    """Refuse --compile in one line where torch.compile cannot build kernels, before any weight is read:
    inductor needs a C++ compiler on the CPU and Triton on CUDA."""
    if not hasattr(torch, "compile"):
        raise ConfigError(f"torch {torch.__version__} has no torch.compile", where="--compile",
                          fix="install torch >= 2.2, or drop --compile")
    if device.type == "cpu":
        from torch._inductor import config

        cxx = os.environ.get("CXX") or config.cpp.cxx[-1] or "g++"
        if shutil.which(cxx) is None:
            raise ConfigError(f"torch.compile needs a C++ compiler on the CPU and {cxx!r} is not found",
                              where="--compile", fix="install g++ (or set CXX to one), or drop --compile")
        config.cpp.cxx = (None, cxx)  # the compiler we checked is the one inductor runs
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("torch.compile needs Triton on CUDA and it is not installed", where="--compile",
                              fix="pip install triton (it comes with torch's CUDA wheels), or drop --compile")
    else:
        raise ConfigError(f"--compile is not supported on {device.type}", where="--compile",
                          fix="use it on cpu or cuda, or drop it")


def no_duck_shapes() -> None:
    """Two sizes that happen to be equal at the first compile (the engine's window and logit buckets, both
    8) would be made one symbol, and the first step where they differ would recompile: keep them apart."""
    from torch.fx.experimental import _config

    _config.use_duck_shape = False


def compile_forward(net: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """`net`'s forward under torch.compile (built lazily, at the first call, on its shapes).

    A failure inside torch.compile (a compiler crash, an operation this torch cannot compile) becomes a
    one-line error that says how to run without it."""
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    no_duck_shapes()
    compiled = torch.compile(net, dynamic=True)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:
            if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EvotokError(f"torch.compile failed: {first}", where="--compile",
                              fix="run without --compile, and please report it with `evotok --version`") from None

    return forward
