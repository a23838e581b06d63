"""Model families, detected from `architectures` / `model_type` in config.json.

Adding a family is one module (defining `Config` with `from_hf`, `Model`, `EOT_TOKENS`) plus one line
in `FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from evotok_cli.errors import CheckpointError


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
    model_type = raw.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types or any(a in family.architectures for a in archs):
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES)
    found = f"architectures={archs!r}, model_type={model_type!r}"
    raise CheckpointError(f"unknown model family: {found}", where=where,
                          fix=f"evotok supports {supported}")
