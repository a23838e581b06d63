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

Levels (`--compile [on|max|off]`; bare `--compile` is on): `on` is the above. `max` (CUDA only) compiles
with mode="reduce-overhead": inductor also records each window pass's kernels as a CUDA graph (one per
bucketed shape, the engine's sizes come in a few buckets) and replays it with one launch, the way gpt-fast
decodes. A replay writes its outputs into the graph's own memory, so each call marks a new step and hands
back a copy of the logits (the engine holds them past the next call). The CPU has no CUDA graphs: `max`
there is refused in one line that says to use `--compile`, rather than silently measuring `on` under
another name. A graph whose inputs the forward mutates outside its static memory (inductor logs "skipping
cudagraphs") runs compiled without one: gpu_check reports how many graphs were skipped.

The value a command holds: False (off), True (on) or "max", so that `if compile:` and the --json params
(`"compile": true`) read as before `max` existed.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evotok_cli.base.errors import ConfigError, EvotokError

if TYPE_CHECKING:
    import torch

RECOMPILE_LIMIT = 32
LEVELS = ("on", "max", "off")
# what a level is written as, and the words EVOTOK_COMPILE and a --config file's `compile:` used as a bool
_WORDS: dict[str, bool | str] = {"on": True, "true": True, "1": True, "max": "max", "off": False, "false": False,
                                 "0": False, "": False}
HELP = ("on | max | off: run the forward under torch.compile (fuses small kernels; the first passes compile, "
        "minutes); max also replays each window pass as a CUDA graph (CUDA only); a bare --compile is on, "
        "--no-compile off")


def compile_level(value: Any, config: str | None = None) -> bool | str:
    """A --compile value (the flag's text, EVOTOK_COMPILE, or a --config file's bool or text) as False, True
    or "max"; anything else is one ConfigError naming the levels. `config`: the --config path (unused: the
    `read` hook's signature)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ConfigError(f"expected bool or a level on | max | off, got {value!r}", where="--compile",
                      fix="write --compile max, or a bare --compile for on; EVOTOK_COMPILE and a --config "
                          "file's `compile:` take the same values")


def bare_flags(argv: list[str]) -> list[str]:
    """The command line with a bare `--compile` (last, or followed by another option) as `--compile=on` and
    `--no-compile` as `--compile=` (off): the flag takes an optional level, which Typer's parser cannot
    declare. `--compile LEVEL` and `--compile=LEVEL` pass as written; nothing after `--` is touched."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--compile" and (following is None or following.startswith("-")):
            arg = "--compile=on"
        elif arg == "--no-compile":
            arg = "--compile="
        out.append(arg)
    return out


def check_compile(device: torch.device, level: Any = True) -> bool | str:
    """Refuse --compile in one line where torch.compile cannot build kernels, before any weight is read:
    inductor needs a C++ compiler on the CPU and Triton on CUDA, and `max` needs CUDA. The level as
    `compile_level` reads it (False: nothing to check)."""
    import torch

    level = compile_level(level)
    if not level:
        return level
    if level == "max" and device.type != "cuda":
        raise ConfigError(f"max replays CUDA graphs, and {device.type} has none", where="--compile",
                          fix=f"use a bare --compile (on) on {device.type}, or --compile max with --device cuda")
    if not hasattr(torch, "compile"):
        raise ConfigError(f"torch {torch.__version__} has no torch.compile", where="--compile",
                          fix="install torch >= 2.2, or drop --compile")
    if device.type == "cpu":
        from torch._inductor import config

        # torch reads CXX once, when its config is first imported: read it now (a process that ran once with
        # a missing CXX would otherwise keep refusing after it is fixed, or the other way round)
        cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
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
    return level


def no_duck_shapes() -> None:
    """Two sizes that happen to be equal at the first compile (the engine's window and logit buckets, both
    8) would be made one symbol, and the first step where they differ would recompile: keep them apart."""
    from torch.fx.experimental import _config

    _config.use_duck_shape = False


def compile_forward(net: torch.nn.Module, level: Any = True) -> Callable[..., torch.Tensor]:
    """`net`'s forward under torch.compile (built lazily, at the first call, on its shapes); `level` "max":
    with CUDA graphs (mode="reduce-overhead"), each call a new graph step whose logits are copied out.

    A failure inside torch.compile (a compiler crash, an operation this torch cannot compile) becomes a
    one-line error that says how to run without it."""
    import torch
    import torch._dynamo

    graphs = compile_level(level) == "max"
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    no_duck_shapes()
    compiled = torch.compile(net, dynamic=True, mode="reduce-overhead" if graphs else None)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            if not graphs:
                return compiled(*args, **kwargs)
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are ours to copy now
            return compiled(*args, **kwargs).clone()
        except Exception as exc:
            if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EvotokError(f"torch.compile failed: {first}", where="--compile",
                              fix="run without --compile, and please report it with `evotok --version`") from None

    return forward
