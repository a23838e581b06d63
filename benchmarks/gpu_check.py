"""GPU check: how fast is one forward pass of an 8B diffusion LM here, and what does each decoder cost?

Builds a random-weight model with LLaDA-8B's shapes (bf16, directly on the GPU: built on the meta device,
allocated with `to_empty`, initialised in place; no checkpoint needed), then reports
1. per-forward latency at a few sequence lengths next to the memory-bandwidth bound (every weight byte
   read once per pass) and the compute bound (2 FLOPs per weight per position), with the device's
   bandwidth and peak compute read from a table by its name (H100, H200, A100, L40S; flags override);
2. wall time, NFE, tokens/s and peak memory of each decoder x cache mode at gen 256 / block 32 / steps 128,
   batch 1, through the step engine as `evotok generate`, `bench` and `serve` run them (each row a
   concurrent request); a batch of equal prompts, a batch of 8 mixed lengths, and temperature 0.5 (the
   paper tasks' sampling), with forwards per engine step and host milliseconds per step beside the times;
3. the forward under torch.compile (`--no-compile` skips it): latency next to eager and a cached hard-mask run, or
   the error where compile does not work; then the same under `--compile max` (CUDA graphs of the window
   passes, with how many graphs inductor skipped; on a CPU the row records evotok's refusal);
4. `--quantize int8` and `int4` (`--no-quantize` skips them; bitsandbytes must be installed): the block
   linears' bytes per mode (and on CUDA what the quantized copy holds on the card), ms per forward, and a
   hard-mask run on a few prompts (`--quantize-prompts`) at temperature 0: tokens/s and the share of rows
   and tokens equal to the unquantized model's;
5. a random LoRA adapter (deltas 1e-3 of the weights) merged against unmerged: logit difference, how
   much of the adapter's change a merge keeps, and the cost of each per forward.

Random weights give near-uniform predictions, so threshold-driven decoders (d2f) take as many passes as
their rules allow at low confidence; the NFE column says how many passes were run, and ms/forward is the
number that transfers to real checkpoints. Tokens/s counts the whole generated span (a random model's
EOS means nothing).

    python benchmarks/gpu_check.py                 # ~3 minutes on an H100, plus compiling (a few minutes)
    python benchmarks/gpu_check.py --quick --no-compile   # the quickest full table
    python benchmarks/gpu_check.py --bandwidth-gbs 2039 --peak-tflops 312   # a device the table lacks
    python benchmarks/gpu_check.py --device cpu --layers 1 --hidden 256 --quick   # smoke test, no GPU

Results: benchmarks/results/gpu_check-<device>-<time>.json and .md (`--out` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _gpu_rows import (
    compiled_rows,
    device_bounds,
    engine_generate,
    lora_rows,
    mixed_lengths,
    quantized_rows,
    sync,
    timed,
)

try:
    from evotok_cli.runtime.architectures.llada import LLaDAConfig, LLaDAModelLM
except ImportError:  # run from a checkout that was never installed
    sys.exit("error: evotok is not installed in this Python; run `pip install -e .` in the repository first")

SCHEMA = "evotok.gpu_check/1"
RESULTS = Path(__file__).resolve().parent / "results"
# LLaDA-8B's config.json (spec 7.1).
REAL = {"d_model": 4096, "n_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "vocab_size": 126464,
        "mask_token_id": 126336, "eos_token_id": 126081}
# (decoder, cache label, options): every decoder and every cache mode it supports.
RUNS = [
    ("hard-mask", "none", {"cache": "none"}),
    ("hard-mask", "prefix", {"cache": "prefix"}),
    ("hard-mask", "dual", {"cache": "dual"}),
    ("evotoken", "none", {"cache": "none"}),
    ("evotoken", "prefix", {"cache": "prefix"}),
    ("evotoken", "dual", {"cache": "dual"}),
    ("d2f", "none", {"cache": False}),
    ("d2f", "blocks", {"cache": True}),
]


class CheckError(Exception):
    """A problem with the machine or the flags: printed as one line, exit code 2."""


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    cfg: LLaDAConfig
    prompt_length: int
    gen_length: int
    block_length: int
    steps: int
    repeats: int
    batch: int
    lengths: list[int]
    bandwidth_gbs: float
    peak_tflops: float
    bounds_source: str
    padded_batch: int
    compile: bool
    quantize: bool
    quantize_prompts: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto = bf16 on CUDA (what the official runs use), fp32 on CPU")
    p.add_argument("--layers", type=int, default=REAL["n_layers"], help="transformer blocks (32 in LLaDA-8B)")
    p.add_argument("--hidden", type=int, default=REAL["d_model"],
                   help="d_model (4096); heads = hidden / 128, MLP = 3 x hidden as in LLaDA-8B")
    p.add_argument("--vocab", type=int, default=REAL["vocab_size"], help="vocabulary (126464)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="peak memory bandwidth in GB/s (default: the device's, from a table; H100 SXM 3350, "
                        "H100 PCIe 2000, H200 4800, A100 80GB SXM 2039, A100 40GB 1555)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s (default: the device's, from the table; H100/H200 989, A100 312)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=64, help="random prompt tokens (batch 1)")
    p.add_argument("--decoders", default="hard-mask,evotoken,d2f", help="comma-separated subset")
    p.add_argument("--batch", type=int, default=16,
                   help="also run hard-mask and evotoken without cache on this many prompts at once (1: skip)")
    p.add_argument("--padded-batch", type=int, default=8,
                   help="also run hard-mask and evotoken without cache on this many prompts of mixed lengths "
                        "(left-padded; 1: skip)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows, --compile and --compile max (their first passes compile: a "
                        "minute or two on a GPU)")
    p.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="skip the --quantize int8 / int4 rows (they need bitsandbytes, and a float copy of the model "
                        "beside the original while each mode is built)")
    p.add_argument("--quantize-prompts", type=int, default=4,
                   help="prompts of mixed lengths whose greedy tokens each quantized mode is compared on (default 4)")
    p.add_argument("--quick", action="store_true",
                   help="two lengths, one timed run per decoder after a warm-up on the same shapes with two "
                        "passes per block")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckError("CUDA is not available on this machine; pass --device cpu "
                         "(e.g. --device cpu --layers 1 --hidden 256 --quick) for a smoke run")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CheckError(f"no GPU {device.index} (found {torch.cuda.device_count()})")
    if args.hidden % 128 or args.hidden < 128:
        raise CheckError(f"--hidden {args.hidden} must be a multiple of 128 (the head size)")
    for flag in ("layers", "vocab", "gen_length", "block_length", "steps", "prompt_length", "batch", "padded_batch",
                 "quantize_prompts"):
        if getattr(args, flag) < 1:
            raise CheckError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.vocab < 16:
        raise CheckError(f"--vocab {args.vocab} is too small (at least 16)")
    if args.gen_length % args.block_length:
        raise CheckError(f"--gen-length {args.gen_length} is not a multiple of --block-length {args.block_length}")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab = args.vocab
    cfg = LLaDAConfig(d_model=args.hidden, n_heads=args.hidden // 128, n_kv_heads=args.hidden // 128,
                      n_layers=args.layers, mlp_hidden_size=3 * args.hidden, vocab_size=vocab, embedding_size=vocab,
                      max_sequence_length=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                      mask_token_id=min(REAL["mask_token_id"], vocab - 1),
                      eos_token_id=min(REAL["eos_token_id"], vocab - 2))
    for flag in ("bandwidth_gbs", "peak_tflops"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise CheckError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    canvas = args.prompt_length + args.gen_length
    lengths = [args.block_length, canvas] if args.quick else [args.block_length, 128, canvas, 1024]
    bounds = device_bounds(device_name(device), args.bandwidth_gbs, args.peak_tflops)
    return Settings(device=device, dtype=dtype, cfg=cfg, prompt_length=args.prompt_length, gen_length=args.gen_length,
                    block_length=args.block_length, steps=args.steps, repeats=1 if args.quick else 3,
                    batch=args.batch, lengths=sorted(set(lengths)), bandwidth_gbs=bounds["bandwidth_gbs"],
                    peak_tflops=bounds["peak_tflops"], bounds_source=bounds["source"], padded_batch=args.padded_batch,
                    compile=args.compile, quantize=args.quantize, quantize_prompts=args.quantize_prompts)


# -- model ------------------------------------------------------------------------------------------

@torch.no_grad()
def build_random_model(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LLaDAModelLM:
    """Allocate straight in the target dtype on the target device (no fp32 copy, no checkpoint) and fill
    with normal(0, 0.02) weights, norms at 1: the shapes and dtypes of the real model, which is all a
    speed and memory measurement needs."""
    with torch.device("meta"):
        net = LLaDAModelLM(cfg).to(dtype)
    net = net.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith(("norm.weight", "ln_f.weight")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return net.eval().requires_grad_(False)


def wrap(net: LLaDAModelLM, cfg: LLaDAConfig) -> Any:
    """The DiffusionModel protocol the decoders talk to, without a checkpoint folder or tokenizer."""
    from evotok_cli.runtime.architectures import FAMILIES
    from evotok_cli.runtime.model import DiffusionModel

    family = next(f for f in FAMILIES if f.name == "llada")
    return DiffusionModel(net=net, family=family, config=cfg, tokenizer=None, path=Path("random"), weights=None)


def model_facts(net: LLaDAModelLM, cfg: LLaDAConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Sizes, and the bytes one forward must read: every weight except the input embedding table, of
    which a pass reads only the rows of its tokens."""
    params = sum(p.numel() for p in net.parameters())
    streamed = params - net.model.transformer.wte.weight.numel()
    size = torch.tensor([], dtype=dtype).element_size()
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * size  # K and V, every layer
    return {"layers": cfg.n_layers, "hidden": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "mlp": cfg.mlp_hidden_size, "vocab": cfg.vocab_size, "parameters": params,
            "weight_bytes": params * size, "bytes_read_per_forward": streamed * size,
            "flops_per_position": 2 * streamed, "kv_cache_bytes_per_token": kv_per_token}


