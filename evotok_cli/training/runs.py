"""The output folder of a fine-tune holds one run, never two, and --resume continues that same run.

A new run refuses a folder that already holds one (its adapter and loss log would be overwritten, and a
later --resume would mix the two), and --resume continues only the same run: the same data bytes, every
setting that shapes the trajectory (seed, learning rate, batch size, accumulation, schedule, objective,
LoRA shape, ...), the same base model and adapter files (by sha256), all recorded in training_args.json
and in every checkpoint when the run starts. A resume that differs is refused with one line listing the
differences, except the settings in `SAFE_ON_RESUME` (a longer run, checkpoint cadence, the device),
whose changes are kept in the run's history. All of this is checked before the model loads, so a
refusal costs nothing and writes nothing.

Hashing: every weights file is read once when the run starts (sha256 runs at about 1 GB/s, so an 8B
model's 16 GB costs some 15 s, and warms the page cache for the load that follows). A resume re-hashes
only files whose size, mtime, ctime or inode changed since (git's rule for its index): replacing a file
changes its ctime, which no program can set back, so an untouched 16 GB base is not read twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import CheckpointError, ConfigError, DataError
from evotok_cli.base.files import read_text
from evotok_cli.training import checkpointing

RUN_FILES = ("checkpoints", "training_args.json", "loss_log.jsonl", "adapter_model.safetensors",
             "adapter_config.json", "model.safetensors", "model.safetensors.index.json", "config.json")
EXPORTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
WRITTEN = (*RUN_FILES[1:], "loss.png")  # the files a run writes into --out
FLAGS = {"data_sha256": "DATA", "full": "--full/--lora", "processes": "processes (torchrun --nproc_per_node)",
         "model_files": "base model file", "adapter_files": "adapter file"}
# What may change on --resume without making it another run: how long it runs (only longer), how often it
# saves and logs, and where it runs. A change is recorded in training_args.json's "history".
SAFE_ON_RESUME = ("max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "device", "fsdp",
                  "activation_checkpointing", "pg_timeout", "threads")
NOT_SETTINGS = ("data", "out")  # the data is recorded by its sha256, the folder is the run itself
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
OTHER_OUT = "choose another --out"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def flag_of(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def weight_files(folder: Path, cache: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """name -> {sha256, size, stat} of the safetensors and config files directly in `folder` (what the
    weights and their shapes are); a file whose stat matches `cache`'s entry keeps its recorded digest."""
    cache = cache if isinstance(cache, dict) else {}
    found: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return found  # the loader says what is wrong with the folder
    for path in sorted(folder.iterdir()):
        if not (path.suffix == ".safetensors" or path.name in ("config.json", "adapter_config.json",
                                                                  "model.safetensors.index.json")):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if not path.is_file():
            continue
        key = _stat_key(st)
        old = cache.get(path.name)
        if isinstance(old, dict) and old.get("stat") == key and isinstance(old.get("sha256"), str):
            digest = old["sha256"]
        else:
            digest = file_sha256(path)
        found[path.name] = {"sha256": digest, "size": st.st_size, "stat": key}
    return found


def _adapter_folder(cfg: Any) -> Path | None:
    if not cfg.adapter:
        return None
    from evotok_cli.runtime.lora import resolve_adapter

    return resolve_adapter(Path(cfg.model).expanduser(), cfg.adapter)


def _world() -> int | str:
    """The number of processes a launcher started (as given, when it is not a number: the launcher's
    own check names it)."""
    value = os.environ.get("WORLD_SIZE", "1") or "1"
    return int(value) if value.strip().isdigit() else value


