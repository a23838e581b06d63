"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the trainable weights, the optimiser moments, the scheduler position, every
random state (python, torch CPU/CUDA, the objective's generator) and the data position, so a resumed
run continues exactly where the interrupted one stopped. Folders are written under a temporary name and
renamed, so a crash mid-write never leaves a half checkpoint behind. A run sharded by FSDP writes each
process's own shards of the weights and moments to its own files (`model-rank00001-of-00004.safetensors`)
and reads them back the same way: no process ever holds the whole state (`write_tensors`, `shard=`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from evotok_cli.base.errors import CheckpointError, DataError
from evotok_cli.base.files import disk_error, read_text
from evotok_cli.runtime.checkpoint import save_safetensors

PREFIX = "checkpoint-"


def _rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: reading every GPU's state would open a CUDA context on each of them
        out["torch_cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        out[f"gen_{name}"] = gen.get_state()
    return out


def save_checkpoint(folder: Path, *, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], param_names: list[str], scheduler_state: dict[str, Any],
                    generators: dict[str, torch.Generator], py_random: random.Random, extra: dict[str, Any],
                    keep: int | None) -> Path:
    tmp = start_checkpoint(folder, step)
    try:
        write_tensors(tmp, model_state, optimizer_state, param_names)
        return finish_checkpoint(folder, tmp, step=step, param_groups=optimizer_state["param_groups"],
                                 scheduler_state=scheduler_state, generators=generators, py_random=py_random,
                                 extra=extra, keep=keep)
    except BaseException as exc:  # a full disk, a signal: no half checkpoint; the earlier ones stay whole
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_error(exc, tmp.parent) if isinstance(exc, OSError) else None
        if full is not None:
            raise full from None
        raise


def temporary(folder: Path, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place."""
    return folder / f".tmp-{PREFIX}{step:07d}"


def start_checkpoint(folder: Path, step: int) -> Path:
    """An empty temporary folder for the checkpoint of `step` (one process makes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary(folder, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def shard_file(kind: str, shard: tuple[int, int] | None) -> str:
    """`model.safetensors`, or with FSDP one file per process: `model-rank00001-of-00004.safetensors`."""
    if shard is None:
        return f"{kind}.safetensors"
    rank, world = shard
    return f"{kind}-rank{rank:05d}-of-{world:05d}.safetensors"


def _local(value: Any) -> torch.Tensor:
    """This process's part of a sharded (DTensor) value; a plain tensor as it is."""
    value = value.to_local() if hasattr(value, "to_local") else value
    return value if torch.is_tensor(value) else torch.tensor(value)


def write_tensors(tmp: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                  param_names: list[str], *, shard: tuple[int, int] | None = None) -> None:
    """Weights and optimiser moments: whole, or with `shard` only this process's shards (no gathering,
    so no process ever holds more than its own part)."""
    save_safetensors({n: _local(t) for n, t in model_state.items()}, tmp / shard_file("model", shard))
    opt_tensors: dict[str, torch.Tensor] = {}
    for index, name in enumerate(param_names):
        for key, value in optimizer_state["state"].get(index, {}).items():
            opt_tensors[f"{name}::{key}"] = _local(value)
    save_safetensors(opt_tensors, tmp / shard_file("optimizer", shard))


def finish_checkpoint(folder: Path, tmp: Path, *, step: int, param_groups: list[Any], scheduler_state: dict[str, Any],
                      generators: dict[str, torch.Generator], py_random: random.Random, extra: dict[str, Any],
                      keep: int | None) -> Path:
    """Random states and state.json, then the rename that makes the checkpoint exist."""
    final = folder / f"{PREFIX}{step:07d}"
    save_safetensors({k: v.clone() for k, v in _rng_tensors(generators).items()}, tmp / "rng.safetensors")
    py_state = py_random.getstate()
    meta = {"step": step, "param_groups": param_groups, "scheduler": scheduler_state,
            "python_random": [py_state[0], list(py_state[1]), py_state[2]], **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if final.exists():  # the same step saved again: the old copy goes only once the new one is in place
        old = folder / f".old-{PREFIX}{step:07d}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `target`: sharded the same way when `target` is an FSDP DTensor."""
    mesh = getattr(target, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(target.dtype), mesh, target.placements)


STATE_TYPES: dict[str, type] = {"step": int, "micro": int, "param_groups": list, "scheduler": dict,
                                 "python_random": list}


DAMAGED_FIX = "delete the damaged checkpoint folder; --resume then takes the previous one"


def _damaged(what: str, path: Path) -> CheckpointError:
    return CheckpointError(what, where=str(path), fix=DAMAGED_FIX)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked key by key: a damaged file is one line, never a traceback
    from deep inside the resume."""
    file = path / "state.json"
    try:
        meta = json.loads(read_text(file, what="state.json", fix=DAMAGED_FIX, error=CheckpointError))
    except DataError as exc:  # not UTF-8
        raise _damaged(exc.what, file) from None
    except json.JSONDecodeError as exc:
        raise _damaged(f"state.json is not valid JSON ({exc.msg} at line {exc.lineno})", file) from None
    except RecursionError:
        raise _damaged("state.json is not valid JSON (nested too deeply)", file) from None
    if not isinstance(meta, dict):
        raise _damaged("state.json is not a JSON object", file)
    for key, kind in STATE_TYPES.items():
        if key not in meta:
            raise _damaged(f"state.json lacks {key!r}", file)
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise _damaged(f"state.json: {key!r} should be {'a count' if kind is int else kind.__name__}, "
                           f"got {json.dumps(value)[:40]}", file)
    return meta


def load_checkpoint(path: Path, *, model_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    param_names: list[str], generators: dict[str, torch.Generator],
                    py_random: random.Random, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Restore a checkpoint into a run; `shard` (rank, world) when this run's parameters are sharded
    by FSDP. A checkpoint written by a sharded run is read shard by shard (each process reads its own
    file) and needs the same number of processes; a whole one is sharded as it is read."""
    from safetensors.torch import load_file

    meta = read_state(path)
    saved = _saved_shards(meta, path)
    if saved is not None and (shard is None or shard[1] != saved):
        raise CheckpointError(f"the checkpoint was saved by {saved} processes with --fsdp; this run "
                              f"{'is not sharded' if shard is None else f'has {shard[1]}'}", where=str(path),
                              fix=f"resume with torchrun --nproc_per_node {saved} ... --fsdp")
    mine = shard if saved is not None else None
    try:
        weights = load_file(str(path / shard_file("model", mine)))
        opt = load_file(str(path / shard_file("optimizer", mine)))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:
        raise _damaged(f"cannot read training checkpoint ({exc})", path) from None
    _check_shapes(weights, {n: (_local(p) if mine else p) for n, p in model_params.items()}, path)
    try:
        _restore(meta, weights, opt, rng, model_params=model_params, optimizer=optimizer,
                 param_names=param_names, generators=generators, py_random=py_random, local=mine is not None)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise _damaged(f"cannot restore the training state ({type(exc).__name__}: {exc})", path) from None
    return meta


def _saved_shards(meta: dict[str, Any], path: Path) -> int | None:
    """How many processes wrote the checkpoint's tensors (None: one whole file each)."""
    shards = meta.get("shards")
    if shards is None:
        return None
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise _damaged(f"state.json: 'shards' should be a count, got {json.dumps(shards)[:40]}", path / "state.json")
    return shards


def _check_shapes(weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor], path: Path) -> None:
    missing = set(params) - set(weights)
    if missing:
        raise CheckpointError(f"checkpoint lacks {sorted(missing)[0]}", where=str(path),
                              fix="resume with the same --lora-*/--full settings as the interrupted run")
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{name} has shape {tuple(weights[name].shape)} in the checkpoint, "
                                  f"{tuple(p.shape)} now", where=str(path),
                                  fix="resume with the same --lora-*/--full settings as the interrupted run")


def _from_local(local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This process's saved shard as a DTensor laid out like `target` (no communication)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(device=target.device, dtype=target.dtype), target.device_mesh,
                              target.placements, run_check=False, shape=target.shape, stride=target.stride())


def _restore(meta: dict[str, Any], weights: dict[str, torch.Tensor], opt: dict[str, torch.Tensor],
             rng: dict[str, torch.Tensor], *, model_params: dict[str, torch.nn.Parameter],
             optimizer: torch.optim.Optimizer, param_names: list[str], generators: dict[str, torch.Generator],
             py_random: random.Random, local: bool = False) -> None:
    place = _from_local if local else (lambda full, p: _like(full.to(p.device), p))
    with torch.no_grad():
        for name, p in model_params.items():
            p.copy_(place(weights[name], p))
    state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for index, name in enumerate(param_names):
        entry = {key.split("::", 1)[1]: value for key, value in opt.items() if key.split("::", 1)[0] == name}
        param = model_params[name]
        entry = {k: (place(v, param) if v.ndim else v) for k, v in entry.items()}
        if entry:
            state["state"][index] = entry
    optimizer.load_state_dict(state)
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"])
    elif torch.cuda.is_available():  # written by an older evotok: one state per GPU
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        gen.set_state(rng[f"gen_{name}"])
    version, internal, gauss = meta["python_random"]
    py_random.setstate((version, tuple(internal), gauss))
