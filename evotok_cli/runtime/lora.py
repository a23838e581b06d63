"""Merge a PEFT LoRA adapter into the loaded weights: W <- W + scaling * B @ A.

Merging once at load time makes an adapted model exactly as fast as the base model. Scaling is
lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module `rank_pattern` / `alpha_pattern` are
honoured. Target modules that match only part of the model are reported, never silently ignored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotok_cli.errors import CheckpointError
from evotok_cli.files import input_dir
from evotok_cli.runtime import checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterReport:
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    merged_modules: int
    replaced_tensors: int = 0  # modules_to_save: full tensors copied over the model's
    matched: dict[str, int] = field(default_factory=dict)  # target name -> modules merged
    unmatched_targets: list[str] = field(default_factory=list)  # targets with no module in this model
    partial: list[str] = field(default_factory=list)  # human-readable notes on partial coverage

    @property
    def matches_nothing(self) -> bool:
        """Merging would change nothing the config promises: every listed target names no module of the
        model, or no tensor of the adapter lands anywhere (the base model would run under its name)."""
        listed = _target_names(self.target_modules) if not isinstance(self.target_modules, str) else []
        all_unmatched = bool(listed) and set(listed) <= set(self.unmatched_targets)
        return all_unmatched or (self.merged_modules == 0 and self.replaced_tensors == 0)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.matched.items()))
        text = f"LoRA r={self.r} alpha={self.lora_alpha:g}{' rsLoRA' if self.use_rslora else ''}: {kinds}"
        if self.partial:
            text += "; " + "; ".join(self.partial)
        return text


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies to a module whose name ends with it (regex allowed)."""
    for key, value in (pattern or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _target_names(targets: Any) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    return list(targets or [])


def read_adapter_config(folder: Path) -> dict[str, Any]:
    cfg = checkpoint.read_json(folder / ADAPTER_CONFIG, "adapter_config.json")
    where = str(folder / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"peft_type {cfg.get('peft_type')!r} is not LoRA", where=where,
                              fix="only LoRA adapters can be merged")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise CheckpointError(f"{key}=true is not supported", where=where, fix="use a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"bias={cfg['bias']!r} is not supported", where=where, fix="train with bias='none'")
    _check_values(cfg, where)
    return cfg


def _bad(key: str, value: Any, wanted: str, where: str) -> CheckpointError:
    return CheckpointError(f"{key} must be {wanted}, got {value!r}", where=where, fix="repair adapter_config.json")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_values(cfg: dict[str, Any], where: str) -> None:
    """Types first: `float("abc")` or a string `use_rslora` would crash or merge at a wrong scale."""
    if not _positive_int(cfg.get("r")):
        raise _bad("r", cfg.get("r"), "a positive integer", where)
    if "lora_alpha" in cfg and not _positive_number(cfg["lora_alpha"]):
        raise _bad("lora_alpha", cfg["lora_alpha"], "a positive number", where)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise _bad("use_rslora", cfg["use_rslora"], "true or false", where)
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and (
            not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise _bad("target_modules", targets, "a list of module names or a regex string", where)
    for key, ok, wanted in (("rank_pattern", _positive_int, "positive integers"),
                            ("alpha_pattern", _positive_number, "positive numbers")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
            raise _bad(key, pattern, f"an object mapping module names to {wanted}", where)
        for name in pattern:
            _compile(name, key, where)
    if isinstance(targets, str) and targets != "all-linear":
        _compile(targets, "target_modules", where)


def _compile(pattern: str, key: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(f"{key} holds an invalid regular expression {pattern!r} ({exc})", where=where,
                              fix="repair adapter_config.json") from None


def resolve_adapter(model_folder: Path, adapter: str | Path) -> Path:
    """A folder path, or the name of an adapter shipped inside the model folder (`adapters/<name>`), which
    is how the bundled model offers its CTS, SFT and D2F adapters (`--adapter cts`)."""
    path = Path(adapter).expanduser()
    shipped = model_folder / "adapters" / str(adapter)
    if not path.is_dir() and shipped.is_dir():
        return shipped
    return path


def merge_adapter(net: nn.Module, folder: str | Path, family: str, *, strict: bool = True) -> AdapterReport:
    """Merge into `net` and say what was adapted. `strict` (loading for use) refuses an adapter that
    matches nothing; `evotok info` passes False to show that instead."""
    folder = input_dir(folder, what="adapter folder", error=CheckpointError,
                       fix="pass --adapter DIR with adapter_config.json and adapter_model.safetensors")
    cfg = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.bin")]
        raise CheckpointError(
            f"no {ADAPTER_WEIGHTS}" + (" (only pickle weights found; evotok never unpickles)" if pickles else ""),
            where=str(folder), fix=checkpoint.CONVERT_HINT if pickles else "save the adapter with safe_serialization")
    files = checkpoint.WeightFiles((weights_path,), None)
    for name, (_, dtype, path) in checkpoint.tensor_shapes(files).items():
        checkpoint.check_float(name, dtype, path)
    tensors = dict(checkpoint.iter_tensors(files, "cpu"))
    params = dict(net.named_parameters())
    modules = dict(net.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif name in params:  # modules_to_save: a full replacement tensor
            replaced[name] = tensor
        else:
            base = cfg.get("base_model_name_or_path") or "unknown base"
            raise CheckpointError(f"adapter tensor {key} matches no module of this {family} model",
                                  where=str(weights_path),
                                  fix=f"the adapter was made for another architecture ({base})")
    report = AdapterReport(path=str(folder), r=cfg["r"], lora_alpha=float(cfg.get("lora_alpha", cfg["r"])),
                           use_rslora=bool(cfg.get("use_rslora")), target_modules=cfg.get("target_modules"),
                           merged_modules=0)
    kinds: Counter[str] = Counter()
    for module_name, ab in sorted(pairs.items()):
        module = modules.get(module_name)
        if not isinstance(module, nn.Linear):
            base = cfg.get("base_model_name_or_path") or "unknown base"
            raise CheckpointError(f"adapter targets {module_name}, which is not a linear layer of this {family} model",
                                  where=str(weights_path),
                                  fix=f"the adapter was made for another architecture ({base})")
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{module_name} has only {sorted(ab)}", where=str(weights_path),
                                  fix="the adapter file is incomplete; save it again")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()  # (r, in), (out, r)
        w = module.weight
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{module_name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit weight {list(w.shape)}",
                where=str(weights_path), fix="the adapter was made for a model of another size")
        r = _pattern_value(cfg.get("rank_pattern"), module_name, cfg["r"])
        if a.shape[0] != r:
            raise CheckpointError(f"{module_name}: lora_A has rank {a.shape[0]}, but adapter_config.json says r={r}",
                                  where=str(weights_path),
                                  fix="the config does not belong to these weights and would merge them at the "
                                      "wrong scale: save both together again")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module_name, report.lora_alpha)
        scaling = alpha / (math.sqrt(r) if report.use_rslora else r)
        with torch.no_grad():
            delta = (b.to(w.device) @ a.to(w.device)) * scaling  # (out, in), in fp32
            w.copy_((w.float() + delta).to(w.dtype))
        kinds[module_name.rsplit(".", 1)[-1]] += 1
        report.merged_modules += 1
    with torch.no_grad():
        for name, tensor in replaced.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{name} has shape {list(tensor.shape)}, expected {list(params[name].shape)}",
                                      where=str(weights_path), fix="the adapter was made for a model of another size")
            params[name].copy_(tensor.to(params[name].dtype))
    report.replaced_tensors = len(replaced)
    report.matched = dict(kinds)
    _report_coverage(report, net, cfg)
    if strict and report.matches_nothing:
        raise CheckpointError(f"the adapter matches nothing in this {family} model ({'; '.join(report.partial)})",
                              where=str(folder / ADAPTER_CONFIG),
                              fix="it was made for another model: `evotok info MODEL --adapter DIR` shows its targets")
    return report


def _report_coverage(report: AdapterReport, net: nn.Module, cfg: dict[str, Any]) -> None:
    linear_kinds = Counter(n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear))
    targets = cfg.get("target_modules")
    # a regex or "all-linear" is judged by what merged; a list by its names
    names = sorted(report.matched) if isinstance(targets, str) else _target_names(targets)
    for target in names:
        suffix = target.rsplit(".", 1)[-1]
        if suffix not in linear_kinds:
            report.unmatched_targets.append(target)
            report.partial.append(f"target {target!r} matches no module of this model")
        elif report.matched.get(suffix, 0) < linear_kinds[suffix]:
            adapted = report.matched.get(suffix, 0)
            report.partial.append(f"{suffix}: {adapted} of {linear_kinds[suffix]} modules adapted")
    if report.merged_modules == 0 and not report.partial:
        report.partial.append("the adapter holds no LoRA weights")
