"""Aggregate sample logs into the `results.json` document (schema evotok.bench/1, docs/bench.md).

Accuracy is in percent, correct / n * 100, as the protocol's get_acc.py reports it. Its standard error is
the standard error of the mean of the 0/1 outcomes, sqrt(p (1 - p) / (n - 1)) * 100 (lm-eval's acc_stderr).
Throughput follows the anchors' accounting (spec 6.5): generated tokens up to the first EOS/end-of-turn,
over the decode wall time, with NFE and tokens per NFE beside it.
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "evotok.bench/1"
BEST_NOTE = ("best value per task and decoder, chosen on the test set itself (the paper's max-over-alpha "
             "protocol); optimistic, not a held-out estimate")
TIMING_KEYS = ("wall_seconds", "tokens_per_second")  # the fields that differ between identical runs


def accuracy(outcomes: list[bool]) -> dict[str, Any]:
    n = len(outcomes)
    correct = sum(bool(o) for o in outcomes)
    p = correct / n if n else 0.0
    stderr = math.sqrt(p * (1 - p) / (n - 1)) * 100 if n > 1 else None
    return {"n": n, "correct": correct, "accuracy": p * 100 if n else None, "accuracy_stderr": stderr}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, NFE and throughput of one run's samples."""
    summary = accuracy([r["correct"] for r in records])
    nfe = sum(int(r["nfe"]) for r in records)
    tokens = sum(int(r["tokens"]) for r in records)
    seconds = sum(float(r["seconds"]) for r in records)
    summary.update({
        "mean_nfe": nfe / len(records) if records else None,
        "tokens": tokens,
        "mean_tokens": tokens / len(records) if records else None,
        "tokens_per_nfe": tokens / nfe if nfe else None,
        "wall_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    })
    extra: dict[str, list[bool]] = {}
    for r in records:
        for name, verdict in (r.get("scores") or {}).items():
            if verdict is not None:
                extra.setdefault(name, []).append(bool(verdict))
    summary["scores"] = {name: accuracy(v) for name, v in extra.items()}
    return summary


def collect(out: Path, name: str, doc_ids: list[int]) -> tuple[list[dict[str, Any]], list[str]]:
    """The samples of one run for the given items, in doc order (the first line wins for a doc_id that
    two files hold), and the names of the files read."""
    from evotok_cli.bench import samples

    wanted = set(doc_ids)
    found: dict[int, dict[str, Any]] = {}
    paths = samples.paths_of(out, name)
    for path in paths:
        for record in samples.read(path):
            doc_id = int(record["doc_id"])
            if doc_id in wanted:
                found.setdefault(doc_id, record)
    return [found[i] for i in sorted(found)], [p.name for p in paths]


def build_document(request: Any, runs: list[Any], loaded: dict[str, Any], model: Any, world: int,
                   model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results document of a finished bench run (every process's samples merged); `model_info` is the
    "model" section of a run that loaded no model (bench --endpoint: the server and its /v1/models)."""
    from evotok_cli.base.provenance import jsonable, versions
    from evotok_cli.bench.sweep import parse_sweeps
    from evotok_cli.runtime.device import describe_runtime

    rows = []
    for run in runs:
        docs = loaded[run.task.name].docs
        records, files = collect(request.out, run.name, [d.doc_id for d in docs])
        row = {"task": run.task.name, "decoder": run.decoder_name, "sweep": run.sweep or None, "label": run.label,
               "protocol": run.task.protocol,
               "settings": {**run.settings, "seed": request.seed, "batch_size": request.batch_size},
               "decoder_options": run.setup["options"], "samples": files, "expected": len(docs)}
        row.update(summarize(records))
        row["complete"] = row["n"] == len(docs)
        rows.append(row)
    objects = {run.task.name: run.task for run in runs}
    tasks = {name: {"protocol": objects[name].protocol, "source": item.source, "items": len(item.docs),
                    "available": item.total, "system_prompt": objects[name].system_prompt,
                    "prefill": objects[name].prefill, "notes": item.notes}
             for name, item in loaded.items()}
    return {
        "schema": SCHEMA,
        "created": now(),
        "model": model_info if model_info is not None else {"path": str(model.path), "adapter": request.adapter,
                  "adapter_training": adapter_training(model.path, request.adapter), "family": model.family.name,
                  "parameters": model.parameter_count(), "dtype": str(model.dtype).removeprefix("torch."),
                  "device": str(model.device), "lora_mode": model.adapter.mode if model.adapter else None,
                  "compiled": model.compiled, "padded_attention": model.padded_attention,
                  "quantize": model.quantize,
                  "runtime": describe_runtime(model.device, model.dtype)},
        "config": {"tasks": list(loaded), "decoders": list(dict.fromkeys(request.decoders)), "limit": request.limit,
                   "batch_size": request.batch_size, "seed": request.seed, "options": jsonable(request.options),
                   "sweep": dict(parse_sweeps(request.sweeps)),
                   "overrides": {k: v for k, v in request.overrides.items() if v is not None},
                   "device": request.device, "dtype": request.dtype, "compile": request.compile,
                   "lora_mode": request.lora_mode, "padded_attention": request.padded_attention,
                   "quantize": request.quantize, "world_size": world, "threads": request.threads,
                   "out": str(request.out)},
        "tasks": tasks,
        "results": rows,
        "best_over_sweep": best_over_sweep(rows),
        "versions": versions(),
        "git": git_revision(),
    }


# What distinguishes one fine-tuning run from another in a study (`bench report --x trajectory_steps`); paths,
# run bookkeeping and device settings are left out.
TRAINING_KEYS = ("objective", "full", "lora_r", "lora_alpha", "lora_targets", "max_steps", "lr", "batch_size",
                 "grad_accum", "response_length", "trajectory_steps", "decode_counts", "block_sizes",
                 "alpha_range", "k_soft", "d2f_block_size", "d2f_mask_range", "seed")


def adapter_training(model_path: Path, adapter: str | None) -> dict[str, Any] | None:
    """The training settings of the adapter a run used, from the `training_args.json` that `evotok finetune`
    writes beside it, so that a study over adapters (CTS's trajectory length) can be plotted from the
    results alone; None for no adapter or one not made by evotok (e.g. the shipped adapters)."""
    if not adapter:
        return None
    from evotok_cli.runtime.lora import resolve_adapter

    file = resolve_adapter(Path(model_path), adapter) / "training_args.json"
    try:
        args = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return {k: args[k] for k in TRAINING_KEYS if k in args} if isinstance(args, dict) else None


def best_over_sweep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and decoder with two or more swept values: the value with the highest accuracy (the first
    of the given order on ties)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("sweep"):
            groups.setdefault((row["task"], row["decoder"]), []).append(row)
    best = []
    for (task, decoder), group in groups.items():
        if len(group) < 2:
            continue
        winner = max(group, key=lambda r: -1.0 if r["accuracy"] is None else r["accuracy"])
        swept: dict[str, list[Any]] = {}
        for row in group:
            for key, value in row["sweep"].items():
                if value not in swept.setdefault(key, []):
                    swept[key].append(value)
        best.append({"task": task, "decoder": decoder, "swept": swept, "best": winner["sweep"],
                     "label": winner["label"], "accuracy": winner["accuracy"],
                     "accuracy_stderr": winner["accuracy_stderr"], "n": winner["n"],
                     "chosen_on": "test set", "note": BEST_NOTE})
    return best


def git_revision() -> dict[str, Any] | None:
    """The commit of the evotok source tree (and whether it had local changes), when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write via a temporary file and a rename (`files.atomic_write_text`), so a reader never sees half a
    results file and a full disk leaves the previous one whole."""
    from evotok_cli.base.files import atomic_write_text

    atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without what legitimately differs between two runs of the same setup (timestamps,
    timings, the world size, the output folder and sample file names): what a resumed or sharded run must reproduce."""
    drop_top = {"created", "versions", "git"}
    out = {k: v for k, v in document.items() if k not in drop_top}
    out["config"] = {k: v for k, v in document.get("config", {}).items() if k not in ("world_size", "out", "threads")}
    out["results"] = [{k: v for k, v in row.items() if k not in (*TIMING_KEYS, "samples")}
                      for row in document.get("results", [])]
    return out
