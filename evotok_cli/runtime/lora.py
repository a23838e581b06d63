"""Apply a PEFT LoRA adapter to the loaded weights: merged (W <- W + scaling * B @ A) or beside them.

Merging once at load time makes an adapted model exactly as fast as the base model. But W sits on the
grid of its dtype, so a delta entry smaller than half a grid step of its weight is rounded away: in bf16
(8 significant bits) a delta of 0.1% of W is lost almost entirely, and a merged adapter then scores lower
on a GPU than on the fp32 CPU path. `mode="unmerged"` keeps the adapter beside the layer instead
(`LoRALinear`: y = W x + s B A x, summed in fp32 and rounded once); `"auto"` merges unless that would
lose most of the delta. `DeltaStats` measures what a merge keeps (both in `lora_precision.py`).

Scaling is lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module `rank_pattern` /
`alpha_pattern` are honoured. Target modules that match only part of the model are reported, never
silently ignored.

An adapter folder is untrusted: its tensors must be what adapter_config.json declares, LoRA pairs on the
`target_modules` (PEFT's rule: a name, or a suffix after a dot; a string is a regex over the whole module
name) and full replacement tensors of the `modules_to_save` only. A file that carries anything else (a full
embedding, say, that would silently replace the base model's) is refused by `--adapter` and shown by
`evotok info --adapter`, which lists every class of tensor an adapter carries.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotok_cli.base.errors import CheckpointError, ConfigError
from evotok_cli.base.files import input_dir
from evotok_cli.runtime import checkpoint
from evotok_cli.runtime.adapter_config import ADAPTER_CONFIG, pattern_value, read_adapter_config, target_names
from evotok_cli.runtime.lora_precision import (  # noqa: F401 (LoRALinear, delta_summary: re-exported)
    DeltaStats,
    LoRALinear,
    LoRAPair,
    delta_stats,
    delta_summary,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_MODES = ("auto", "merged", "unmerged")
LOW_PRECISION = (torch.bfloat16, torch.float16)
MOSTLY_LOST = 0.5  # `auto` keeps an adapter unmerged when a merge would round away more of its entries


@dataclass
class AdapterReport:
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    merged_modules: int
    replaced_tensors: int = 0  # modules_to_save: full tensors copied over the model's
    matched: dict[str, int] = field(default_factory=dict)  # target name -> modules adapted
    unmatched_targets: list[str] = field(default_factory=list)  # targets with no module in this model
    partial: list[str] = field(default_factory=list)  # human-readable notes on partial coverage
    mode: str | None = None  # how it was applied: merged, or unmerged (beside each layer); None: not applied
    delta: DeltaStats | None = None  # None where no weights were read (on the meta device)
    tensors: list[dict[str, Any]] = field(default_factory=list)  # every class of tensor the file carries
    undeclared: list[str] = field(default_factory=list)  # tensors adapter_config.json does not declare
    unknown: list[str] = field(default_factory=list)  # tensors that name no module of this model

    @property
    def matches_nothing(self) -> bool:
        """Merging would change nothing the config promises: every listed target names no module of the
        model, or no tensor of the adapter lands anywhere (the base model would run under its name)."""
        listed = target_names(self.target_modules) if not isinstance(self.target_modules, str) else []
        all_unmatched = bool(listed) and set(listed) <= set(self.unmatched_targets)
        return all_unmatched or (self.merged_modules == 0 and self.replaced_tensors == 0)


def adapter_summary(facts: dict[str, Any]) -> str:
    """An adapter in one line, for `evotok info`: from its facts there (`DiffusionModel.info()["adapter"]`)."""
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(facts["matched"].items()))
    text = (("MATCHES NOTHING in this model (--adapter refuses it): " if facts["matches_nothing"] else "")
            + f"r={facts['r']} alpha={facts['lora_alpha']:g}{' rsLoRA' if facts['rslora'] else ''}, "
            + f"{facts['merged_modules']} modules: {kinds}")
    for note in facts["notes"]:
        text += "; " + note
    if facts.get("tensors"):
        text += "; tensors: " + ", ".join(tensor_class(t) for t in facts["tensors"])
    text += "; " + delta_summary(facts["delta"]) if facts.get("delta") else ""
    if facts.get("quantized_base"):
        text += f"; with --quantize int8/int4: applied {facts['quantized_base']} beside the quantized layers"
    return text


def tensor_class(row: dict[str, Any]) -> str:
    """One class of an adapter's tensors in words; what `--adapter` refuses is in capitals."""
    if row["kind"] == "lora":
        text = f"LoRA A/B on {row['module']} x{row['count']}"
        return text if row["declared"] else f"UNDECLARED {text} (not in target_modules)"
    if row["kind"] == "full":
        text = f"full tensor {row['name']}"
        return f"{text} (modules_to_save)" if row["declared"] else f"UNDECLARED {text} (not in modules_to_save)"
    return f"UNKNOWN tensor {row['name']} (no module of this model)"


