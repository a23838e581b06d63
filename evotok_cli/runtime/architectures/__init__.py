"""Model families, detected from `architectures` / `model_type` in config.json.

Adding a family is one module (defining `Config` with `from_hf`, `Model`, `EOT_TOKENS`) plus one line
in `FAMILIES`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from evotok_cli.base.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    module: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES = (
    Family("llada", "evotok_cli.runtime.architectures.llada", ("LLaDAModelLM",), ("llada",)),
    Family("dream", "evotok_cli.runtime.architectures.dream", ("DreamModel",), ("Dream", "dream")),
)


def detect_family(raw: dict[str, Any], where: str) -> Family:
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json key architectures must be a list of names, got {archs!r}", where=where,
                              fix='write e.g. "architectures": ["LLaDAModelLM"]')
    model_type = raw.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types or any(a in family.architectures for a in archs):
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES)
    found = f"architectures={archs!r}, model_type={model_type!r}"
    raise CheckpointError(f"unknown model family: {found}", where=where,
                          fix=f"evotok supports {supported}")


# -- typed config values -------------------------------------------------------------------------
# `int("four")`, `int(None)` or `range(-1)` would surface as a traceback or as "unexpected tensor"
# far from the cause; these name the key and the value instead.

def _bad_value(key: str, value: Any, wanted: str, where: str) -> CheckpointError:
    return CheckpointError(f"config.json key {key} must be {wanted}, got {value!r}", where=where,
                           fix="correct the value in config.json or download the file again")


MAX_INT = 2**31 - 1  # beyond this no tensor dimension or token id is real, and torch overflows


def config_int(raw: dict[str, Any], key: str, where: str, *, default: int | None = None, minimum: int = 1) -> int:
    """A whole number >= `minimum` (sizes: 1, token ids: 0); `default` when the key is absent or null."""
    value = raw.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _bad_value(key, value, wanted, where)
    if value > MAX_INT:
        raise _bad_value(key, value, "below 2**31", where)
    return value


def config_float(raw: dict[str, Any], key: str, where: str, *, default: float) -> float:
    """A finite number > 0 (rope_theta, rms_norm_eps); `default` when the key is absent."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad_value(key, value, "a positive number", where)
    return float(value)


def config_bool(raw: dict[str, Any], key: str, where: str, *, default: bool) -> bool:
    """true or false: `bool("false")` is True, so strings are refused rather than read."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise _bad_value(key, value, "true or false", where)
    return value


def check_heads(d_model: int, n_heads: int, n_kv: int, names: tuple[str, str, str], where: str) -> None:
    """Heads must divide the width, KV heads the heads, and the head size must be even (RoPE rotates halves)."""
    if d_model % n_heads or n_heads % n_kv:
        raise CheckpointError(f"{names[0]} {d_model} / {names[1]} {n_heads} / {names[2]} {n_kv} do not divide",
                              where=where, fix="fix the head counts in config.json")
    if (d_model // n_heads) % 2:
        raise CheckpointError(f"head size {names[0]} / {names[1]} = {d_model // n_heads} is odd", where=where,
                              fix="rotary embeddings need an even head size; fix the head counts in config.json")


def check_token_id(key: str, value: int, vocab: int, where: str) -> None:
    if value >= vocab:
        raise CheckpointError(f"config.json key {key} = {value} is outside the vocabulary ({vocab} tokens)",
                              where=where, fix="correct the token id or vocab_size in config.json")


def token_ids(raw: dict[str, Any], defaults: dict[str, int], vocab: int, where: str) -> dict[str, int]:
    """Token ids (mask, eos, ...) by key, each `defaults[key]` when absent and inside the vocabulary."""
    ids = {key: config_int(raw, key, where, default=default, minimum=0) for key, default in defaults.items()}
    for key, value in ids.items():
        check_token_id(key, value, vocab, where)
    return ids


def check_supported(raw: dict[str, Any], required: dict[str, tuple[Any, ...]], where: str, family: str) -> None:
    """Options we implement, with the only values we accept: anything else is refused at load time rather
    than silently computing a different model."""
    for key, allowed in required.items():
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(
                f"unsupported config option {key}={raw[key]!r} (evotok implements {allowed[0]!r})",
                where=where, fix=f"this {family} variant is not supported; please open an issue with its config")


def require_keys(raw: dict[str, Any], keys: tuple[str, ...], where: str, fix: str) -> None:
    """Refuse a config that lacks any of `keys` (the sizes a forward cannot do without), naming them all."""
    missing = [k for k in keys if k not in raw]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}", where=where, fix=fix)


def run_blocks(blocks: Any, x: Any, *args: Any, checkpointed: bool = False, keep: Any = None) -> Any:
    """The transformer blocks in turn; the output at the positions `keep` (a `logits_slice`; None: all),
    which the last block alone computes (`Block.forward`): a decode step reads logits at its active block,
    not at the prompt or the blocks after it, and past the last block's keys and values nothing else needs
    them.

    `checkpointed` (set by `finetune --activation-checkpointing`, and only while training) keeps each
    block's input instead of its activations and recomputes them in the backward: the same gradients for
    about a third more compute, with activation memory of one block instead of all of them."""
    if checkpointed:
        from torch.utils.checkpoint import checkpoint
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        kwargs = {"keep": keep} if i == last and keep is not None else {}
        x = checkpoint(block, x, *args, use_reentrant=False, **kwargs) if checkpointed else block(x, *args, **kwargs)
    return x
