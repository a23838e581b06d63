"""LLaDA: a Llama-shaped transformer with bidirectional attention (LLaDA-8B, LLaDA-1.5, D2F-LLaDA base,
and the bundled model).

Module names equal the checkpoint's tensor names (`model.transformer.blocks.{i}.q_proj.weight`, ...), so
loading is a strict name-for-name copy. RMSNorm and RoPE run in fp32 whatever the weights' dtype, as in
the official model file; everything else runs in the weights' dtype (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evotok_cli.errors import CheckpointError
from evotok_cli.runtime.architectures import (
    check_heads,
    check_token_id,
    config_bool,
    config_float,
    config_int,
    run_blocks,
)
from evotok_cli.runtime.architectures.layers import (
    DiffusionLMBase,
    RMSNorm,
    apply_rope_fp32,
    rope_cos_sin,
    select_positions,
)
from evotok_cli.runtime.attention import attend_layer
from evotok_cli.runtime.cache import KVCache, RowBatch

# Options we implement, with the only value we accept. Anything else is refused at load time rather
# than silently computing a different model.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "activation_type": ("silu", "swiglu"),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "block_type": ("llama",),
    "block_group_size": (1,),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "input_emb_norm": (False,),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None),
    "rope": (True,),
    "scale_logits": (False,),
    "clip_qkv": (None,),
}
# Keys that exist in real LLaDA configs but change nothing at inference (dropouts, init, bookkeeping).
_INERT_KEYS = {
    "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm_with_affine", "auto_map",
    "embedding_dropout", "flash_attention", "init_cutoff_factor", "init_device", "init_fn", "init_std",
    "mlp_ratio", "model_type", "multi_query_attention", "pad_token_id", "precision", "residual_dropout",
    "rope_full_precision", "transformers_version", "use_cache", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eot_token_id",
}
_SIZE_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "max_sequence_length")


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str) -> LLaDAConfig:
        """Validate a LLaDA `config.json` and keep what the forward pass needs."""
        for key, allowed in _REQUIRED_VALUES.items():
            if key in raw and raw[key] not in allowed:
                raise CheckpointError(
                    f"unsupported config option {key}={raw[key]!r} (evotok implements {allowed[0]!r})",
                    where=where, fix="this LLaDA variant is not supported; please open an issue with its config",
                )
        missing = [k for k in _SIZE_KEYS if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}", where=where,
                                  fix="a LLaDA config needs d_model, n_heads, n_layers, mlp_hidden_size, ...")
        size = {k: config_int(raw, k, where) for k in _SIZE_KEYS}
        n_kv = config_int(raw, "n_kv_heads", where, default=size["n_heads"])
        check_heads(size["d_model"], size["n_heads"], n_kv, ("d_model", "n_heads", "n_kv_heads"), where)
        embedding_size = config_int(raw, "embedding_size", where, default=size["vocab_size"])
        if embedding_size < size["vocab_size"]:
            raise CheckpointError(f"embedding_size {embedding_size} is smaller than vocab_size {size['vocab_size']}",
                                  where=where, fix="correct embedding_size or vocab_size in config.json")
        ids = {k: config_int(raw, k, where, default=d, minimum=0)
               for k, d in (("mask_token_id", 126336), ("eos_token_id", 126081))}
        for key, value in ids.items():
            check_token_id(key, value, size["vocab_size"], where)
        known = set(_REQUIRED_VALUES) | _INERT_KEYS | set(cls.__dataclass_fields__)
        return cls(
            **size, n_kv_heads=n_kv, embedding_size=embedding_size, **ids,
            rope_theta=config_float(raw, "rope_theta", where, default=10000.0),
            rms_norm_eps=config_float(raw, "rms_norm_eps", where, default=1e-5),
            weight_tying=config_bool(raw, "weight_tying", where, default=False),
            unknown_keys=tuple(sorted(set(raw) - known)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The full key set of a real LLaDA-8B config.json, with our sizes."""
        return {
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": self.d_model,
            "embedding_dropout": 0.0, "embedding_size": self.embedding_size, "eos_token_id": self.eos_token_id,
            "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
            "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
            "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length, "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": max(1, self.mlp_hidden_size // self.d_model), "model_type": "llada",
            "multi_query_attention": None, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "pad_token_id": self.eos_token_id, "precision": "amp_bf16",
            "residual_dropout": 0.0, "rms_norm_eps": self.rms_norm_eps, "rope": True, "rope_full_precision": True,
            "rope_theta": self.rope_theta, "scale_logits": False, "transformers_version": "4.46.3",
            "use_cache": False, "vocab_size": self.vocab_size, "weight_tying": self.weight_tying,
        }


class LLaDABlock(nn.Module):
    """Pre-norm attention + SwiGLU MLP. `ff_proj` is the gate, `up_proj` the linear branch."""

    def __init__(self, cfg: LLaDAConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  cache: KVCache | RowBatch | None, start: int, pad_offsets: list[int] | None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
        # keys are cached after RoPE: positions are absolute, so a cache (or the engine's slots) is exact
        y = attend_layer(self.index, q, k, v, mask, cache, start, pad_offsets)  # (B, H, L, D)
        return self.attn_out(y.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, pad_offsets=None):
        h = x + self.attention(self.attn_norm(x), cos, sin, mask, cache, start, pad_offsets)
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDATransformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDAInner(nn.Module):
    """Exists only so that parameter names start with `model.transformer.` like the checkpoint's."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(cfg)


class LLaDAModelLM(DiffusionLMBase):
    """The diffusion LM behind the decoders' model protocol (see `evotok_cli.runtime.model`); embedding ids
    and soft mixtures, the FSDP units and the KV cache come from `layers.DiffusionLMBase`."""

    shifted_logits = False  # LLaDA predicts position i from the output at i
    # the token embedding and the block list, by their checkpoint names (see `DiffusionLMBase`)
    embedding_name, blocks_name = "model.transformer.wte", "model.transformer.blocks"

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = LLaDAInner(cfg)

    @property
    def transformer(self) -> LLaDATransformer:
        return self.model.transformer

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
    ) -> torch.Tensor:
        """Logits (B, L, V) for the fed positions.

        attention_mask: bool (B, 1, L, Lk) where True = may attend, or None for full attention.
        position_ids: (B, L) absolute positions; default `start + arange(L)`.
        cache/start: with a cache, the fed tokens are the canvas slice [start, start + L); their K/V are
        written into the cache and attention sees every cached position up to the cache's length.
        logits_slice: (a, b) computes logits only for fed positions [a, b) (the LM head is the costliest
        layer per position at a 126k vocabulary, and decoders rarely need every position).
        pad_offsets: left padding per row of a batch; such rows attend over their real keys only.
        soft_inputs: (ids, weights) of shape (B, L, K): soft input embeddings (`embed_soft`), built here
        so that they are part of the forward (a sharded FSDP model has its embedding only inside it).
        """
        x = self.input_embeddings(input_ids, inputs_embeds, soft_inputs)  # (B, L, d_model)
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=x.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = run_blocks(self.transformer.blocks, x, cos, sin, attention_mask, cache, start, pad_offsets,
                       checkpointed=self.training and self.activation_checkpointing)
        x = select_positions(x, logits_slice)
        x = self.transformer.ln_f(x)
        head = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(x, head)[..., : self.config.vocab_size]


# The names the architecture registry looks for in every family module.
Config = LLaDAConfig
Model = LLaDAModelLM
EOT_TOKENS = ("<|eot_id|>",)