def check_lora_mode(mode: str) -> str:
    if mode not in LORA_MODES:
        raise ConfigError(f"unknown LoRA mode {mode!r}", where="--lora-mode",
                          fix="use merged (fastest), unmerged (keeps small deltas in bf16) or auto")
    return mode


def resolve_adapter(model_folder: Path, adapter: str | Path) -> Path:
    """A folder path, or the name of an adapter shipped inside the model folder (`adapters/<name>`), which
    is how the bundled model offers its CTS, SFT and D2F adapters (`--adapter cts`). Only a plain name is
    looked up there, so `--adapter ../../x` cannot reach out of the model folder through that lookup."""
    path = Path(adapter).expanduser()
    name = str(adapter)
    plain = bool(name) and name not in (".", "..") and len(Path(name).parts) == 1 and "\\" not in name
    shipped = model_folder / "adapters" / name
    if plain and not path.is_dir() and shipped.is_dir():
        return shipped
    from evotok_cli.runtime import hub

    if hub.is_hub_id(name):  # org/name: an adapter in the Hugging Face cache (never downloaded here)
        return hub.resolve(name, what="adapter", where="--adapter")
    return path


def merge_adapter(net: nn.Module, folder: str | Path, family: str, *, strict: bool = True,
                  mode: str = "merged", weight_of: Callable[[LoRAPair], torch.Tensor] | None = None) -> AdapterReport:
    """Apply the adapter in `folder` to `net` (merged, unmerged, or `auto`: see the module docstring) and
    say what was adapted. `strict` (loading for use) refuses an adapter that matches nothing; `evotok
    info` passes False to show that instead. On the meta device nothing is applied: coverage only, and
    the deltas are sized against `weight_of(pair)` (the real weight, read from the files) if given."""
    if mode not in LORA_MODES:
        raise ValueError(f"LoRA mode {mode!r}: one of {', '.join(LORA_MODES)}")
    folder = input_dir(folder, what="adapter folder", error=CheckpointError,
                       fix="pass --adapter DIR with adapter_config.json and adapter_model.safetensors")
    cfg = read_adapter_config(folder)
    pairs, replaced, report = read_adapter(net, folder, cfg, family, strict=strict)
    _report_coverage(report, net, cfg)
    if strict:
        _refuse(report, folder, family)
    if any(p.module.weight.is_meta for p in pairs):
        if weight_of is not None and pairs:
            report.delta = delta_stats(pairs, weight_of, torch.bfloat16)
        return report
    dtype = next(net.parameters()).dtype
    report.delta = delta_stats(pairs, lambda p: p.module.weight, dtype if dtype in LOW_PRECISION else torch.bfloat16)
    report.mode = choose_mode(mode, dtype, report.delta)
    if report.mode == "merged" and dtype in LOW_PRECISION and report.delta.lost > MOSTLY_LOST:
        warnings.warn(f"merging the adapter into {report.delta.dtype} weights rounds away {report.delta.lost:.0%} "
                      f"of its entries (--lora-mode unmerged or auto keeps them beside the weights)", stacklevel=2)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for p in pairs:
            apply_pair(net, p, report.mode)
        for name, tensor in replaced.items():
            params[name].copy_(tensor)
    return report


