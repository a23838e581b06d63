"""Helpers of benchmarks/gpu_check.py: the device's memory bandwidth and peak compute, decoding through the
step engine (as generate, bench and serve do), the compiled forward's rows (`--compile` and `--compile max`),
the quantized rows (`--quantize int8 / int4`), and LoRA merged against unmerged. Kept apart so that
gpu_check.py reads top to bottom."""

from __future__ import annotations

import copy
import gc
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# (pattern on torch.cuda.get_device_name, label, peak memory bandwidth GB/s, peak dense bf16 TFLOP/s), the
# vendors' data-sheet figures; the first match wins, so the more specific names come first.
DEVICES: list[tuple[str, str, float, float]] = [
    (r"\bH200", "H200", 4800.0, 989.0),
    (r"H100.*PCIe", "H100 PCIe", 2000.0, 756.0),
    (r"H100.*NVL", "H100 NVL", 3900.0, 835.0),
    (r"H100", "H100 SXM", 3350.0, 989.0),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", "A100 80GB PCIe", 1935.0, 312.0),
    (r"A100.*80GB", "A100 80GB SXM", 2039.0, 312.0),
    (r"A100", "A100 40GB", 1555.0, 312.0),
    (r"L40S", "L40S", 864.0, 362.0),
]
FALLBACK = ("H100 SXM", 3350.0, 989.0)  # what an unknown device is measured against, and said so


def device_bounds(name: str, bandwidth_gbs: float | None, peak_tflops: float | None) -> dict[str, Any]:
    """The bandwidth and compute a device's bounds use: the flags where given, else the table's row for
    `name`, else the H100 SXM's with a note that the device is unknown."""
    row = next(((label, bw, tf) for pattern, label, bw, tf in DEVICES if re.search(pattern, name)), None)
    label, bw, tf = row or FALLBACK
    note = (f"table: {label}" if row
            else f"unknown device: {label} figures assumed (pass --bandwidth-gbs and --peak-tflops)")
    if bandwidth_gbs is not None or peak_tflops is not None:
        note = "flags" + (f" (table: {label})" if row else "")
    return {"bandwidth_gbs": bandwidth_gbs if bandwidth_gbs is not None else bw,
            "peak_tflops": peak_tflops if peak_tflops is not None else tf, "source": note, "known": row is not None}


