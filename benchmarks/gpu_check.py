"""GPU check: how fast is one forward pass of an 8B diffusion LM here, and what does each decoder cost?

Builds a random-weight model with LLaDA-8B's shapes (bf16, directly on the GPU: built on the meta device,
allocated with `to_empty`, initialised in place; no checkpoint needed), then reports
1. per-forward latency at a few sequence lengths next to the memory-bandwidth bound (every weight byte
   read once per pass) and the compute bound (2 FLOPs per weight per position);
2. wall time, NFE, tokens/s and peak memory of each decoder x cache mode at gen 256 / block 32 / steps 128,
   batch 1, through the same decoders and model protocol as `evotok generate`.

Random weights give near-uniform predictions, so threshold-driven decoders (d2f) take as many passes as
their rules allow at low confidence; the NFE column says how many passes were run, and ms/forward is the
number that transfers to real checkpoints. Tokens/s counts the whole generated span (a random model's
EOS means nothing).

    python benchmarks/gpu_check.py                 # H100 SXM defaults, ~3 minutes
    python benchmarks/gpu_check.py --quick         # ~2 minutes
    python benchmarks/gpu_check.py --bandwidth-gbs 2039 --peak-tflops 312   # A100 80GB SXM
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto = bf16 on CUDA (what the official runs use), fp32 on CPU")
    p.add_argument("--layers", type=int, default=REAL["n_layers"], help="transformer blocks (32 in LLaDA-8B)")
    p.add_argument("--hidden", type=int, default=REAL["d_model"],
                   help="d_model (4096); heads = hidden / 128, MLP = 3 x hidden as in LLaDA-8B")
    p.add_argument("--vocab", type=int, default=REAL["vocab_size"], help="vocabulary (126464)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                   help="peak memory bandwidth in GB/s (default 3350: H100 SXM; A100 80GB: 2039; H200: 4800)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s (default 989: H100 SXM; A100: 312)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=64, help="random prompt tokens (batch 1)")
    p.add_argument("--decoders", default="hard-mask,evotoken,d2f", help="comma-separated subset")
    p.add_argument("--batch", type=int, default=16,
                   help="also run hard-mask and evotoken without cache on this many prompts at once (1: skip)")
    p.add_argument("--quick", action="store_true",
                   help="two lengths, a one-block warm-up and one timed run per decoder (~1 min on an H100)")
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
    for flag in ("layers", "vocab", "gen_length", "block_length", "steps", "prompt_length", "batch"):
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
    canvas = args.prompt_length + args.gen_length
    lengths = [args.block_length, canvas] if args.quick else [args.block_length, 128, canvas, 1024]
    return Settings(device=device, dtype=dtype, cfg=cfg, prompt_length=args.prompt_length, gen_length=args.gen_length,
                    block_length=args.block_length, steps=args.steps, repeats=1 if args.quick else 3,
                    batch=args.batch,
                    lengths=sorted(set(lengths)), bandwidth_gbs=args.bandwidth_gbs, peak_tflops=args.peak_tflops)


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

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_latency(model: Any, s: Settings, facts: dict[str, Any], iters: int) -> list[dict[str, Any]]:
    """Median wall time of one full forward (all positions' logits) per sequence length, batch 1."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for length in s.lengths:
        ids = torch.randint(0, s.cfg.vocab_size, (1, length), generator=gen).to(s.device)
        for _ in range(2):  # warm-up: kernel selection, allocator
            model(ids)
        times = []
        for _ in range(iters):
            sync(s.device)
            t0 = time.perf_counter()
            model(ids)
            sync(s.device)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        bw_ms = facts["bytes_read_per_forward"] / (s.bandwidth_gbs * 1e9) * 1e3
        fl_ms = facts["flops_per_position"] * length / (s.peak_tflops * 1e12) * 1e3
        rows.append({"seq_len": length, "ms": ms, "bandwidth_bound_ms": bw_ms, "compute_bound_ms": fl_ms,
                     "of_bound": max(bw_ms, fl_ms) / ms})
    return rows


def run_decoder(model: Any, name: str, options: dict[str, Any], s: Settings, batch: int = 1) -> dict[str, Any]:
    """A warm-up generation (the full one, or one block when quick), then `repeats` timed ones; the median
    is reported. `batch` different random prompts of the same length are decoded together."""
    from evotok_cli.decoding.api import GenerationRequest
    from evotok_cli.generation import make_decoder

    if name == "d2f":
        options = {**options, "block_size": s.block_length}
    decoder = make_decoder(name, options)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, s.cfg.mask_token_id, (s.prompt_length,), generator=g).tolist() for _ in range(batch)]
    request = GenerationRequest(prompts=prompts, gen_length=s.gen_length, block_length=s.block_length,
                                steps=s.steps, temperature=0.0, seed=0)
    warm = request if s.repeats > 1 else GenerationRequest(
        prompts=request.prompts, gen_length=s.block_length, block_length=s.block_length,
        steps=max(1, s.steps * s.block_length // s.gen_length), temperature=0.0, seed=0)
    with torch.inference_mode():
        decoder.generate(model, warm)
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        times, nfe = [], 0
        for _ in range(s.repeats):
            sync(s.device)
            t0 = time.perf_counter()
            out = decoder.generate(model, request)
            sync(s.device)
            times.append(time.perf_counter() - t0)
            nfe = max(r.nfe for r in out.rows)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None
    return {"batch": batch, "nfe": nfe, "seconds": seconds, "tokens_per_s": batch * s.gen_length / seconds,
            "ms_per_forward": seconds / nfe * 1e3, "tokens_per_forward": s.gen_length / nfe, "peak_memory_gib": peak}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


# -- reporting --------------------------------------------------------------------------------------

def issue_targets(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Issue 3's ratios: evotoken's slowdown over hard-mask at equal NFE, the caches' speed-ups over no
    cache, and batched over batch-1 throughput (tokens/s)."""
    speed = {(r["decoder"], r["cache"], r.get("batch", 1)): r["tokens_per_s"] for r in rows if not r.get("error")}
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
        f"Bounds use {doc['bandwidth_gbs']:g} GB/s and {doc['peak_tflops']:g} TFLOP/s (from flags, not measured"
        f"{on_cpu}).",
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
        "| decoder | cache | batch | NFE | seconds | tokens/s | ms / forward | tokens / forward | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["decoders"]:
        if r.get("error"):
            lines.append(f"| {r['decoder']} | {r['cache']} | {r.get('batch', 1)} | failed: {r['error']} | | | | | |")
            continue
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['decoder']} | {r['cache']} | {r.get('batch', 1)} | {r['nfe']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_forward']:.2f} | {r['tokens_per_forward']:.2f} | {peak} |")
    targets = issue_targets(doc["decoders"])
    if targets:
        lines += ["", "Issue 3's ratios (targets: evotoken slowdown <= 1.05, prefix >= 2.5, dual >= 4, batch 16 >= 4): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in targets.items()) + "."]
    lines += ["", "Random weights: d2f's thresholds see near-uniform confidences, so its NFE is not what a trained "
              "model needs; ms / forward is.", ""]
    return "\n".join(lines)


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
    log(f"device: {name}; bandwidth {s.bandwidth_gbs:g} GB/s, peak {s.peak_tflops:g} TFLOP/s (from flags)")
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
    latency = forward_latency(model, s, facts, iters=3 if args.quick else 10)
    for r in latency:
        log(f"  L={r['seq_len']:5d}: {r['ms']:8.2f} ms/forward (bandwidth bound {r['bandwidth_bound_ms']:.3g} ms, "
            f"compute bound {r['compute_bound_ms']:.3g} ms)")
    rows = []
    batched = [(d, c, o, s.batch) for d, c, o in RUNS if c == "none" and d != "d2f"] if s.batch > 1 else []
    for decoder, cache, options, batch in [(d, c, o, 1) for d, c, o in RUNS] + batched:
        if decoder not in wanted:
            continue
        row: dict[str, Any] = {"decoder": decoder, "cache": cache, "options": {k: v for k, v in options.items()},
                               "batch": batch}
        try:
            row.update(run_decoder(model, decoder, options, s, batch))
            log(f"  {decoder:9s} cache={cache:6s} batch {batch:2d}: NFE {row['nfe']:4d}, {row['seconds']:7.2f} s, "
                f"{row['tokens_per_s']:8.1f} tok/s, {row['ms_per_forward']:7.2f} ms/forward")
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of GPU memory"
        except Exception as exc:  # one failing decoder must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        if row.get("error"):
            log(f"  {decoder:9s} cache={cache:6s} batch {batch:2d}: FAILED ({row['error']})")
        rows.append(row)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    doc = {
        "schema": SCHEMA, "device": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "dtype": str(s.dtype).removeprefix("torch."), "bandwidth_gbs": s.bandwidth_gbs, "peak_tflops": s.peak_tflops,
        "model": facts,
        "settings": {"quick": args.quick, "prompt_length": s.prompt_length, "gen_length": s.gen_length,
                     "block_length": s.block_length, "steps": s.steps, "repeats": s.repeats, "batch": s.batch},
        "latency": latency, "decoders": rows, "targets": issue_targets(rows),
    }
    json_path, md_path = write_results(doc, args.out)
    log(f"wrote {json_path} and {md_path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
