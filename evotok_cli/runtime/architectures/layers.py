"""The pieces the one model definition (`family.py`) is built from: RMSNorm, rotary position embeddings,
and the model-side half of the decoders' protocol (embed ids, embed soft mixtures, FSDP units, a KV cache).

What sits here is the same computation in every family, operation for operation. Where the official
models round differently (RoPE in bf16), both versions are here side by side, and each family's
`FamilySpec` names the one its reference uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evotok_cli.runtime.cache import KVCache


class RMSNorm(nn.Module):
    """Normalise in fp32 (bf16 variance is too coarse), scale in the weights' dtype (LLaDA and Qwen2 alike)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def select_positions(x: torch.Tensor, logits_slice: tuple[int, int] | torch.Tensor | None) -> torch.Tensor:
    """The outputs (B, L, D) the LM head runs on: fed positions [a, b) of every row, or, given a tensor of
    flat indices into the (B * L) positions (the engine's per-row gather), exactly those as (1, N, D)."""
    if logits_slice is None:
        return x
    if isinstance(logits_slice, torch.Tensor):
        return x.reshape(-1, x.shape[-1]).index_select(0, logits_slice)[None]
    return x[:, logits_slice[0]:logits_slice[1]]


# -- rotary position embeddings ------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, L, head_dim) in fp32 for integer positions (B, L)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, L, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, head_dim)
    return angles.cos(), angles.sin()


def apply_rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding (rotate halves), computed in fp32 and cast back (LLaDA)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def apply_rope_in_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding (rotate halves) in x's dtype, with fp32 cos/sin cast to it (Qwen2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -- the model side of the decoders' protocol ------------------------------------------------------------

class DiffusionLMBase(nn.Module):
    """What a family's model shares with the other: its inputs (ids, soft mixtures or embeddings), its FSDP
    units and its KV cache. The model names its token embedding and its block list by their checkpoint
    module names (`embedding_name`, `blocks_name`: `family.FamilyModel` reads them from its spec)."""

    config: Any
    embedding_name: str  # the token embedding's module name, e.g. "model.embed_tokens"
    blocks_name: str  # the block list's module name, e.g. "model.layers"
    activation_checkpointing = False  # finetune may set it: recompute block activations in the backward

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.get_submodule(self.embedding_name)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.blocks_name)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, d_model); no embedding scaling (LLaDA's `input_emb_norm` is false, Qwen2 has
        none)."""
        return self.token_embedding(ids)

    def embed_soft(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mixtures sum_j w_j E[id_j] for (B, L, K) ids and weights (a soft state's top-k candidates and,
        while it is still masked, the mask token at weight alpha: `decoding/soft.py`).

        Weights are clamped at 0 and renormalised (floor 1e-12) exactly as the EvoToken release does, then
        cast to the embedding dtype; the sum runs over the K slots in order.
        """
        w = weights.clamp(min=0)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        emb = self.token_embedding(ids)  # (B, L, K, d_model)
        return (emb * w.to(emb.dtype)[..., None]).sum(dim=-2)

    def input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                         soft_inputs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """A forward's input (B, L, d_model): soft mixtures if given, else the given embeddings, else the ids'.
        Built inside the forward, so that a sharded FSDP model (its embedding only gathered there) runs it."""
        if soft_inputs is not None:
            return self.embed_soft(*soft_inputs)
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (gathered for their own forward and backward)."""
        return list(self.blocks)

    def new_cache(self, batch: int, length: int) -> KVCache:
        p = self.token_embedding.weight
        return KVCache(self.config.n_layers, batch, self.config.n_kv_heads, length, self.config.head_dim,
                       dtype=p.dtype, device=p.device)
