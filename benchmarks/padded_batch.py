"""Mixed-length batches: tokens/s of one masked attention call per layer vs one call per row, and of bench's
grouping of items by prompt length.

A batch of prompts whose lengths spread over [--min-prompt, --max-prompt] is decoded through the step
engine (as `evotok generate` does: rows share one left-padded forward per step) twice per repeat, once
per padded-attention mode (the model's `padded_mode`, `runtime/attention.py`), interleaved so that both
modes see the same machine load; the report gives the best tokens/s of each, their ratio, and whether
the two modes decoded the same tokens. `--groups N` also decodes N batches' worth of prompts in a
shuffled order and in prompt-length order (what `evotok bench` now does), in the default mode ("auto":
per-row on CPU, masked on a GPU). Writes benchmarks/results/padded_batch-<device>[-<tag>].json and .md.

    python benchmarks/padded_batch.py                      # the bundled model, batch 8, prompts 20..200
    python benchmarks/padded_batch.py --shape 8,512,8,2    # also a random LLaDA-layout model (layers,hidden,heads,kv)
    python benchmarks/padded_batch.py --device cuda

Target (issue 20): >= 2x today's tokens/s at batch 8, mixed lengths (today: the per-row mode, doc order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evotok_cli.jobs.generation import generate, make_decoder  # noqa: E402
from evotok_cli.runtime.model import load_model  # noqa: E402
from evotok_cli.runtime.prompts import Prompt  # noqa: E402

MODES = ("rowwise", "masked")


def make_prompts(lm, count: int, lo: int, hi: int, seed: int) -> list[Prompt]:
    """Random ids (no special tokens) with lengths evenly spread over [lo, hi], in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    special = set(lm.stop_ids) | {lm.mask_id}
    lengths = [round(lo + (hi - lo) * i / max(1, count - 1)) for i in range(count)]
    random.Random(seed).shuffle(lengths)
    prompts = []
    for n in lengths:
        ids = torch.randint(3, lm.vocab_size, (n,), generator=g).tolist()
        prompts.append(Prompt(None, ids=[t if t not in special else 3 for t in ids]))
    return prompts


def decode(lm, decoder, prompts: list[Prompt], args, batch: int) -> tuple[float, list[list[int]]]:
    results, wall = generate(lm, args.decoder, decoder, prompts, gen_length=args.gen_length,
                             block_length=args.block_length, steps=args.steps, temperature=0.0, seed=0,
                             batch_size=batch)
    return wall, [r["token_ids"] for r in results]


def measure(lm, label: str, args) -> dict:
    decoder = make_decoder(args.decoder, {})
    prompts = make_prompts(lm, args.batch, args.min_prompt, args.max_prompt, args.seed)
    decode(lm, decoder, prompts[:2], args, 2)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            moded = dataclasses.replace(lm, padded_mode=mode)  # the same weights, attending padded rows by `mode`
            wall, tokens[mode] = decode(moded, decoder, prompts, args, args.batch)
            times[mode].append(wall)
    generated = args.batch * args.gen_length
    row = {"model": label, "batch": args.batch, "prompt_lengths": sorted(len(p.ids) for p in prompts),
           "decoder": args.decoder, "same_tokens": tokens["rowwise"] == tokens["masked"]}
    for mode in MODES:
        row[f"{mode}_seconds"] = [round(t, 3) for t in times[mode]]
        row[f"{mode}_tokens_per_s"] = round(generated / min(times[mode]), 2)
    row["ratio"] = round(row["masked_tokens_per_s"] / row["rowwise_tokens_per_s"], 3)
    if args.groups > 1:
        many = make_prompts(lm, args.batch * args.groups, args.min_prompt, args.max_prompt, args.seed + 1)
        by_length = sorted(many, key=lambda p: len(p.ids))
        walls: dict[str, list[float]] = {"shuffled": [], "grouped": []}
        for _ in range(args.repeats):
            for name, order in (("shuffled", many), ("grouped", by_length)):
                walls[name].append(sum(decode(lm, decoder, order[i:i + args.batch], args, args.batch)[0]
                                       for i in range(0, len(order), args.batch)))
        generated = len(many) * args.gen_length
        for name, ts in walls.items():
            row[f"{name}_tokens_per_s"] = round(generated / min(ts), 2)
        row["grouping_ratio"] = round(row["grouped_tokens_per_s"] / row["shuffled_tokens_per_s"], 3)
    return row


def random_model(shape: str, folder: Path, device: str, max_length: int):
    from evotok_cli.runtime.init import create_model

    layers, hidden, heads, kv = (int(x) for x in shape.split(","))
    path = create_model(folder, layers=layers, hidden=hidden, heads=heads, kv_heads=kv, mlp=None,
                        max_length=max_length, vocab_size=512, seed=0)
    return load_model(path, device=device), f"random LLaDA layout {shape} (L,d,H,Hkv)"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Mixed-length batches ({meta['device']}, torch {meta['torch']}, {meta['threads']} threads)", "",
             f"`{meta['command']}`", "",
             f"gen {meta['gen_length']} / block {meta['block_length']} / steps {meta['steps']}, prompts "
             f"{meta['min_prompt']}..{meta['max_prompt']} tokens, best of {meta['repeats']} (modes interleaved).", "",
             "| model | batch | per-row tok/s | masked tok/s | masked / per-row | same tokens | grouped / shuffled |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        group = f"{r['grouping_ratio']:.2f}x" if "grouping_ratio" in r else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['rowwise_tokens_per_s']:.1f} | "
                     f"{r['masked_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['same_tokens']} | {group} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the bundled model)")
    p.add_argument("--shape", default=None, help="also a random LLaDA-layout model: layers,hidden,heads,kv_heads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", default="hard-mask")
    sizes = {"--batch": 8, "--min-prompt": 20, "--max-prompt": 200, "--gen-length": 32, "--block-length": 32,
             "--steps": 16, "--repeats": 3}
    for flag, default in sizes.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--groups", type=int, default=4, help="batches of prompts for the grouping measurement (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="appended to the results' file names")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    from evotok_cli.assets import default_model_path

    folder = args.model or default_model_path()
    lm = load_model(folder, device=args.device)
    rows = [measure(lm, folder.name, args)]
    print(json.dumps(rows[-1]), flush=True)
    if args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            big, label = random_model(args.shape, Path(tmp) / "m", args.device,
                                      args.max_prompt + args.gen_length + 8)
            rows.append(measure(big, label, args))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else platform.processor() or "cpu"
    meta = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "device": device,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.steps, "min_prompt": args.min_prompt,
            "max_prompt": args.max_prompt, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"padded_batch-{'cuda' if lm.device.type == 'cuda' else 'cpu'}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