def mixed_lengths(length: int, batch: int) -> list[int]:
    """`batch` prompt lengths spread evenly over [length / 2, length * 3 / 2]: a left-padded batch."""
    lo, hi = max(1, length // 2), max(1, length * 3 // 2)
    return [lo + (hi - lo) * i // max(1, batch - 1) for i in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median seconds of `fn()` over `iters` calls (after the caller's warm-up)."""
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- decoding through the engine ------------------------------------------------------------------------

def engine_generate(model: Any, decoder: Any, request: Any) -> dict[str, Any]:
    """Decode `request`'s rows as concurrent requests in the step engine (one job per row, as `serve`
    submits them and `generate` splits them): its rows, engine steps, forwards, and the seconds spent
    inside the network's forward (synchronised on CUDA), from which host time per step follows."""
    from dataclasses import replace

    from evotok_cli.decoding.api import row_seed
    from evotok_cli.decoding.engine import Engine, make_jobs

    engine = Engine(model, max_rows=4 * len(request.prompts))
    jobs = []
    for i, prompt in enumerate(request.prompts):
        part = replace(request, prompts=[prompt], seeds=[row_seed(request, i)], seed=None)
        jobs += [engine.submit(job) for _, job in make_jobs(model, decoder, part, cohort=1)]
    net, clock = model.net, {"calls": 0, "seconds": 0.0}
    original = net.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        sync(model.device)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        sync(model.device)
        clock["seconds"] += time.perf_counter() - t0
        clock["calls"] += 1
        return out

    timing = not getattr(model, "compiled", False)  # a compiled forward is not to be wrapped: host time unknown
    if timing:
        net.forward = timed_forward
    try:
        while engine.step():
            pass
    finally:
        if timing:
            del net.forward
    for job in jobs:
        if job.error is not None:
            raise job.error
    return {"rows": [row for job in jobs for row in job.result.rows], "steps": max(engine.steps, 1),
            "forwards": engine.passes, "forward_seconds": clock["seconds"] if timing else float("nan")}


# -- the compiled forward -----------------------------------------------------------------------------

@torch.inference_mode()
def compiled_rows(model: Any, lengths: list[int], vocab: int, device: torch.device, iters: int,
                  eager_ms: dict[int, float], decode: Callable[[Any], dict[str, Any]],
                  level: bool | str = True) -> dict[str, Any]:
    """Forward latency under torch.compile next to eager, and one decoder run (`decode(model)`) compiled,
    at `level` (True: `--compile`; "max": `--compile max`, CUDA graphs, with how many graphs inductor
    skipped). A device or torch where compile fails (max on a CPU: refused) records the error instead of
    stopping the check."""
    import torch._dynamo

    from evotok_cli.runtime.compile import check_compile, compile_forward

    out: dict[str, Any] = {"level": level, "latency": [], "decoder": None, "error": None}
    try:
        check_compile(device, level)
        torch._dynamo.reset()  # graphs of another level must not be reused or count against the limit
        skips = _cudagraph_skips()
        model.compiled_forward, model.compile_level = compile_forward(model.net, level), level
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for length in lengths:
            ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
            for _ in range(2):  # the first call compiles (once: lengths are dynamic), the second settles
                model(ids)
            if not out["latency"]:
                out["compile_seconds"] = time.perf_counter() - t0
            ms = timed(lambda ids=ids: model(ids), device, iters) * 1e3
            out["latency"].append({"seq_len": length, "ms": ms, "eager_ms": eager_ms.get(length),
                                   "speedup": eager_ms[length] / ms if length in eager_ms else None})
        out["decoder"] = decode(model)
        if level == "max":
            out["cudagraph_skips"] = _cudagraph_skips() - skips
    except Exception as exc:  # a failed compile is a finding, not a crash
        out["error"] = _error(exc)
    finally:
        model.compiled_forward, model.compile_level = None, True
    return out


def _cudagraph_skips() -> int:
    """Graphs inductor compiled without a CUDA graph so far (mutated inputs, CPU tensors, dynamic shapes
    beyond its limit): a `--compile max` whose graphs were all skipped is `--compile` by another name."""
    from torch._dynamo.utils import counters

    return sum(counters["inductor"].get(key, 0) for key in ("cudagraph_skips",))


def _error(exc: BaseException) -> str:
    line = exc.line() if hasattr(exc, "line") else " ".join(str(exc).split())  # an EvotokError's own line
    return f"{type(exc).__name__}: {line}"[:300]


# -- quantized weights (--quantize int8 / int4) -----------------------------------------------------------

@torch.inference_mode()
def quantized_rows(model: Any, modes: tuple[str, ...], length: int, device: torch.device, iters: int,
                   decode: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per --quantize mode, on a copy of the model with its block linears quantized as `load_model` does
    (`runtime/quantize.quantize_net`): weight bytes (the block linears by the storage formula, and on CUDA
    what the copy holds on the card), one forward's latency at `length`, and `decode(m)`'s run (tokens/s,
    and the share of rows and tokens equal to the unquantized model's at temperature 0; each mode's second
    run, after a warm-up one). A mode the
    machine cannot run (bitsandbytes missing, a dtype without kernels) records its one-line error."""
    from dataclasses import replace

    from evotok_cli.runtime.quantize import check_supported, linear_bytes, quantize_net, quantized_names

    net = model.net
    size = next(net.parameters()).element_size()
    shapes = [tuple(net.get_submodule(n).weight.shape) for n in quantized_names(net)]
    ids = torch.randint(0, model.vocab_size, (1, length), generator=torch.Generator().manual_seed(3)).to(device)
    decode(model)  # warm-up: every mode's timed run is its second, so that none pays the engine's first shapes
    base = decode(model)
    model(ids)
    rows = [{"mode": "none", "linear_bytes": int(sum(linear_bytes(sh, "none", size) for sh in shapes)),
             "held_bytes": _held(net, device), "ms_per_forward": timed(lambda: model(ids), device, iters) * 1e3,
             "tokens_per_s": base["tokens_per_s"], "rows_equal": 1.0, "tokens_equal": 1.0, "error": None}]
    for mode in modes:
        row: dict[str, Any] = {"mode": mode, "error": None}
        qnet = quantized = None
        try:
            check_supported(mode, device, model.dtype)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            qnet = copy.deepcopy(net)
            quantize_net(qnet, mode, device)
            qnet.to(device)
            gc.collect()
            quantized = replace(model, net=qnet, quantize=mode, compiled_forward=None)
            row["linear_bytes"] = int(sum(linear_bytes(sh, mode, size) for sh in shapes))
            row["linear_ratio"] = row["linear_bytes"] / rows[0]["linear_bytes"]
            row["held_bytes"] = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
            quantized(ids)  # warm-up: the backend's kernels, the allocator
            row["ms_per_forward"] = timed(lambda q=quantized: q(ids), device, iters) * 1e3
            decode(quantized)
            run = decode(quantized)
            pairs = list(zip(base["token_ids"], run["token_ids"]))
            row.update(tokens_per_s=run["tokens_per_s"], nfe=run["nfe"],
                       rows_equal=sum(a == b for a, b in pairs) / len(pairs),
                       tokens_equal=sum(x == y for a, b in pairs for x, y in zip(a, b)) / sum(len(a) for a, _ in pairs))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of GPU memory (the float copy and its quantized layers at once)"
        except Exception as exc:  # one mode's failure is a finding: the other modes still run
            row["error"] = _error(exc)
        finally:
            qnet = quantized = None  # noqa: F841 (frees the copy before the next mode's)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _held(net: torch.nn.Module, device: torch.device) -> int | None:
    """Bytes of `net`'s parameters and buffers on CUDA (None on the CPU: the process's memory says little)."""
    if device.type != "cuda":
        return None
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


# -- LoRA merged against unmerged ---------------------------------------------------------------------

@torch.inference_mode()
def lora_rows(model: Any, relative: float, rank: int, length: int, device: torch.device, iters: int,
              targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")) -> dict[str, Any]:
    """A random adapter on q/k/v of every block, its deltas `relative` times the weights in norm (an
    EvoToken-like 1e-3), applied unmerged and then merged on the same model: how far apart the logits
    are, how much of the unmerged change a merge keeps, and what each costs per forward. The merge is
    undone at the end (the weights are restored from copies)."""
    from evotok_cli.runtime.lora import LoRAPair, apply_pair, delta_stats

    net = model.net
    gen = torch.Generator().manual_seed(7)
    pairs = []
    for i, block in enumerate(net.model.transformer.blocks):
        for t in targets:
            module = getattr(block, t)
            out_f, in_f = module.weight.shape
            a = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(device)
            b = (torch.randn(out_f, rank, generator=gen) / rank ** 0.5).to(device)
            scale = relative * float(module.weight.float().norm()) / float((b @ a).norm())
            pairs.append(LoRAPair(f"model.transformer.blocks.{i}.{t}", module, a, b, scale))
    low = model.dtype if model.dtype != torch.float32 else torch.bfloat16  # what a merge on a GPU would lose
    stats = delta_stats(pairs, lambda p: p.module.weight, low)
    ids = torch.randint(0, model.vocab_size, (1, length), generator=gen).to(device)
    base = model(ids).float()
    saved = {p.name: p.module.weight.detach().clone() for p in pairs}
    try:
        for p in pairs:
            apply_pair(net, p, "unmerged")
        model(ids)
        unmerged = model(ids).float()
        unmerged_ms = timed(lambda: model(ids), device, iters) * 1e3
        for p in pairs:  # back to the plain layers, then merged into their weights
            parent, _, child = p.name.rpartition(".")
            setattr(net.get_submodule(parent), child, p.module)
            apply_pair(net, p, "merged")
        merged = model(ids).float()
        merged_ms = timed(lambda: model(ids), device, iters) * 1e3
    finally:
        for p in pairs:
            parent, _, child = p.name.rpartition(".")
            setattr(net.get_submodule(parent), child, p.module)
            p.module.weight.copy_(saved[p.name])
    change = unmerged - base
    return {"relative_delta": stats.relative, "rank": rank, "modules": len(pairs), "estimate": stats.as_dict(),
            "max_logit_diff": float((merged - unmerged).abs().max()),
            "max_logit_change_unmerged": float(change.abs().max()),
            "merged_keeps": float(((merged - base) * change).sum() / (change * change).sum().clamp(min=1e-30)),
            "unmerged_ms": unmerged_ms, "merged_ms": merged_ms}
