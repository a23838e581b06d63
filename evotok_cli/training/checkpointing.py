"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the trainable weights, the optimiser moments, the scheduler position, every
random state (python, torch CPU/CUDA, the objective's generator) and the data position, so a resumed
run continues exactly where the interrupted one stopped. Folders are written under a temporary name and
renamed, so a crash mid-write never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from evotok_cli.errors import CheckpointError
from evotok_cli.runtime.checkpoint import save_safetensors

PREFIX = "checkpoint-"


def _rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    for name, gen in generators.items():
        out[f"gen_{name}"] = gen.get_state()
    return out


def save_checkpoint(folder: Path, *, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], param_names: list[str], scheduler_state: dict[str, Any],
                    generators: dict[str, torch.Generator], py_random: random.Random, extra: dict[str, Any],
                    keep: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(model_state, tmp / "model.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    state = optimizer_state
    for index, name in enumerate(param_names):
        for key, value in state["state"].get(index, {}).items():
            opt_tensors[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    save_safetensors({k: v.clone() for k, v in _rng_tensors(generators).items()}, tmp / "rng.safetensors")
    py_state = py_random.getstate()
    meta = {"step": step, "param_groups": state["param_groups"], "scheduler": scheduler_state,
            "python_random": [py_state[0], list(py_state[1]), py_state[2]], **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
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


def load_checkpoint(path: Path, *, model_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    param_names: list[str], generators: dict[str, torch.Generator],
                    py_random: random.Random) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"cannot read training checkpoint ({exc})", where=str(path),
                              fix="delete the damaged checkpoint folder; --resume then takes the previous one",
                              ) from None
    missing = set(model_params) - set(weights)
    if missing:
        raise CheckpointError(f"checkpoint lacks {sorted(missing)[0]}", where=str(path),
                              fix="resume with the same --lora-*/--full settings as the interrupted run")
    with torch.no_grad():
        for name, p in model_params.items():
            p.copy_(_like(weights[name].to(p.device), p))
    state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for index, name in enumerate(param_names):
        entry = {key.split("::", 1)[1]: value for key, value in opt.items() if key.split("::", 1)[0] == name}
        param = model_params[name]
        entry = {k: (_like(v.to(param.device), param) if v.ndim else v) for k, v in entry.items()}
        if entry:
            state["state"][index] = entry
    optimizer.load_state_dict(state)
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        gen.set_state(rng[f"gen_{name}"])
    version, internal, gauss = meta["python_random"]
    py_random.setstate((version, tuple(internal), gauss))
    return meta