def choose_mode(mode: str, dtype: torch.dtype, stats: DeltaStats | None) -> str:
    """`auto`: unmerged only where merging would round away most of the delta (bf16/fp16 weights and
    small deltas); everywhere else merged, which is as fast as the base model."""
    if mode != "auto":
        return mode
    lossy = dtype in LOW_PRECISION and stats is not None and stats.lost > MOSTLY_LOST
    return "unmerged" if lossy else "merged"


def apply_pair(net: nn.Module, p: LoRAPair, mode: str) -> None:
    """Merge one pair into its weight, or put a `LoRALinear` in its layer's place."""
    w = p.module.weight
    if mode == "merged":
        w.copy_((w.float() + p.delta()).to(w.dtype))
        return
    wrapped = LoRALinear(p.module, p.a.to(w.device), (p.b * p.scaling).to(w.device))
    parent, _, child = p.name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, wrapped)


def _refuse(report: AdapterReport, folder: Path, family: str) -> None:
    """What `--adapter` will not load: an adapter for another model (all its targets missing here), tensors
    its config does not declare, or nothing that lands anywhere."""
    listed = target_names(report.target_modules) if not isinstance(report.target_modules, str) else []
    other_model = bool(listed) and set(listed) <= set(report.unmatched_targets)
    if report.undeclared and not other_model:
        more = f" (+{len(report.undeclared) - 1} more)" if len(report.undeclared) > 1 else ""
        raise CheckpointError(
            f"adapter tensor {report.undeclared[0]}{more} is not declared in adapter_config.json "
            "(target_modules / modules_to_save); loading it would change weights the adapter does not claim",
            where=str(folder / ADAPTER_WEIGHTS),
            fix="use the adapter as it was saved, or add the module to modules_to_save if you trust it "
                "(`evotok info MODEL --adapter DIR` lists every tensor)")
    if report.matches_nothing:
        raise CheckpointError(f"the adapter matches nothing in this {family} model ({'; '.join(report.partial)})",
                              where=str(folder / ADAPTER_CONFIG),
                              fix="it was made for another model: `evotok info MODEL --adapter DIR` shows its targets")