def identity(cfg: Any, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """What makes two runs the same run: their data, every setting that shapes the trajectory (and the
    safe ones, to record their changes), the base model's and adapter's files by digest. The LoRA shape
    does not matter to a full fine-tune. `cache`: an earlier identity, whose digests are reused for files
    that did not change."""
    lora = not cfg.full
    run: dict[str, Any] = {"data_sha256": file_sha256(cfg.data)}
    for key, value in asdict(cfg).items():
        if key not in NOT_SETTINGS:
            run[key] = None if key in LORA_ONLY and not lora else value
    run.update(lora_alpha=float(cfg.lora_alpha) if lora else None,
               lora_targets=sorted(cfg.lora_targets) if lora else None, model=_resolved(cfg.model),
               adapter=_resolved(cfg.adapter), processes=_world())
    cache = cache or {}
    run["model_files"] = weight_files(Path(cfg.model).expanduser(), cache.get("model_files"))
    adapter = _adapter_folder(cfg)
    run["adapter_files"] = weight_files(adapter, cache.get("adapter_files")) if adapter else None
    return run


def _show(key: str, value: Any) -> str:
    if key == "data_sha256" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _digests(files: Any) -> dict[str, str]:
    if not isinstance(files, dict):
        return {}
    return {name: entry.get("sha256") for name, entry in files.items() if isinstance(entry, dict)}


def _file_changes(key: str, old: Any, new: Any) -> list[str]:
    """'base model file model.safetensors sha256 1a2b.., now 3c4d..' per file that differs."""
    before, after = _digests(old), _digests(new)
    out = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            was = f"sha256 {before[name][:12]}" if before.get(name) else "absent"
            now = f"sha256 {after[name][:12]}" if after.get(name) else "absent"
            out.append(f"{flag_of(key)} {name} {was}, now {now}")
    return out


def _grows(key: str, old: Any, new: Any, now: dict[str, Any]) -> bool:
    """--max-steps and --epochs may only grow (--epochs may change freely while --max-steps decides)."""
    if key == "epochs" and now.get("max_steps") is not None:
        return True
    number = (int, float)
    return isinstance(old, number) and isinstance(new, number) and new >= old


def compare(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """Refuse a resume that differs from the recorded run in anything but `SAFE_ON_RESUME` (one line
    listing every difference); return the safe changes as key -> [then, now]. A key the record lacks
    (written by an older evotok) is not compared."""
    old_data, new_data = recorded.get("data_sha256"), now.get("data_sha256")
    if old_data is not None and old_data != new_data:
        raise ConfigError(f"the training data changed since the run started ({_show('data_sha256', old_data)} "
                          f"then, {_show('data_sha256', new_data)} now)", where="DATA",
                          fix=f"resume with the run's settings and data, or {OTHER_OUT}")
    differences: list[str] = []
    safe: dict[str, list[Any]] = {}
    for key, new in now.items():
        if key == "data_sha256" or key not in recorded or recorded[key] == new:
            continue
        old = recorded[key]
        if key in ("model_files", "adapter_files"):
            differences += _file_changes(key, old, new)
        elif key in SAFE_ON_RESUME and (key not in ("max_steps", "epochs") or _grows(key, old, new, now)):
            safe[key] = [old, new]
        else:
            shrink = " (it may only grow)" if key in ("max_steps", "epochs") else ""
            differences.append(f"{flag_of(key)} {_show(key, old)}, now {_show(key, new)}{shrink}")
    if differences:
        raise ConfigError(f"--resume: the run was trained with {'; '.join(differences)}", where="--resume",
                          fix=f"resume with the run's settings and files, or {OTHER_OUT}; only --max-steps (upward), "
                              "--save-every, --keep-checkpoints, --device and --threads may change")
    return safe


def history_entry(step: int, changes: dict[str, list[Any]]) -> dict[str, Any]:
    """One line of training_args.json's "history": what a resume changed, and from which step on."""
    return {"resumed_at_step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "changed": {key: {"then": then, "now": now} for key, (then, now) in changes.items()}}


def check_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """The data and config files are not files the run writes into --out (`--out` beside the data is
    fine; `loss_log.jsonl` as the data is not)."""
    from evotok_cli.base.files import not_an_input

    for name in WRITTEN:
        not_an_input(out / name, "--out", {flag: path for flag, path in inputs.items() if path is not None})


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


def check_out(out: Path, cfg: Any, *, resume: bool) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Refuse, before any work, what would overwrite a run or mix two; the run's identity and (resuming)
    the safe changes from the recorded run."""
    found = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if not resume:
        if found:
            raise ConfigError(f"{out} already holds a training run ({found[0]})", where="--out",
                              fix=f"pass --resume to continue it, or {OTHER_OUT}")
        return identity(cfg), {}
    if not found:
        return identity(cfg), {}  # nothing to resume: the trainer starts from step 0 and says so
    ckpt_dir = out / "checkpoints"
    if os.path.lexists(ckpt_dir) and not ckpt_dir.is_dir():
        raise CheckpointError("checkpoints is not a folder", where=str(ckpt_dir), fix=OTHER_OUT)
    checkpoints = checkpointing.list_checkpoints(ckpt_dir)
    exported = [name for name in (*EXPORTS, "config.json") if os.path.lexists(out / name)]
    if not checkpoints:
        if exported:
            raise CheckpointError(f"nothing to resume: the folder holds {exported[0]} but no checkpoint",
                                  where=str(out), fix=OTHER_OUT)
        recorded = _recorded_run(read_args(out))
        run = identity(cfg, recorded)
        return run, compare(recorded, run)
    state = checkpointing.read_state(checkpoints[-1])
    args: dict[str, Any] | None = None
    if "total_steps" not in state or "run" not in state:  # written by an older evotok
        args = read_args(out)
    total = state.get("total_steps", (args or {}).get("total_steps"))
    longer = cfg.max_steps is not None and cfg.max_steps > state["step"]  # --max-steps grown past the end
    if isinstance(total, int) and state["step"] >= total and exported and not longer:
        raise CheckpointError(f"the run already finished at step {state['step']} ({exported[0]} written)",
                              where=str(out), fix=f"pass a larger --max-steps to train it further, or {OTHER_OUT}")
    recorded = _recorded_run(state if args is None else {**args, **state})
    run = identity(cfg, recorded)
    return run, compare(recorded, run)


def _recorded_run(record: dict[str, Any]) -> dict[str, Any]:
    run = record.get("run")
    return run if isinstance(run, dict) else {}
