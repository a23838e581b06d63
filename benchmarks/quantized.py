"""--quantize none|int8|int4: weight memory per mode, the share of tokens equal to the unquantized model's
at temperature 0, and decoding speed per mode (the CPU unless --device says otherwise); and, with
--table-8b, LLaDA-8B's memory table computed from its shapes alone (docs/models.md, "Smaller cards").

The prompts are the bundled tasks' test problems (sudoku4, arith-small, countdown3: --per-task of each,
18 by default, 54 in all), rendered and decoded as `evotok bench` does (their gen 48 / block 16 / steps 48,
greedy). A checkpoint without a tokenizer (`evotok init-model --real-vocab`) gets random prompt ids of the
same count instead: its tokens-equal share then measures fidelity on a random model (peaked ties break
more easily than a trained model's). Writes benchmarks/results/quantized-<device>[-<tag>].json and .md.

    python benchmarks/quantized.py                                   # the bundled model, every decoder
    python benchmarks/quantized.py --model /tmp/real-vocab --tag real-vocab
    python benchmarks/quantized.py --per-task 2 --decoders hard-mask --tag smoke   # a quick check
    python benchmarks/quantized.py --table-8b                        # the 8B table only (no model loaded)

Targets (issue 27): int8 at most 0.55x and int4 at most 0.35x of bf16's linear-layer bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evotok_cli.runtime.quantize import MODES, human_bytes, linear_bytes, planned_bytes  # noqa: E402

BUNDLED_TASKS = ("sudoku4", "arith-small", "countdown3")
DECODERS = ("hard-mask", "evotoken", "d2f")

# LLaDA-8B-Instruct's config.json, the fields that decide its tensor shapes.
LLADA_8B = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "embedding_size": 126464, "weight_tying": False}


# -- the 8B table, from shapes alone -------------------------------------------------------------------

def llada_8b_tensors() -> tuple[dict[str, tuple[tuple[int, ...], str]], set[str]]:
    """LLaDA-8B's tensors (name -> (shape, "BF16")) and its block linears, by the real model class built on
    the meta device from the official config's shape fields (nothing allocated)."""
    from evotok_cli.runtime.architectures.llada import LLaDAConfig, LLaDAModelLM
    from evotok_cli.runtime.quantize import quantized_names

    cfg = LLaDAConfig(d_model=LLADA_8B["d_model"], n_heads=LLADA_8B["n_heads"], n_kv_heads=LLADA_8B["n_kv_heads"],
                      n_layers=LLADA_8B["n_layers"], mlp_hidden_size=LLADA_8B["mlp_hidden_size"],
                      vocab_size=LLADA_8B["vocab_size"], embedding_size=LLADA_8B["embedding_size"],
                      weight_tying=LLADA_8B["weight_tying"], max_sequence_length=4096, mask_token_id=126336,
                      eos_token_id=126081)
    with torch.device("meta"):
        net = LLaDAModelLM(cfg)
    tensors = {n: (tuple(p.shape), "BF16") for n, p in net.named_parameters()}
    return tensors, set(quantized_names(net))


def runtime_bytes(batch: int, prompt: int, gen: int) -> dict[str, int]:
    """Beyond the weights, for one forward at `batch` rows of prompt + gen positions, bf16 (an estimate):
    - kv: the KV cache of a caching decoder (d2f, the prefix caches): K and V per layer and position;
    - activations: the residual stream and its norm (2 x d), q/k/v/attention output (4 x d), the MLP's
      gate, up and product (3 x mlp) of one block at a time, the attention scores of one layer (heads x
      L x L; SDPA's math path, what the CPU runs), and the logits over the generated positions (bf16,
      plus an fp32 copy for the decoder's softmax)."""
    d, layers, heads = LLADA_8B["d_model"], LLADA_8B["n_layers"], LLADA_8B["n_heads"]
    head_dim, kv_heads = d // heads, LLADA_8B["n_kv_heads"]
    length = prompt + gen
    kv = 2 * layers * batch * kv_heads * length * head_dim * 2
    block = batch * length * (6 * d + 3 * LLADA_8B["mlp_hidden_size"]) * 2
    scores = batch * heads * length * length * 2
    logits = batch * gen * LLADA_8B["vocab_size"] * (2 + 4)
    return {"kv": kv, "activations": block + scores + logits}