def declared_lora(module: str, targets: Any) -> bool:
    """PEFT's rule for target_modules: a regex string matches the whole module name ("all-linear": every
    linear layer); a list entry is the name or its last dotted part(s)."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or [])


def declared_full(param: str, modules_to_save: Any) -> bool:
    """A full tensor belongs to a module listed in modules_to_save (by name or last dotted part(s))."""
    module = param.rpartition(".")[0]
    return any(module == m or module.endswith("." + m) for m in modules_to_save or [])


def read_adapter(net: nn.Module, folder: Path, cfg: dict[str, Any], family: str,
                 strict: bool = True) -> tuple[list[LoRAPair], dict[str, torch.Tensor], AdapterReport]:
    """The adapter's tensors, checked against `net`: LoRA pairs and modules_to_save replacements, with every
    class of tensor listed in the report and what the config does not declare set aside (`_refuse` refuses
    it). `strict=False` (`evotok info`) lists a tensor that names no module instead of refusing it."""
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
    base = cfg.get("base_model_name_or_path") or "unknown base"
    report = AdapterReport(path=str(folder), r=cfg["r"], lora_alpha=float(cfg.get("lora_alpha", cfg["r"])),
                           use_rslora=bool(cfg.get("use_rslora")), target_modules=cfg.get("target_modules"),
                           merged_modules=0)
    found, replaced = _sort_tensors(net, tensors, cfg, report, weights_path, (family, base), strict)
    modules = dict(net.named_modules())
    pairs, kinds, undeclared = [], Counter(), Counter()
    for module_name, ab in sorted(found.items()):
        module = modules.get(module_name)
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"adapter targets {module_name}, which is not a linear layer of this {family} model",
                                  where=str(weights_path),
                                  fix=f"the adapter was made for another architecture ({base})")
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{module_name} has only {sorted(ab)}", where=str(weights_path),
                                  fix="the adapter file is incomplete; save it again")
        suffix = module_name.rsplit(".", 1)[-1]
        if not declared_lora(module_name, cfg.get("target_modules")):
            report.undeclared += [f"{PEFT_PREFIX}{module_name}.{k}.weight" for k in sorted(ab)]
            undeclared[suffix] += 1
            continue
        pairs.append(_pair(module_name, module, ab, cfg, report, weights_path))
        kinds[suffix] += 1
    report.merged_modules, report.matched = len(pairs), dict(kinds)
    report.tensors = ([{"kind": "lora", "module": k, "count": n, "declared": True} for k, n in sorted(kinds.items())]
                      + [{"kind": "lora", "module": k, "count": n, "declared": False}
                         for k, n in sorted(undeclared.items())]
                      + report.tensors)
    return pairs, replaced, report


def _sort_tensors(net: nn.Module, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], report: AdapterReport,
                  weights_path: Path, model: tuple[str, str],
                  strict: bool) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """LoRA halves by module, and the full tensors the config declares (modules_to_save); a full tensor it
    does not declare, and (not strict) one that names no module, are listed in the report and left out.
    `model`: (family, the base model the adapter names), for the error line."""
    params = dict(net.named_parameters())
    found: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif name in params:  # a full replacement tensor: declared only through modules_to_save
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{name} has shape {list(tensor.shape)}, expected {list(params[name].shape)}",
                                      where=str(weights_path), fix="the adapter was made for a model of another size")
            declared = declared_full(name, cfg.get("modules_to_save"))
            report.tensors.append({"kind": "full", "name": name, "declared": declared})
            if declared:
                replaced[name] = tensor.to(params[name].dtype)
            else:
                report.undeclared.append(key)
        elif strict:
            raise CheckpointError(f"adapter tensor {key} matches no module of this {model[0]} model",
                                  where=str(weights_path),
                                  fix=f"the adapter was made for another architecture ({model[1]})")
        else:
            report.unknown.append(key)
            report.tensors.append({"kind": "unknown", "name": key, "declared": False})
    report.replaced_tensors = len(replaced)
    return found, replaced


def _pair(module_name: str, module: nn.Linear, ab: dict[str, torch.Tensor], cfg: dict[str, Any],
          report: AdapterReport, weights_path: Path) -> LoRAPair:
    """One declared LoRA pair, its shapes checked against the layer and its rank against the config."""
    a, b = ab["lora_A"].float(), ab["lora_B"].float()  # (r, in), (out, r)
    w = module.weight
    if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"{module_name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit weight {list(w.shape)}",
            where=str(weights_path), fix="the adapter was made for a model of another size")
    r = pattern_value(cfg.get("rank_pattern"), module_name, cfg["r"])
    if a.shape[0] != r:
        raise CheckpointError(f"{module_name}: lora_A has rank {a.shape[0]}, but adapter_config.json says r={r}",
                              where=str(weights_path),
                              fix="the config does not belong to these weights and would merge them at the "
                                  "wrong scale: save both together again")
    alpha = pattern_value(cfg.get("alpha_pattern"), module_name, report.lora_alpha)
    return LoRAPair(module_name, module, a, b, alpha / (math.sqrt(r) if report.use_rslora else r))


def _report_coverage(report: AdapterReport, net: nn.Module, cfg: dict[str, Any]) -> None:
    linear_kinds = Counter(n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear))
    targets = cfg.get("target_modules")
    # a regex or "all-linear" is judged by what merged; a list by its names
    names = sorted(report.matched) if isinstance(targets, str) else target_names(targets)
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