# -- measurements -----------------------------------------------------------------------------------

@torch.inference_mode()
def forward_latency(model: Any, s: Settings, facts: dict[str, Any], iters: int) -> list[dict[str, Any]]:
    """Median wall time of one full forward (all positions' logits) per sequence length, batch 1."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for length in s.lengths:
        ids = torch.randint(0, s.cfg.vocab_size, (1, length), generator=gen).to(s.device)
        for _ in range(2):  # warm-up: kernel selection, allocator
            model(ids)
        ms = timed(lambda ids=ids: model(ids), s.device, iters) * 1e3
        bw_ms = facts["bytes_read_per_forward"] / (s.bandwidth_gbs * 1e9) * 1e3
        fl_ms = facts["flops_per_position"] * length / (s.peak_tflops * 1e12) * 1e3
        rows.append({"seq_len": length, "ms": ms, "bandwidth_bound_ms": bw_ms, "compute_bound_ms": fl_ms,
                     "of_bound": max(bw_ms, fl_ms) / ms})
    return rows


def run_decoder(model: Any, name: str, options: dict[str, Any], s: Settings, batch: int = 1,
                temperature: float = 0.0, padded: bool = False) -> dict[str, Any]:
    """A warm-up generation, then `repeats` timed ones; the median is reported. `batch` random prompts
    are decoded together, of the same length or (`padded`) of lengths spread around it. The warm-up runs
    the timed shapes: the whole request, or when quick the same canvas and blocks with two passes per
    block (a full pass and a windowed one under a cache), so no timed pass meets a new shape."""
    from evotok_cli.decoding.api import GenerationRequest
    from evotok_cli.jobs.generation import make_decoder

    if name == "d2f":
        options = {**options, "block_size": s.block_length}
    decoder = make_decoder(name, options)
    g = torch.Generator().manual_seed(1)
    lengths = mixed_lengths(s.prompt_length, batch) if padded else [s.prompt_length] * batch
    prompts = [torch.randint(0, s.cfg.mask_token_id, (n,), generator=g).tolist() for n in lengths]
    request = GenerationRequest(prompts=prompts, gen_length=s.gen_length, block_length=s.block_length,
                                steps=s.steps, temperature=temperature, seed=0)
    blocks = s.gen_length // s.block_length
    warm = request if s.repeats > 1 else GenerationRequest(
        prompts=request.prompts, gen_length=s.gen_length, block_length=s.block_length,
        steps=min(s.steps, 2 * blocks), temperature=temperature, seed=0)
    with torch.inference_mode():
        engine_generate(model, decoder, warm)
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        times, nfe, steps = [], 0, []
        for _ in range(s.repeats):
            sync(s.device)
            t0 = time.perf_counter()
            out = engine_generate(model, decoder, request)
            sync(s.device)
            times.append(time.perf_counter() - t0)
            nfe = max(r.nfe for r in out["rows"])
            steps.append((times[-1], out["steps"], out["forwards"], out["forward_seconds"]))
    seconds = statistics.median(times)
    wall, n_steps, forwards, forward_s = min(steps, key=lambda t: abs(t[0] - seconds))  # the median run's
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None
    return {"batch": batch, "padded": padded, "temperature": temperature, "nfe": nfe, "seconds": seconds,
            "tokens_per_s": batch * s.gen_length / seconds,
            "ms_per_forward": seconds / nfe * 1e3, "tokens_per_forward": s.gen_length / nfe, "peak_memory_gib": peak,
            "engine_steps": n_steps, "forwards_per_step": forwards / n_steps,
            "host_ms_per_step": (wall - forward_s) / n_steps * 1e3}


def greedy_tokens(model: Any, s: Settings) -> dict[str, Any]:
    """Hard-mask, no cache, temperature 0 on `quantize_prompts` prompts of mixed lengths through the engine:
    tokens/s, NFE and every row's tokens (what a quantized mode is compared on)."""
    from evotok_cli.decoding.api import GenerationRequest
    from evotok_cli.jobs.generation import make_decoder

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, s.cfg.mask_token_id, (n,), generator=g).tolist()
               for n in mixed_lengths(s.prompt_length, s.quantize_prompts)]
    request = GenerationRequest(prompts=prompts, gen_length=s.gen_length, block_length=s.block_length,
                                steps=s.steps, temperature=0.0, seed=0)
    with torch.inference_mode():
        sync(s.device)
        t0 = time.perf_counter()
        out = engine_generate(model, make_decoder("hard-mask", {"cache": "none"}), request)
        sync(s.device)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": len(prompts) * s.gen_length / seconds, "nfe": max(r.nfe for r in out["rows"]),
            "token_ids": [list(r.token_ids) for r in out["rows"]]}