def table_8b(prompt: int = 128, gen: int = 256, batches: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:
    tensors, linears = llada_8b_tensors()
    weights = planned_bytes(tensors, linears)
    linear = {m: int(sum(linear_bytes(tensors[n + ".weight"][0], m, 2) for n in linears)) for m in MODES}
    rows = []
    for mode in MODES:
        row = {"mode": mode, "weights": weights[mode], "linear": linear[mode],
               "linear_vs_bf16": linear[mode] / linear["none"]}
        for b in batches:
            extra = runtime_bytes(b, prompt, gen)
            row[f"batch{b}"] = {"kv": extra["kv"], "activations": extra["activations"],
                                "total_no_cache": weights[mode] + extra["activations"],
                                "total_with_cache": weights[mode] + extra["activations"] + extra["kv"]}
        rows.append(row)
    return {"model": "LLaDA-8B (shapes of its config.json, bf16)", "prompt": prompt, "gen": gen,
            "batches": list(batches), "parameters": sum(_numel(s) for s, _ in tensors.values()),
            "linear_parameters": sum(_numel(tensors[n + ".weight"][0]) for n in linears), "rows": rows}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def table_8b_markdown(t: dict[str, Any]) -> str:
    head = "| --quantize | weights | block linears (x bf16) | " + " | ".join(
        f"batch {b}: + activations (+ KV cache)" for b in t["batches"]) + " |"
    lines = [f"{t['model']}: {t['parameters'] / 1e9:.2f} B parameters, {t['linear_parameters'] / 1e9:.2f} B of them "
             f"in the block linears; prompt {t['prompt']} + gen {t['gen']} positions.", "", head,
             "|" + "---|" * (3 + len(t["batches"]))]
    for r in t["rows"]:
        cells = [r["mode"], human_bytes(r["weights"]), f"{human_bytes(r['linear'])} ({r['linear_vs_bf16']:.2f}x)"]
        for b in t["batches"]:
            c = r[f"batch{b}"]
            cells.append(f"{human_bytes(c['total_no_cache'])} ({human_bytes(c['total_with_cache'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- measured on a real checkpoint ----------------------------------------------------------------------

def bundled_prompts(lm: Any, per_task: int) -> list[tuple[str, Any]]:
    """(task, Prompt) for the first `per_task` test problems of each bundled task, as bench renders them."""
    from evotok_cli.bench.runner import render
    from evotok_cli.bench.tasks import registry

    out = []
    for name in BUNDLED_TASKS:
        task = registry.get(name)
        docs = task.load(None, per_task).docs
        out += [(name, p) for p in render(task, docs, lm).values()]
    return out


def random_prompts(lm: Any, count: int, length: int = 40, seed: int = 0) -> list[tuple[str, Any]]:
    from evotok_cli.runtime.prompts import Prompt

    g = torch.Generator().manual_seed(seed)
    special = set(lm.stop_ids) | {lm.mask_id}
    out = []
    for _ in range(count):
        ids = [t if t not in special else 3 for t in torch.randint(3, lm.vocab_size, (length,), generator=g).tolist()]
        out.append(("random", Prompt(None, ids=ids)))
    return out


def decode(lm: Any, decoder_name: str, prompts: list[Any], args: argparse.Namespace) -> tuple[float, list]:
    from evotok_cli.jobs.generation import generate, make_decoder

    decoder = make_decoder(decoder_name, {})
    results, wall = generate(lm, decoder_name, decoder, prompts, gen_length=args.gen_length,
                             block_length=args.block_length, steps=args.steps, temperature=0.0, seed=0,
                             batch_size=args.batch_size)
    return wall, [r["token_ids"] for r in results]


def linear_bytes_by_mode(model: str) -> dict[str, int]:
    """The checkpoint's block linears per mode, "none" at bf16 (the issue's targets compare with bf16), from
    its headers alone."""
    from evotok_cli.runtime import checkpoint
    from evotok_cli.runtime.model import build_model, read_family_config
    from evotok_cli.runtime.quantize import quantized_names

    folder = checkpoint.model_dir(model)
    family, config = read_family_config(folder)
    shapes = checkpoint.tensor_shapes(checkpoint.find_weights(folder))
    names = quantized_names(build_model(family, config, device=torch.device("cpu"), dtype=torch.float32))
    return {m: int(sum(linear_bytes(shapes[n + ".weight"][0], m, 2) for n in names)) for m in MODES}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from evotok_cli.runtime.model import load_model
    from evotok_cli.runtime.quantize import stored_bytes

    rows, reference, prompts = [], {}, None
    linear = linear_bytes_by_mode(args.model)
    for mode in args.modes:
        started = time.perf_counter()
        lm = load_model(args.model, device=args.device, dtype=args.dtype, quantize=mode)
        load_s = time.perf_counter() - started
        if prompts is None:
            prompts = (bundled_prompts(lm, args.per_task) if lm.tokenizer is not None
                       else random_prompts(lm, args.per_task * len(BUNDLED_TASKS)))
        row = {"mode": mode, "weight_bytes": stored_bytes(lm.net), "linear_bytes": linear[mode],
               "linear_vs_bf16": linear[mode] / linear["none"], "load_s": load_s, "decoders": {}}
        for name in args.decoders:
            wall, tokens = decode(lm, name, [p for _, p in prompts], args)
            total = sum(len(t) for t in tokens)
            entry = {"wall_s": wall, "tokens_per_s": total / max(wall, 1e-9)}
            if mode == args.modes[0]:
                reference[name] = tokens
            else:
                equal = sum(a == b for ref, got in zip(reference[name], tokens) for a, b in zip(ref, got))
                entry["tokens_equal"] = equal / max(1, sum(len(r) for r in reference[name]))
                entry["rows_equal"] = sum(ref == got for ref, got in zip(reference[name], tokens)) / len(tokens)
            row["decoders"][name] = entry
            print(json.dumps({"mode": mode, "decoder": name, **entry}), flush=True)
        rows.append(row)
        del lm
    base = rows[0]["weight_bytes"]
    for r in rows:
        r["weight_vs_first"] = r["weight_bytes"] / base
    return {"model": str(args.model), "device": args.device, "dtype": args.dtype, "prompts": len(prompts or []),
            "prompt_source": prompts[0][0] if prompts else None, "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.steps, "batch_size": args.batch_size, "rows": rows}


def measured_markdown(m: dict[str, Any]) -> str:
    lines = [f"{m['model']} on {m['device']} ({m['dtype']}), {m['prompts']} prompts, gen {m['gen_length']} / "
             f"block {m['block_length']} / steps {m['steps']}, batch {m['batch_size']}, temperature 0.", "",
             "| --quantize | weights | x first | block linears (x bf16) | decoder | tokens/s "
             "| tokens equal to first mode | rows equal |", "|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        for name, e in r["decoders"].items():
            eq = f"{e['tokens_equal']:.1%}" if "tokens_equal" in e else "(reference)"
            rows_eq = f"{e['rows_equal']:.1%}" if "rows_equal" in e else ""
            lines.append(f"| {r['mode']} | {human_bytes(r['weight_bytes'])} | {r['weight_vs_first']:.2f} | "
                         f"{human_bytes(r['linear_bytes'])} ({r['linear_vs_bf16']:.2f}x) | {name} | "
                         f"{e['tokens_per_s']:.1f} | {eq} | {rows_eq} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table-8b", action="store_true", help="print and write LLaDA-8B's memory table only")
    p.add_argument("--model", default=str(ROOT / "evotok_cli" / "assets" / "evotok-tiny"))
    p.add_argument("--modes", default="none,int8,int4", help="the first is the reference for tokens equal")
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--per-task", type=int, default=18, help="problems of each bundled task (3 tasks)")
    p.add_argument("--gen-length", type=int, default=48)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-length", type=int, default=128, help="--table-8b: prompt positions")
    p.add_argument("--tag", default="", help="appended to the results' file names")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.decoders = [d for d in args.decoders.split(",") if d]
    command = "python benchmarks/quantized.py " + shlex.join(sys.argv[1:])
    suffix = f"-{args.tag}" if args.tag else ""
    if args.table_8b:
        t = table_8b(prompt=args.prompt_length)
        text = table_8b_markdown(t)
        print(text)
        stem = f"quantized-8b-table{suffix}"
        doc = {"schema": "evotok.quantized_8b/1", "command": command, **t}
    else:
        m = measure(args)
        text = measured_markdown(m)
        print(text)
        stem = f"quantized-{args.device}{suffix}"
        doc = {"schema": "evotok.quantized/1", "command": command,
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), **m}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(f"`{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
