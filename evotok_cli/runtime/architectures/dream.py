"""Dream: a Qwen2-shaped transformer (Dream-v0-Base-7B, Dream-v0-Instruct-7B, D2F-Dream's base) run with
bidirectional attention. What is Dream's is here: its config keys, its checkpoint's module names and its
`FamilySpec`; the network is `family.py`'s, shared with LLaDA.

Dream was initialised from Qwen2.5-7B, an autoregressive model, and kept its habit of predicting the
*next* token: the prediction for position i is the output at position i - 1 (position 0 reuses its own
output). The model below returns the outputs as they are, one per fed position, and says so with
`shifted_logits = True`; the decoders apply the shift, because only they know which earlier output (maybe
one that is cached) belongs to the first position they feed.

Module names equal the checkpoint's Qwen2 tensor names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so loading is a strict name-for-name copy and PEFT adapters made for Dream merge unchanged. Differences
from LLaDA: q/k/v projections carry a bias, attention is grouped-query (28 query heads share 4 KV heads
in the 7B), RoPE theta is 1e6, the LM head is `lm_head`, the logits are shifted. RMSNorm runs in fp32 as
Qwen2 does; RoPE rotates in the activations' dtype with cos/sin computed in fp32 and cast down, also as
Qwen2 does, so a bf16 run performs the official model's roundings (at fp32 there is no difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from evotok_cli.base.errors import CheckpointError
from evotok_cli.runtime import architectures as arch
from evotok_cli.runtime.architectures.family import FamilyConfig, FamilyModel, FamilySpec

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
            return arch.config_float(params, "rope_theta", where, default=10000.0)
    return arch.config_float(raw, "rope_theta", where, default=10000.0)


def _check_supported(raw: dict[str, Any], where: str) -> None:
    arch.check_supported(raw, _REQUIRED_VALUES, where, "Dream")
    layer_types = raw.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise CheckpointError(f"config.json key layer_types must be a list, got {layer_types!r}", where=where,
                              fix="correct the value in config.json or download the file again")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise CheckpointError("unsupported layer_types: only full attention is implemented", where=where,
                              fix="this Dream variant is not supported; please open an issue with its config")
    arch.require_keys(raw, _SIZE_KEYS, where,
                 "a Dream config needs hidden_size, num_hidden_layers, num_attention_heads, ...")


@dataclass(frozen=True, kw_only=True)
class DreamConfig(FamilyConfig):
    """Sizes under the runtime's names (d_model: hidden_size, n_heads: num_attention_heads, n_kv_heads:
    num_key_value_heads, n_layers: num_hidden_layers); `from_hf`/`to_hf` map the Qwen2 keys."""

    aliases: ClassVar[dict[str, str]] = {"ffn_size": "intermediate_size", "embedding_rows": "vocab_size",
                                         "tied_head": "tie_word_embeddings"}
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    pad_token_id: int = 151643
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    mask_token_id: int = 151666
    eos_token_id: int = 151643

    @property
    def max_sequence_length(self) -> int:
        """Prompt + generation limit: the trained context (see TRAINED_CONTEXT), or less if the file says so."""
        return min(self.max_position_embeddings, TRAINED_CONTEXT)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str) -> DreamConfig:
        """Validate a Dream `config.json` and keep what the forward pass needs."""
        _check_supported(raw, where)
        size = {k: arch.config_int(raw, k, where) for k in _SIZE_KEYS}
        d_model, n_heads = size["hidden_size"], size["num_attention_heads"]
        n_kv = arch.config_int(raw, "num_key_value_heads", where, default=n_heads)
        arch.check_heads(d_model, n_heads, n_kv, ("hidden_size", "num_attention_heads", "num_key_value_heads"), where)
        if raw.get("head_dim") not in (None, d_model // n_heads):
            raise CheckpointError(f"head_dim {raw['head_dim']} differs from hidden_size / num_attention_heads "
                                  f"({d_model // n_heads})", where=where, fix="this Dream variant is not supported")
        ids = arch.token_ids(raw, {"mask_token_id": 151666, "eos_token_id": 151643}, size["vocab_size"], where)
        ids |= arch.token_ids(raw, {"pad_token_id": ids["eos_token_id"]}, size["vocab_size"], where)
        known = set(_REQUIRED_VALUES) | _INERT_KEYS | _HF_KEYS
        return cls(
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, n_layers=size["num_hidden_layers"],
            intermediate_size=size["intermediate_size"], vocab_size=size["vocab_size"],
            max_position_embeddings=size["max_position_embeddings"], rope_theta=_rope_theta(raw, where),
            rms_norm_eps=arch.config_float(raw, "rms_norm_eps", where, default=1e-6),
            tie_word_embeddings=arch.config_bool(raw, "tie_word_embeddings", where, default=False),
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


# Dream's checkpoint names: Qwen2's `self_attn` / `mlp` block, the `model` tree, an untied `lm_head`.
SPEC = FamilySpec(
    qkv_bias=True, rope_in_fp32=False, shifted_logits=True,
    block={"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
           "v": "self_attn.v_proj", "out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    embedding="model.embed_tokens", blocks="model.layers", final_norm="model.norm", head="lm_head",
)


class DreamModel(FamilyModel):
    """Dream's network (`family.FamilyModel`): unshifted logits, row i is the output at fed position i (it
    predicts position i + 1; the decoders shift, see the module docstring)."""

    spec = SPEC


# The names the architecture registry looks for in every family module.
Config = DreamConfig
Model = DreamModel
EOT_TOKENS = ("<|im_end|>",)