def decoder_runs(s: Settings, wanted: list[str]) -> list[tuple[str, str, dict[str, Any], int, float, bool]]:
    """(decoder, cache label, options, batch, temperature, padded) of every decoder row: each decoder and
    cache at batch 1, then without cache a batch of equal prompts, a left-padded batch, temperature 0.5."""
    runs = [(d, c, o, 1, 0.0, False) for d, c, o in RUNS]
    plain = [(d, c, o) for d, c, o in RUNS if c == "none" and d != "d2f"]
    runs += [(d, c, o, s.batch, 0.0, False) for d, c, o in plain] if s.batch > 1 else []
    runs += [(d, c, o, s.padded_batch, 0.0, True) for d, c, o in plain] if s.padded_batch > 1 else []
    runs += [(d, c, o, 1, 0.5, False) for d, c, o in plain]
    return [r for r in runs if r[0] in wanted]


def decoder_row(model: Any, s: Settings, decoder: str, cache: str, options: dict[str, Any], batch: int,
                temperature: float, padded: bool) -> dict[str, Any]:
    """One decoder row, or its error: one failing decoder must not lose the others' numbers."""
    row: dict[str, Any] = {"decoder": decoder, "cache": cache, "options": dict(options), "batch": batch}
    what = f"  {decoder:9s} cache={cache:6s} batch {batch:2d}{' padded' if padded else ''} T={temperature:g}"
    try:
        row.update(run_decoder(model, decoder, options, s, batch, temperature=temperature, padded=padded))
        log(f"{what}: NFE {row['nfe']:4d}, {row['seconds']:7.2f} s, {row['tokens_per_s']:8.1f} tok/s, "
            f"{row['ms_per_forward']:7.2f} ms/forward, {row['forwards_per_step']:.2f} forwards/step, "
            f"{row['host_ms_per_step']:.2f} host ms/step")
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of GPU memory"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    if row.get("error"):
        log(f"{what}: FAILED ({row['error']})")
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


