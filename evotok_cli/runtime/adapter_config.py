"""A LoRA adapter's adapter_config.json, read as untrusted input: what it must declare (LoRA, no DoRA, no
bias), the types of every value that sets a scale or a target (a string `use_rslora` or a bad regex would
merge at a wrong scale or crash), and PEFT's rule for which pattern key applies to a module."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import CheckpointError
from evotok_cli.runtime import checkpoint

ADAPTER_CONFIG = "adapter_config.json"


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies to a module whose name ends with it (regex allowed)."""
    for key, value in (pattern or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def target_names(targets: Any) -> list[str]:
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
    saved = cfg.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved)):
        raise _bad("modules_to_save", saved, "a list of module names or null", where)
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
