"""One model definition for every family: a pre-norm transformer with bidirectional attention, SwiGLU
MLPs and rotary positions, whose family differences are data (`FamilySpec`), not code.

LLaDA and Dream (Qwen2) compute the same network; what differs is written in their spec: whether q/k/v
carry a bias, how RoPE rounds in bf16, whether the logits are shifted, and the checkpoint's module names.
Modules are registered under those names (`model.transformer.blocks.0.q_proj`, `model.layers.0.self_attn.
q_proj`), so loading stays a strict name-for-name copy, and looked up by name in the forward, so that a
module swapped in later (an unmerged LoRA layer, a quantized linear) is the one that runs. Grouped-query
heads are a config value (`n_kv_heads`), not a family trait. The forward reads no module-level state of
its own: everything it needs arrives as an argument or lives on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from evotok_cli.runtime.architectures import run_blocks
from evotok_cli.runtime.architectures.layers import (
    DiffusionLMBase,
    RMSNorm,
    apply_rope_fp32,
    apply_rope_in_dtype,
    rope_cos_sin,
    select_positions,
)
from evotok_cli.runtime.attention import attend_layer, forward_keys
from evotok_cli.runtime.cache import KVCache, RowBatch

# The parts of a block, in the order they are built (the order fixes a seeded random init, and the
# checkpoints list them so): attention norm, q/k/v/out projections, MLP norm, SwiGLU gate/up/down.
BLOCK_ROLES = ("attn_norm", "q", "k", "v", "out", "ff_norm", "gate", "up", "down")


@dataclass(frozen=True, kw_only=True)
class FamilyConfig:
    """What every family's config holds, under the runtime's names. A family's config adds its own keys
    (with its defaults) and names in `aliases` which of them is the MLP width (`ffn_size`), the number of
    embedding rows (`embedding_rows`) and the tied-head flag (`tied_head`)."""

    aliases: ClassVar[dict[str, str]] = {}
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int
    eos_token_id: int
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        return getattr(self, self.aliases["ffn_size"])

    @property
    def embedding_rows(self) -> int:
        """May exceed vocab_size (LLaDA's padded rows): the logits are cut to the vocabulary."""
        return getattr(self, self.aliases["embedding_rows"])

    @property
    def tied_head(self) -> bool:
        return getattr(self, self.aliases["tied_head"])


@dataclass(frozen=True)
class FamilySpec:
    """What a family's checkpoint differs in. Module names are dotted paths: inside a block for `block`
    (one per role of BLOCK_ROLES), from the model's root for the others."""

    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2); the output projection and the MLP never do
    rope_in_fp32: bool  # rotate in fp32 and round once (LLaDA), or in the activations' dtype (Qwen2)
    shifted_logits: bool  # the prediction for position i is the output at i - 1 (Dream, from Qwen2.5)
    block: dict[str, str]  # role -> module name inside a block
    embedding: str  # the token embedding
    blocks: str  # the block list
    final_norm: str  # the norm before the LM head
    head: str  # the LM head (absent when the config ties it to the embedding)

    def __post_init__(self) -> None:
        if set(self.block) != set(BLOCK_ROLES):
            raise ValueError(f"a family spec names every block role {BLOCK_ROLES}, got {sorted(self.block)}")


