"""Write a model in the Hugging Face layout (config.json + safetensors, sharded or not, + tokenizer).

Used by `finetune --full`, by the bundled-model recipe, and by the tests' tiny checkpoints, so all three
produce exactly the layout that real checkpoints have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotok_cli.base.files import atomic_write_text
from evotok_cli.runtime.checkpoint import INDEX_FILE, SINGLE_FILE, save_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_model(net: nn.Module | None, hf_config: dict[str, Any], folder: str | Path, *,
               shard_bytes: int | None = None, dtype: torch.dtype | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + weights (`net`'s, or an explicit `state`); `shard_bytes` splits them into an index
    and numbered shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = state if state is not None else net.state_dict()
    state = {n: (p.detach().to(dtype) if dtype else p.detach()) for n, p in source.items()}
    write_json(folder / "config.json", hf_config)
    for stale in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if not shard_bytes:
        save_safetensors(state, folder / SINGLE_FILE)
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, folder / fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return folder


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


@torch.no_grad()
def init_weights(net: nn.Module, *, seed: int, std: float = 0.02) -> nn.Module:
    """Fresh weights for training from scratch or for tests: normal(0, std), norms at 1, output layers
    scaled by 1/sqrt(2 * n_layers) (GPT-2's residual scaling, keeps the residual stream's size stable)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = getattr(getattr(net, "config", None), "n_layers", 1)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            residual_out = name.endswith(("attn_out.weight", "ff_out.weight")) and "blocks" in name
            scale = std / (2 * n_layers) ** 0.5 if residual_out else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net
