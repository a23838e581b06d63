"""Dream: a Qwen2-shaped transformer (Dream-v0-Base-7B, Dream-v0-Instruct-7B, D2F-Dream's base) run with
bidirectional attention.

Dream was initialised from Qwen2.5-7B, an autoregressive model, and kept its habit of predicting the
*next* token: the prediction for position i is the output at position i - 1 (position 0 reuses its own
output). The model below returns the outputs as they are, one per fed position, and says so with
`shifted_logits = True`; the decoders apply the shift, because only they know which earlier output (maybe
one that is cached) belongs to the first position they feed.

Module names equal the checkpoint's Qwen2 tensor names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so loading is a strict name-for-name copy and PEFT adapters made for Dream merge unchanged. Differences
from LLaDA: q/k/v projections carry a bias, attention is grouped-query (28 query heads share 4 KV heads
in the 7B), RoPE theta is 1e6, the LM head is `lm_head`. RMSNorm runs in fp32 as Qwen2 does; RoPE
rotates in the activations' dtype with cos/sin computed in fp32 and cast down, also as Qwen2 does, so a
bf16 run performs the official model's roundings (at fp32 there is no difference).
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
    apply_rope_in_dtype,
    rope_cos_sin,
    select_positions,
)
from evotok_cli.runtime.attention import attend_layer
from evotok_cli.runtime.cache import KVCache, RowBatch

# Dream was trained on 2048-token sequences. Its config keeps Qwen2.5's position range (131072), but
# positions past 2048 were never seen with bidirectional attention, and a canvas that long costs
# O(L^2) attention memory for every forward pass; so the usable length is the smaller of the two.
TRAINED_CONTEXT = 2048

# Options we implement, with the values we accept; anything else is refused at load time rather than
# silently computing a different model.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "swish"),
    "rope_scaling": (None,),
    "use_sliding_window": (False,),
}
# Keys of real Dream / Qwen2 configs that change nothing at inference (dropout, init, bookkeeping).
_INERT_KEYS = {
    "_name_or_path", "architectures", "attention_dropout", "auto_map", "bos_token_id", "dtype",
    "initializer_range", "max_window_layers", "model_type", "sliding_window", "torch_dtype",
    "transformers_version", "use_cache", "layer_types", "rope_parameters", "head_dim",
}
_HF_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "mask_token_id", "eos_token_id",
    "pad_token_id", "tie_word_embeddings",
}
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings")


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """`rope_theta` (transformers 4 files) or `rope_parameters` (files saved by transformers 5)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            raise CheckpointError(f"unsupported rope_parameters {params!r} (evotok implements plain RoPE)",
                                  where=where, fix="this Dream variant is not supported; please open an issue")
        if "rope_theta" in params:
            return config_float(params, "rope_theta", where, default=10000.0)
    return config_float(raw, "rope_theta", where, default=10000.0)


def _check_supported(raw: dict[str, Any], where: str) -> None:
    for key, allowed in _REQUIRED_VALUES.items():
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(
                f"unsupported config option {key}={raw[key]!r} (evotok implements {allowed[0]!r})",
                where=where, fix="this Dream variant is not supported; please open an issue with its config")
    layer_types = raw.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise CheckpointError(f"config.json key layer_types must be a list, got {layer_types!r}", where=where,
                              fix="correct the value in config.json or download the file again")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise CheckpointError("unsupported layer_types: only full attention is implemented", where=where,
                              fix="this Dream variant is not supported; please open an issue with its config")
    missing = [k for k in _SIZE_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}", where=where,
                              fix="a Dream config needs hidden_size, num_hidden_layers, num_attention_heads, ...")


