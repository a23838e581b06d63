"""The output folder of a fine-tune holds one run, never two.

A new run refuses a folder that already holds one (its adapter and loss log would be overwritten, and a
later --resume would mix the two), and --resume continues only the same run: the same data bytes,
objective, LoRA shape, base model and adapter, recorded in training_args.json and in every checkpoint
when the run starts. All of this is checked before the model loads, so a refusal costs nothing and
writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from evotok_cli.errors import CheckpointError, ConfigError, DataError
from evotok_cli.files import read_text
from evotok_cli.training import checkpointing

RUN_FILES = ("checkpoints", "training_args.json", "loss_log.jsonl", "adapter_model.safetensors",
             "adapter_config.json", "model.safetensors", "model.safetensors.index.json", "config.json")
EXPORTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
FLAGS = {"data_sha256": "DATA", "objective": "--objective", "full": "--full/--lora", "lora_r": "--lora-r",
         "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets", "model": "--model", "adapter": "--adapter"}
OTHER_OUT = "choose another --out"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def identity(cfg: Any) -> dict[str, Any]:
    """What makes two runs the same run: their checkpoints fit each other and their data order agrees.
    The LoRA shape does not matter to a full fine-tune."""
    lora = not cfg.full
    return {"data_sha256": file_sha256(cfg.data), "objective": cfg.objective, "full": cfg.full,
            "lora_r": cfg.lora_r if lora else None, "lora_alpha": float(cfg.lora_alpha) if lora else None,
            "lora_targets": sorted(cfg.lora_targets) if lora else None, "model": _resolved(cfg.model),
            "adapter": _resolved(cfg.adapter)}


def _show(key: str, value: Any) -> str:
    if key == "data_sha256" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def compare(recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """One line naming the first field that differs from the run being resumed."""
    for key, new in now.items():
        if key not in recorded or recorded[key] == new:
            continue
        old = recorded[key]
        if key == "data_sha256":
            what = f"the training data changed since the run started ({_show(key, old)} then, {_show(key, new)} now)"
        else:
            what = f"--resume: the run was trained with {FLAGS[key]} {_show(key, old)}, now {_show(key, new)}"
        raise ConfigError(what, where=FLAGS[key], fix=f"resume with the run's settings and data, or {OTHER_OUT}")


def read_args(out: Path) -> dict[str, Any]:
    """training_args.json of an earlier run ({} when there is none)."""
    path = out / "training_args.json"
    if not os.path.lexists(path):
        return {}
    fix = f"restore it, or {OTHER_OUT}"
    try:
        args = json.loads(read_text(path, what="training_args.json", fix=fix, error=CheckpointError))
    except DataError as exc:
        raise CheckpointError(exc.what, where=exc.where, fix=fix) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"training_args.json is not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})",
                              where=str(path), fix=fix) from None
    if not isinstance(args, dict):
        raise CheckpointError("training_args.json is not a JSON object", where=str(path), fix=fix)
    return args


def check_out(out: Path, run: dict[str, Any], *, resume: bool) -> None:
    """Refuse, before any work, what would overwrite a run or mix two."""
    found = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if not resume:
        if found:
            raise ConfigError(f"{out} already holds a training run ({found[0]})", where="--out",
                              fix=f"pass --resume to continue it, or {OTHER_OUT}")
        return
    if not found:
        return  # nothing to resume: the trainer starts from step 0 and says so
    ckpt_dir = out / "checkpoints"
    if os.path.lexists(ckpt_dir) and not ckpt_dir.is_dir():
        raise CheckpointError("checkpoints is not a folder", where=str(ckpt_dir), fix=OTHER_OUT)
    checkpoints = checkpointing.list_checkpoints(ckpt_dir)
    exported = [name for name in (*EXPORTS, "config.json") if os.path.lexists(out / name)]
    if not checkpoints:
        if exported:
            raise CheckpointError(f"nothing to resume: the folder holds {exported[0]} but no checkpoint",
                                  where=str(out), fix=OTHER_OUT)
        compare(_recorded_run(read_args(out)), run)
        return
    state = checkpointing.read_state(checkpoints[-1])
    args: dict[str, Any] | None = None
    if "total_steps" not in state or "run" not in state:  # written by an older evotok
        args = read_args(out)
    total = state.get("total_steps", (args or {}).get("total_steps"))
    if isinstance(total, int) and state["step"] >= total and exported:
        raise CheckpointError(f"the run already finished at step {state['step']} ({exported[0]} written)",
                              where=str(out), fix=OTHER_OUT)
    compare(_recorded_run(state if args is None else {**args, **state}), run)


def _recorded_run(record: dict[str, Any]) -> dict[str, Any]:
    run = record.get("run")
    return run if isinstance(run, dict) else {}
