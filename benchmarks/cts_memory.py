"""CTS training memory and step time: K unrolled passes with one backward per pass (what evotok does)
against K = 1 and against keeping all K graphs for one backward (what the release does).

Each configuration runs in a fresh process so that peak memory is its own: on CUDA the allocator's peak,
on CPU the process's peak resident set above the baseline after loading the model.

    python benchmarks/cts_memory.py                 # CPU, a 12-layer x 512 model, batch 4, length 512
    python benchmarks/cts_memory.py --device cuda   # on a GPU
    python benchmarks/cts_memory.py --activation-checkpointing   # K = 1 with and without it
    python benchmarks/cts_memory.py --trajectory-steps 1,2,4,8 --model-dir evotok_cli/assets/evotok-tiny \
        --batch 16 --length 128 --steps 2      # the trajectory-length study's column, on the bundled model

Target (issue 5): peak memory of K = 4 <= 1.3x that of K = 1. Writes benchmarks/results/cts_memory-<device>.{json,md}.
With --activation-checkpointing (issue 20): the peak with `finetune --activation-checkpointing` over the
peak without, both in training mode; writes cts_memory-<device>[-full]-checkpointing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_tensor_mb(step, device) -> float:
    """Peak of live tensor memory during `step()`, above what was live before it: the CUDA allocator's
    peak on a GPU; on CPU the same quantity summed from the profiler's allocation events (the process's
    resident set also counts what the C allocator keeps after a free, see the RSS column)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure(model_dir: str, device: str, K: int, keep_graphs: bool, batch: int, length: int, steps: int,
            full: bool, checkpointing: bool | None = None) -> dict:
    """One configuration, in this process. `checkpointing` not None: in training mode (as finetune
    runs, LoRA dropout on), with activation checkpointing on or off."""
    import torch
    import torch.nn.functional as F

    from evotok_cli.runtime.model import load_model
    from evotok_cli.training import cts
    from evotok_cli.training.objectives import Batch
    from evotok_cli.training.trainer import TrainConfig

    lm = load_model(model_dir, device=device, dtype="float32", load_tokenizer=False)
    lm.net.requires_grad_(full)
    if not full:  # `evotok finetune`'s default: a LoRA adapter on q/k/v, r 128, alpha 256
        from peft import LoraConfig, get_peft_model

        d = TrainConfig.__dataclass_fields__
        get_peft_model(lm.net, LoraConfig(r=d["lora_r"].default, lora_alpha=d["lora_alpha"].default,
                                          lora_dropout=d["lora_dropout"].default,
                                          target_modules=d["lora_targets"].default_factory(), bias="none"))
    if checkpointing is not None:
        lm.net.activation_checkpointing = checkpointing
        lm.net.train()
    dev = lm.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, lm.vocab_size - 10, (batch, length), generator=g).to(dev)
    data = Batch(ids, torch.full((batch,), length // 4, dtype=torch.long, device=dev))
    settings = cts.CTSSettings(trajectory_steps=K, decode_counts=[4], block_sizes=[length], k_soft=3)

    def step() -> None:
        if keep_graphs:
            _keep_all_graphs(lm, data, settings, random.Random(0), F)
        else:
            cts.cts_step(lm.net, lm, data, settings, rng=random.Random(0))
        lm.net.zero_grad(set_to_none=True)

    rss_before = rss_peak_mb()
    t0 = time.perf_counter()
    peak = peak_tensor_mb(step, dev)  # the first step, also a warm-up
    times = [] if steps else [time.perf_counter() - t0]  # --steps 0: time the measured step (profiled)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    row = {"K": K, "trained": "all weights" if full else "LoRA q/k/v r128",
           "graphs": "all kept, one backward" if keep_graphs else "one backward per pass",
           "peak_mb": round(peak, 1), "step_s": round(min(times), 3)}
    if checkpointing is not None:
        row["checkpointing"] = checkpointing
    if dev.type == "cpu":
        row["peak_rss_mb"] = round(rss_peak_mb() - rss_before, 1)
    return row


def _keep_all_graphs(lm, data, settings, rng, F) -> None:
    """The release's way: sum the K losses, then one backward (all K graphs alive at once)."""
    import torch

    from evotok_cli.training import cts

    plan = cts.plan_batch(data, settings, lm.mask_id, rng)
    x = plan.masked_ids.clone()
    conf = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    sup = torch.zeros_like(x, dtype=torch.bool)
    for b, s in enumerate(plan.starts):
        sup[b, s:s + plan.length] = True
    total, soft = 0.0, None
    for j in range(settings.trajectory_steps):
        fed = {"input_ids": x.clone()} if soft is None else {"inputs_embeds": lm.net.embed_soft(*soft)}
        logits = lm.net(**fed)
        total = total + F.cross_entropy(logits[sup], data.ids[sup])
        with torch.no_grad():
            pred = logits.argmax(-1)
            for b in range(x.shape[0]):
                x[b, plan.decode_at[j][b]] = pred[b, plan.decode_at[j][b]]
            alphas = [rng.uniform(0.5, 0.999) for _ in range(x.shape[0])]
            ids, w = cts._soft_state(logits.detach(), x, conf, plan.starts, mask_id=lm.mask_id, k=3, alphas=alphas)
            soft = (ids, w.float())
    (total / settings.trajectory_steps).backward()


def save(out: Path, tag: str, document: dict, lines: list[str]) -> None:
    """cts_memory-TAG.json and .md in `out`, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cts_memory-{tag}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / f"cts_memory-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=1, help="timed steps after the measured one")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: LLaDA's real 126464)")
    p.add_argument("--full", action="store_true", help="train all weights (default: finetune's LoRA adapter)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="measure K = 1 in training mode without and with activation checkpointing")
    p.add_argument("--trajectory-steps", help="comma-separated K values: one row each (one backward per pass)")
    p.add_argument("--model-dir", help="measure this checkpoint instead of a random model of --layers/--hidden")
    p.add_argument("--worker", nargs=3, metavar=("K", "KEEP", "CKPT"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.worker:
        ckpt = {"-": None, "0": False, "1": True}[args.worker[2]]
        print(json.dumps(measure(args.model, args.device, int(args.worker[0]), args.worker[1] == "1", args.batch,
                                 args.length, args.steps, args.full, ckpt)))
        return
    runs = [(1, False, "0"), (1, False, "1")] if args.activation_checkpointing else \
        [(1, False, "-"), (4, False, "-"), (4, True, "-")]
    if args.trajectory_steps:
        runs = [(int(k), False, "-") for k in args.trajectory_steps.split(",")]
    from evotok_cli.runtime.init import REAL_VOCAB, create_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model_dir) if args.model_dir else create_model(
            Path(tmp) / "m", layers=args.layers, hidden=args.hidden, heads=max(1, args.hidden // 64), kv_heads=None,
            mlp=None, max_length=4096, vocab_size=args.vocab or REAL_VOCAB, real_vocab=not args.vocab, seed=0)
        for K, keep, ckpt in runs:
            cmd = [sys.executable, __file__, "--worker", str(K), str(int(keep)), ckpt, "--model", str(model),
                   "--device", args.device, "--batch", str(args.batch), "--length", str(args.length),
                   "--steps", str(args.steps)] + (["--full"] if args.full else [])
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.activation_checkpointing:
        write_checkpointing(args, rows)
        return
    if args.trajectory_steps:
        write_trajectory(args, rows)
        return
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    vocab = args.vocab or REAL_VOCAB
    rss = args.device == "cpu"
    lines = ["# CTS memory and step time", "",
             f"{'all weights' if args.full else 'LoRA (finetune defaults)'}, "
             f"{args.layers} layers x {args.hidden}, vocab {vocab}, batch {args.batch}, length {args.length}, "
             f"device {args.device}; peak tensor memory of K=4 / K=1 = {ratio:.2f} (target <= 1.3).", "",
             "Peak MB: live tensors above the weights during one step" + (
                 " (profiler allocation events); RSS MB: the process's peak resident set above the loaded "
                 "model, which also holds freed memory the C allocator has not returned" if rss else "") + ".", "",
             "| K | graphs | peak MB |" + (" RSS MB |" if rss else "") + " step s |",
             "|---|---|---|" + ("---|" if rss else "") + "---|"]
    lines += [f"| {r['K']} | {r['graphs']} | {r['peak_mb']:.0f} |" + (f" {r['peak_rss_mb']:.0f} |" if rss else "")
              + f" {r['step_s']:.2f} |" for r in rows]
    tag = ("cuda" if args.device.startswith("cuda") else "cpu") + ("-full" if args.full else "")
    meta = {"layers": args.layers, "hidden": args.hidden, "vocab": vocab, "batch": args.batch,
            "length": args.length, "trained": "all weights" if args.full else "lora", "device": args.device}
    save(args.out, tag, {"meta": meta, "rows": rows, "k4_over_k1": ratio}, lines)


def write_trajectory(args: argparse.Namespace, rows: list[dict]) -> None:
    """The trajectory-length study's cost column: peak memory and step time per K, relative to K = 1."""
    shape = f"the checkpoint {args.model_dir}" if args.model_dir else f"{args.layers} layers x {args.hidden}"
    rss = args.device == "cpu"
    base = rows[0]
    lines = ["# CTS cost per trajectory length K", "",
             f"LoRA (finetune defaults), {shape}, batch {args.batch}, length {args.length}, device {args.device}; "
             "one backward per pass, so the graphs of earlier passes are freed before the next pass runs.", "",
             "| K | peak MB | peak / K=1 |" + (" RSS MB |" if rss else "") + " step s | step / K=1 |",
             "|---|---|---|" + ("---|" if rss else "") + "---|---|"]
    lines += [f"| {r['K']} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |"
              + (f" {r['peak_rss_mb']:.0f} |" if rss else "")
              + f" {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} |" for r in rows]
    tag = ("cuda" if args.device.startswith("cuda") else "cpu") + "-trajectory"
    meta = {"model": args.model_dir, "layers": None if args.model_dir else args.layers,
            "hidden": None if args.model_dir else args.hidden, "batch": args.batch, "length": args.length,
            "device": args.device, "command": " ".join(["python", "benchmarks/cts_memory.py", *sys.argv[1:]])}
    save(args.out, tag, {"meta": meta, "rows": rows}, lines)


def write_checkpointing(args: argparse.Namespace, rows: list[dict]) -> None:
    """Issue 20's table: the peak with activation checkpointing over the peak without (target <= 0.4)."""
    from evotok_cli.runtime.init import REAL_VOCAB

    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    vocab = args.vocab or REAL_VOCAB
    rss = args.device == "cpu"
    lines = ["# CTS memory with activation checkpointing", "",
             f"{'all weights' if args.full else 'LoRA (finetune defaults)'}, training mode, K = 1, "
             f"{args.layers} layers x {args.hidden}, vocab {vocab}, batch {args.batch}, length {args.length}, "
             f"device {args.device}; peak tensor memory with / without checkpointing = {ratio:.2f} (target <= 0.4).",
             "", "Peak MB: live tensors above the weights during one step"
             + (" (profiler allocation events)" if rss else "") + ". Checkpointing removes the transformer "
             "blocks' activations; what it cannot remove is the (batch, length, vocab) logits and the loss's "
             "copies of them, computed after the last block.", "",
             "| checkpointing | peak MB |" + (" RSS MB |" if rss else "") + " step s |",
             "|---|---|" + ("---|" if rss else "") + "---|"]
    lines += [f"| {'on' if r['checkpointing'] else 'off'} | {r['peak_mb']:.0f} |"
              + (f" {r['peak_rss_mb']:.0f} |" if rss else "") + f" {r['step_s']:.2f} |" for r in rows]
    tag = ("cuda" if args.device.startswith("cuda") else "cpu") + ("-full" if args.full else "") + \
        (f"-vocab{args.vocab}" if args.vocab else "") + "-checkpointing"
    meta = {"layers": args.layers, "hidden": args.hidden, "vocab": vocab, "batch": args.batch,
            "length": args.length, "trained": "all weights" if args.full else "lora", "device": args.device, "K": 1}
    save(args.out, tag, {"meta": meta, "rows": rows, "with_over_without": ratio}, lines)


if __name__ == "__main__":
    main()