@dataclass(frozen=True)
class DreamConfig:
    """Sizes under the runtime's names (d_model, n_heads, ...); `from_hf`/`to_hf` map the Qwen2 keys."""

    d_model: int  # hidden_size
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    n_layers: int  # num_hidden_layers
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def max_sequence_length(self) -> int:
        """Prompt + generation limit: the trained context (see TRAINED_CONTEXT), or less if the file says so."""
        return min(self.max_position_embeddings, TRAINED_CONTEXT)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str) -> DreamConfig:
        """Validate a Dream `config.json` and keep what the forward pass needs."""
        _check_supported(raw, where)
        size = {k: config_int(raw, k, where) for k in _SIZE_KEYS}
        d_model, n_heads = size["hidden_size"], size["num_attention_heads"]
        n_kv = config_int(raw, "num_key_value_heads", where, default=n_heads)
        check_heads(d_model, n_heads, n_kv, ("hidden_size", "num_attention_heads", "num_key_value_heads"), where)
        if raw.get("head_dim") not in (None, d_model // n_heads):
            raise CheckpointError(f"head_dim {raw['head_dim']} differs from hidden_size / num_attention_heads "
                                  f"({d_model // n_heads})", where=where, fix="this Dream variant is not supported")
        eos = config_int(raw, "eos_token_id", where, default=151643, minimum=0)
        ids = {"mask_token_id": config_int(raw, "mask_token_id", where, default=151666, minimum=0),
               "eos_token_id": eos, "pad_token_id": config_int(raw, "pad_token_id", where, default=eos, minimum=0)}
        for key, value in ids.items():
            check_token_id(key, value, size["vocab_size"], where)
        known = set(_REQUIRED_VALUES) | _INERT_KEYS | _HF_KEYS
        return cls(
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, n_layers=size["num_hidden_layers"],
            intermediate_size=size["intermediate_size"], vocab_size=size["vocab_size"],
            max_position_embeddings=size["max_position_embeddings"], rope_theta=_rope_theta(raw, where),
            rms_norm_eps=config_float(raw, "rms_norm_eps", where, default=1e-6),
            tie_word_embeddings=config_bool(raw, "tie_word_embeddings", where, default=False),
            **ids, unknown_keys=tuple(sorted(set(raw) - known)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The full key set of a real Dream-v0 config.json, with our sizes."""
        return {
            "architectures": ["DreamModel"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "bos_token_id": self.eos_token_id, "eos_token_id": self.eos_token_id, "hidden_act": "silu",
            "hidden_size": self.d_model, "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "mask_token_id": self.mask_token_id, "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.n_layers, "model_type": "Dream", "num_attention_heads": self.n_heads,
            "num_hidden_layers": self.n_layers, "num_key_value_heads": self.n_kv_heads,
            "pad_token_id": self.pad_token_id, "rms_norm_eps": self.rms_norm_eps, "rope_scaling": None,
            "rope_theta": self.rope_theta, "sliding_window": None, "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True,
            "use_sliding_window": False, "vocab_size": self.vocab_size,
        }


class DreamAttention(nn.Module):
    """Grouped-query attention with biased q/k/v and an unbiased output projection."""

    def __init__(self, cfg: DreamConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | RowBatch | None, start: int, pad_offsets: list[int] | None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = apply_rope_in_dtype(q, cos, sin), apply_rope_in_dtype(k, cos, sin)
        # keys are cached after RoPE: positions are absolute, so a cache (or the engine's slots) is exact
        y = attend_layer(self.index, q, k, v, mask, cache, start, pad_offsets)  # (B, H, L, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, d_model)


class DreamMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    """Pre-norm attention + pre-norm MLP, each added to the residual stream."""

    def __init__(self, cfg: DreamConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, pad_offsets=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, pad_offsets)
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamBackbone(nn.Module):
    """Exists so that parameter names start with `model.` like the checkpoint's (`model.layers.0...`)."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DreamLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class DreamModel(DiffusionLMBase):
    """The diffusion LM behind the decoders' model protocol (see `evotok_cli.runtime.model`); embedding ids
    and soft mixtures, the FSDP units and the KV cache come from `layers.DiffusionLMBase`."""

    shifted_logits = True  # the prediction for position i is the output at i - 1 (see the module docstring)
    # the token embedding and the block list, by their checkpoint names (see `DiffusionLMBase`)
    embedding_name, blocks_name = "model.embed_tokens", "model.layers"

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.model = DreamBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

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
        """Unshifted logits (B, L, V): row i is the output at fed position i (it predicts position i + 1).

        The arguments mean exactly what they mean for LLaDA (`LLaDAModelLM.forward`): a bool attention mask
        (B, 1, L, Lk) with True = may attend, absolute position ids (default `start + arange(L)`), a KV
        cache written at canvas slice [start, start + L), `logits_slice` (a, b) to run the LM head on fed
        positions [a, b) only, `pad_offsets` for left-padded rows, and `soft_inputs` (ids, weights).
        """
        x = self.input_embeddings(input_ids, inputs_embeds, soft_inputs)  # (B, L, d_model)
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=x.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, 1, L, D)
        x = run_blocks(self.model.layers, x, cos, sin, attention_mask, cache, start, pad_offsets,
                       checkpointed=self.training and self.activation_checkpointing)
        x = select_positions(x, logits_slice)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head)  # (B, L', V)


# The names the architecture registry looks for in every family module.
Config = DreamConfig
Model = DreamModel
EOT_TOKENS = ("<|im_end|>",)