def place(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register `module` at `dotted` below `root`, making plain containers on the way (`model`, `mlp`,
    ...), so that parameter names are the checkpoint's tensor names."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        root = root._modules[name]
    root.add_module(leaf, module)


class Block(nn.Module):
    """Pre-norm attention + pre-norm SwiGLU MLP, each added to the residual stream."""

    def __init__(self, spec: FamilySpec, cfg: Any, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope = apply_rope_fp32 if spec.rope_in_fp32 else apply_rope_in_dtype
        self.paths = {role: tuple(spec.block[role].split(".")) for role in BLOCK_ROLES}
        d, kv, ff = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_size
        parts = {
            "attn_norm": lambda: RMSNorm(d, cfg.rms_norm_eps),
            "q": lambda: nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=spec.qkv_bias),
            "k": lambda: nn.Linear(d, kv, bias=spec.qkv_bias),
            "v": lambda: nn.Linear(d, kv, bias=spec.qkv_bias),
            "out": lambda: nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False),
            "ff_norm": lambda: RMSNorm(d, cfg.rms_norm_eps),
            "gate": lambda: nn.Linear(d, ff, bias=False),
            "up": lambda: nn.Linear(d, ff, bias=False),
            "down": lambda: nn.Linear(ff, d, bias=False),
        }
        for role in BLOCK_ROLES:  # built one by one, in order: a seeded init draws in this order
            place(self, spec.block[role], parts[role]())

    def part(self, role: str) -> nn.Module:
        """The module playing `role`, looked up now (it may have been swapped since construction)."""
        module: nn.Module = self
        for name in self.paths[role]:
            module = module._modules[name]
        return module

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  cache: KVCache | RowBatch | None, start: int, pad_offsets: list[int] | None,
                  padded: str = "auto", keys: torch.Tensor | None = None, keep: Any = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.part("q")(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.part("k")(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.part("v")(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        # keys are cached after RoPE: positions are absolute, so a cache (or the engine's slots) is exact
        y = attend_layer(self.index, q, k, v, mask, cache, start, pad_offsets, padded, keys)  # (B, H, L, D)
        return self.part("out")(select_positions(y.transpose(1, 2).reshape(B, L, -1), keep))  # (B, L', d_model)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, pad_offsets=None, padded="auto", keys=None,
                keep=None):
        """`keep` (a `logits_slice`): the output only at those positions (the model's last block: every
        position's keys and values are still made, the output projection and the MLP only where logits
        are read). Each kept position's operations are the same ones; a matrix product over fewer rows may round
        differently (docs/models.md), which changed no token in the faithfulness tests."""
        y = self.attention(self.part("attn_norm")(x), cos, sin, mask, cache, start, pad_offsets, padded, keys, keep)
        h = select_positions(x, keep) + y
        m = self.part("ff_norm")(h)
        return h + self.part("down")(F.silu(self.part("gate")(m)) * self.part("up")(m))


class FamilyModel(DiffusionLMBase):
    """The diffusion LM behind the decoders' model protocol (see `evotok_cli.runtime.model`) for the family
    its subclass names in `spec`; embedding ids and soft mixtures, the FSDP units and the KV cache come
    from `layers.DiffusionLMBase`.

    The config is the family's `FamilyConfig`.
    """

    spec: ClassVar[FamilySpec]

    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.config: Any = cfg
        spec = self.spec
        place(self, spec.embedding, nn.Embedding(cfg.embedding_rows, cfg.d_model))
        place(self, spec.blocks, nn.ModuleList(Block(spec, cfg, i) for i in range(cfg.n_layers)))
        place(self, spec.final_norm, RMSNorm(cfg.d_model, cfg.rms_norm_eps))
        if not cfg.tied_head:
            place(self, spec.head, nn.Linear(cfg.d_model, cfg.embedding_rows, bias=False))

    @property
    def shifted_logits(self) -> bool:  # type: ignore[override]
        return self.spec.shifted_logits

    @property
    def embedding_name(self) -> str:  # type: ignore[override]
        return self.spec.embedding

    @property
    def blocks_name(self) -> str:  # type: ignore[override]
        return self.spec.blocks

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        soft_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | RowBatch | None = None,
        start: int = 0,
        logits_slice: tuple[int, int] | torch.Tensor | None = None,
        pad_offsets: list[int] | None = None,
        padded_attention: str = "auto",
    ) -> torch.Tensor:
        """Logits (B, L, V) for the fed positions, unshifted (with `shifted_logits`, row i predicts i + 1).

        attention_mask: bool (B, 1, L, Lk) where True = may attend, or None for full attention.
        position_ids: (B, L) absolute positions; default `start + arange(L)`.
        cache/start: with a cache, the fed tokens are the canvas slice [start, start + L); their K/V are
        written into the cache and attention sees every cached position up to the cache's length.
        logits_slice: (a, b) computes logits only for fed positions [a, b) (the LM head is the costliest
        layer per position at a 126k vocabulary, and decoders rarely need every position), or a tensor of
        flat indices into the (B * L) positions (see `layers.select_positions`).
        pad_offsets: left padding per row of a batch; such rows attend over their real keys only.
        padded_attention: how such a batch is attended (auto | masked | rowwise, `runtime/attention.py`):
        the loaded model's own mode, handed in by `DiffusionModel`, never a process-wide setting. The
        real-keys mask the masked path needs is built here, once per forward, for every layer.
        soft_inputs: (ids, weights) of shape (B, L, K): soft input embeddings (`embed_soft`), built here
        so that they are part of the forward (a sharded FSDP model has its embedding only inside it).
        """
        x = self.input_embeddings(input_ids, inputs_embeds, soft_inputs)  # (B, L, d_model)
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=x.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, 1, L, D)
        keys = forward_keys(pad_offsets, cache, start, L, padded_attention, x.device)
        x = run_blocks(self.blocks, x, cos, sin, attention_mask, cache, start, pad_offsets, padded_attention, keys,
                       checkpointed=self.training and self.activation_checkpointing, keep=logits_slice)
        x = self.get_submodule(self.spec.final_norm)(x)
        head = self.token_embedding if self.config.tied_head else self.get_submodule(self.spec.head)
        return F.linear(x, head.weight)[..., : self.config.vocab_size]  # (B, L', V)