# -- reporting --------------------------------------------------------------------------------------

def issue_targets(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Issue 3's ratios: evotoken's slowdown over hard-mask at equal NFE, the caches' speed-ups over no
    cache, and batched over batch-1 throughput (tokens/s)."""
    speed = {(r["decoder"], r["cache"], r.get("batch", 1)): r["tokens_per_s"] for r in rows
             if not r.get("error") and not r.get("padded") and not r.get("temperature")}
    out: dict[str, float] = {}

    def ratio(key: str, a: tuple, b: tuple) -> None:
        if a in speed and b in speed:
            out[key] = round(speed[a] / speed[b], 3)

    ratio("evotoken_slowdown_vs_hard_mask", ("hard-mask", "none", 1), ("evotoken", "none", 1))
    for decoder in ("hard-mask", "evotoken"):
        for cache in ("prefix", "dual"):
            ratio(f"{decoder}_{cache}_speedup", (decoder, cache, 1), (decoder, "none", 1))
    batches = sorted({k[2] for k in speed if k[2] > 1})
    for decoder in ("hard-mask", "evotoken"):
        for batch in batches:
            ratio(f"{decoder}_batch{batch}_speedup", (decoder, "none", batch), (decoder, "none", 1))
    return out


def markdown(doc: dict[str, Any]) -> str:
    m, st = doc["model"], doc["settings"]
    on_cpu = "; GPU figures, meaningless on a CPU" if doc["device"].startswith("CPU") else ""
    lines = [
        f"# GPU check: {doc['device']}",
        "",
        f"{doc['when']}, torch {doc['torch']}, {doc['dtype']}{', quick' if st['quick'] else ''}. Random weights, "
        f"LLaDA-8B shapes: {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, MLP {m['mlp']}, "
        f"vocab {m['vocab']}: {m['parameters'] / 1e9:.3g}B parameters, {m['weight_bytes'] / 2**30:.3g} GiB of weights.",
        f"Bounds use {doc['bandwidth_gbs']:g} GB/s and {doc['peak_tflops']:g} TFLOP/s ({doc['bounds_source']}; "
        f"data-sheet peaks, not measured{on_cpu}).",
        "",
        "| sequence length | ms / forward | bandwidth bound ms | compute bound ms | achieved / bound |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['seq_len']} | {r['ms']:.3g} | {r['bandwidth_bound_ms']:.3g} | {r['compute_bound_ms']:.3g} | "
              f"{r['of_bound']:.0%} |" for r in doc["latency"]]
    lines += [
        "",
        f"Decoders: prompt {st['prompt_length']}, gen {st['gen_length']}, block {st['block_length']}, steps "
        f"{st['steps']}, temperature 0, median of {st['repeats']} run(s) after a warm-up"
        f"{' (one block)' if st['quick'] else ''}; tokens/s counts every row of a batch.",
        "",
        "| decoder | cache | batch | T | NFE | seconds | tokens/s | ms / forward | tokens / forward | peak GiB "
        "| forwards / step | host ms / step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in doc["decoders"]:
        batch = f"{r.get('batch', 1)}{' padded' if r.get('padded') else ''}"
        head = f"| {r['decoder']} | {r['cache']} | {batch} | {r.get('temperature', 0):g} |"
        if r.get("error"):
            lines.append(f"{head} failed: {r['error']} | | | | | | | |")
            continue
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"{head} {r['nfe']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_forward']:.2f} | {r['tokens_per_forward']:.2f} | {peak} | "
                     f"{r.get('forwards_per_step', nan):.2f} | {r.get('host_ms_per_step', nan):.2f} |")
    targets = issue_targets(doc["decoders"])
    if targets:
        lines += ["", "Issue 3's ratios (targets: evotoken slowdown <= 1.05, prefix >= 2.5, dual >= 4, batch 16 >= 4): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in targets.items()) + "."]
    lines += compiled_markdown(doc.get("compiled")) + compiled_markdown(doc.get("compiled_max"))
    lines += quantized_markdown(doc.get("quantized"), st) + lora_markdown(doc.get("lora"))
    lines += ["", "Random weights: d2f's thresholds see near-uniform confidences, so its NFE is not what a trained "
              "model needs; ms / forward is.", ""]
    return "\n".join(lines)


def compiled_markdown(c: dict[str, Any] | None) -> list[str]:
    if c is None:
        return []
    name = "torch.compile, --compile max" if c.get("level") == "max" else "torch.compile"
    if c["error"]:
        return ["", f"{name}: failed ({c['error']})."]
    graphs = (f"; CUDA graphs, {c['cudagraph_skips']} graph(s) skipped by inductor" if "cudagraph_skips" in c
              else "")
    lines = ["", f"{name} (whole forward, dynamic shapes{graphs}; first call {c.get('compile_seconds', 0):.0f} s):",
             "", "| sequence length | ms / forward | eager ms | speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seq_len']} | {r['ms']:.3g} | {r['eager_ms']:.3g} | {r['speedup']:.2f}x |" for r in c["latency"]]
    d = c.get("decoder")
    if d:
        lines += ["", f"Compiled hard-mask, dual cache, batch 1: NFE {d['nfe']}, {d['seconds']:.2f} s, "
                      f"{d['tokens_per_s']:.1f} tokens/s, {d['ms_per_forward']:.2f} ms / forward."]
    return lines


def quantized_markdown(rows: list[dict[str, Any]] | None, st: dict[str, Any]) -> list[str]:
    if rows is None:
        return []
    lines = ["", f"--quantize (bitsandbytes, block linears only): hard-mask without cache on "
                 f"{st['quantize_prompts']} prompts of mixed lengths, temperature 0, one run after a warm-up; "
                 "equal = the same tokens as --quantize none.", "",
             "| mode | linear GB | x none | held on the card GB | ms / forward | tokens/s | rows equal "
             "| tokens equal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | | |")
            continue
        held = "-" if r.get("held_bytes") is None else f"{r['held_bytes'] / 1e9:.3g}"
        lines.append(f"| {r['mode']} | {r['linear_bytes'] / 1e9:.3g} | {r.get('linear_ratio', 1.0):.2f} | {held} | "
                     f"{r['ms_per_forward']:.3g} | {r['tokens_per_s']:.1f} | {r['rows_equal']:.0%} | "
                     f"{r['tokens_equal']:.0%} |")
    return lines


def lora_markdown(lo: dict[str, Any] | None) -> list[str]:
    if lo is None:
        return []
    if lo.get("error"):
        return ["", f"LoRA merged vs unmerged: failed ({lo['error']})."]
    est = lo["estimate"]
    return ["", f"LoRA (random, r={lo['rank']}, {lo['modules']} modules, ||dW||/||W|| {lo['relative_delta']:.2g}): "
                f"a merge into {est['dtype']} rounds away {est['lost_if_merged']:.0%} of the delta entries; merged and "
                f"unmerged logits differ by up to {lo['max_logit_diff']:.3g} (the adapter moves them by up to "
                f"{lo['max_logit_change_unmerged']:.3g}), and the merge keeps {lo['merged_keeps']:.0%} of the unmerged "
                f"change. ms / forward: unmerged {lo['unmerged_ms']:.3g}, merged {lo['merged_ms']:.3g}."]


def write_results(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", doc["device"].lower()).strip("-") or "device"
    stem = f"gpu_check-{slug}-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if doc['settings']['quick'] else ''}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(doc), encoding="utf-8")
    return json_path, md_path


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = settings_from(args)
    except CheckError as exc:
        log(f"error: {exc}")
        return 2
    wanted = [d.strip() for d in args.decoders.split(",") if d.strip()]
    unknown = sorted(set(wanted) - {name for name, _, _ in RUNS})
    if unknown:
        log(f"error: unknown decoder {unknown[0]!r} (choose from hard-mask, evotoken, d2f)")
        return 2
    name = device_name(s.device)
    log(f"device: {name}; bandwidth {s.bandwidth_gbs:g} GB/s, peak {s.peak_tflops:g} TFLOP/s ({s.bounds_source})")
    try:
        net = build_random_model(s.cfg, s.device, s.dtype)
    except torch.cuda.OutOfMemoryError:
        log(f"error: the model ({s.cfg.n_layers} layers, hidden {s.cfg.d_model}) does not fit on {name}; "
            "try --layers 16 for a smaller model")
        return 2
    model = wrap(net, s.cfg)
    facts = model_facts(net, s.cfg, s.dtype)
    log(f"model: {facts['parameters'] / 1e9:.3g}B parameters, {facts['weight_bytes'] / 2**30:.3g} GiB "
        f"({str(s.dtype).removeprefix('torch.')})")
    iters = 3 if args.quick else 10
    latency = forward_latency(model, s, facts, iters=iters)
    for r in latency:
        log(f"  L={r['seq_len']:5d}: {r['ms']:8.2f} ms/forward (bandwidth bound {r['bandwidth_bound_ms']:.3g} ms, "
            f"compute bound {r['compute_bound_ms']:.3g} ms)")
    rows = [decoder_row(model, s, *run) for run in decoder_runs(s, wanted)]
    doc = {
        "schema": SCHEMA, "device": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "dtype": str(s.dtype).removeprefix("torch."), "bandwidth_gbs": s.bandwidth_gbs, "peak_tflops": s.peak_tflops,
        "bounds_source": s.bounds_source, "model": facts,
        "settings": {"quick": args.quick, "prompt_length": s.prompt_length, "gen_length": s.gen_length,
                     "block_length": s.block_length, "steps": s.steps, "repeats": s.repeats, "batch": s.batch,
                     "padded_batch": s.padded_batch, "padded_prompt_lengths": mixed_lengths(s.prompt_length,
                                                                                              s.padded_batch),
                     "quantize_prompts": s.quantize_prompts},
        "latency": latency, "decoders": rows, "targets": issue_targets(rows),
    }
    if s.compile:
        log("  torch.compile: compiling (a minute or two on a GPU) ...")
        eager = {r["seq_len"]: r["ms"] for r in latency}
        doc["compiled"] = compiled_rows(model, s.lengths, s.cfg.vocab_size, s.device, iters, eager,
                                        lambda m: run_decoder(m, "hard-mask", {"cache": "dual"}, s))
        c = doc["compiled"]
        log(f"  torch.compile: FAILED ({c['error']})" if c["error"] else "  torch.compile: " + ", ".join(
            f"L={r['seq_len']} {r['ms']:.2f} ms ({r['speedup']:.2f}x)" for r in c["latency"]))
        log("  torch.compile, --compile max (CUDA graphs): compiling ...")
        doc["compiled_max"] = compiled_rows(model, s.lengths, s.cfg.vocab_size, s.device, iters, eager,
                                            lambda m: run_decoder(m, "hard-mask", {"cache": "dual"}, s), level="max")
        c = doc["compiled_max"]
        log(f"  --compile max: FAILED ({c['error']})" if c["error"] else "  --compile max: " + ", ".join(
            f"L={r['seq_len']} {r['ms']:.2f} ms ({r['speedup']:.2f}x)" for r in c["latency"])
            + f"; {c['cudagraph_skips']} graph(s) skipped")
    if s.quantize:
        doc["quantized"] = quantized_rows(model, ("int8", "int4"), s.block_length, s.device, iters,
                                          lambda m: greedy_tokens(m, s))
        for r in doc["quantized"]:
            log(f"  --quantize {r['mode']}: FAILED ({r['error']})" if r["error"] else
                f"  --quantize {r['mode']}: linear {r['linear_bytes'] / 1e9:.3g} GB, "
                f"{r['ms_per_forward']:.2f} ms/forward, {r['tokens_per_s']:.1f} tok/s, "
                f"tokens equal {r['tokens_equal']:.0%}")
    try:
        doc["lora"] = lora_rows(model, relative=1e-3, rank=16, length=s.block_length, device=s.device, iters=iters)
        log(f"  LoRA: merged vs unmerged logits differ by up to {doc['lora']['max_logit_diff']:.3g}; the merge keeps "
            f"{doc['lora']['merged_keeps']:.0%} of the change")
    except Exception as exc:  # recorded, like a failed decoder
        doc["lora"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]}
    json_path, md_path = write_results(doc, args.out)
    log(f"wrote {json_path} and {md_path}")
    return 1 if any(r.get("error") for r in rows) or doc["lora"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
