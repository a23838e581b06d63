"""CTS training memory and step time: K unrolled passes with one backward per pass (what evotok does)
against K = 1 and against keeping all K graphs for one backward (what the release does).

Each configuration runs in a fresh process so that peak memory is its own: on CUDA the allocator's peak,
on CPU the process's peak resident set above the baseline after loading the model.

    python benchmarks/cts_memory.py                 # CPU, a 12-layer x 512 model, batch 4, length 512
    python benchmarks/cts_memory.py --device cuda   # on a GPU

Target (issue 5): peak memory of K = 4 <= 1.3x that of K = 1. Writes benchmarks/results/cts_memory-<device>.{json,md}.
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


def peak_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_dir: str, device: str, K: int, keep_graphs: bool, batch: int, length: int, steps: int) -> dict:
    """One configuration, in this process."""
    import torch
    import torch.nn.functional as F

    from evotok_cli.runtime.model import load_model
    from evotok_cli.training import cts
    from evotok_cli.training.objectives import Batch

    lm = load_model(model_dir, device=device, dtype="float32", load_tokenizer=False)
    lm.net.requires_grad_(True)
    dev = lm.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, lm.vocab_size - 10, (batch, length), generator=g).to(dev)
    data = Batch(ids, torch.full((batch,), length // 4, dtype=torch.long, device=dev))
    settings = cts.CTSSettings(trajectory_steps=K, decode_counts=[4], block_sizes=[length], k_soft=3)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = peak_mb(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if keep_graphs:
            _keep_all_graphs(lm, data, settings, random.Random(0), F)
        else:
            cts.cts_step(lm.net, lm, data, settings, rng=random.Random(0))
        lm.net.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return {"K": K, "graphs": "all kept, one backward" if keep_graphs else "one backward per pass",
            "peak_mb": round(peak_mb(dev) - (0 if dev.type == "cuda" else baseline), 1),
            "step_s": round(min(times), 3)}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", nargs=2, metavar=("K", "KEEP"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.model, args.device, int(args.worker[0]), args.worker[1] == "1", args.batch,
                                 args.length, args.steps)))
        return
    from evotok_cli.runtime.init import create_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(Path(tmp) / "m", layers=args.layers, hidden=args.hidden, heads=max(1, args.hidden // 64),
                             kv_heads=None, mlp=None, max_length=4096, vocab_size=512, seed=0)
        for K, keep in ((1, False), (4, False), (4, True)):
            cmd = [sys.executable, __file__, "--worker", str(K), str(int(keep)), "--model", str(model),
                   "--device", args.device, "--batch", str(args.batch), "--length", str(args.length),
                   "--steps", str(args.steps)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    lines = ["# CTS memory and step time", "",
             f"{args.layers} layers x {args.hidden}, batch {args.batch}, length {args.length}, device {args.device}; "
             f"peak memory of K=4 / K=1 = {ratio:.2f} (target <= 1.3).", "",
             "| K | graphs | peak MB | step s |", "|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['graphs']} | {r['peak_mb']:.0f} | {r['step_s']:.2f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    (args.out / f"cts_memory-{tag}.json").write_text(json.dumps({"rows": rows, "k4_over_k1": ratio}, indent=2) + "\n")
    (args.out / f"cts_memory-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
