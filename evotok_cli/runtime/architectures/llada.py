"""LLaDA: a Llama-shaped transformer with bidirectional attention (LLaDA-8B, LLaDA-1.5, D2F-LLaDA base,
and the bundled model). What is LLaDA's is here: its config keys, its checkpoint's module names and its
`FamilySpec`; the network is `family.py`'s, shared with Dream.

Module names equal the checkpoint's tensor names (`model.transformer.blocks.{i}.q_proj.weight`, ...), so
loading is a strict name-for-name copy. RMSNorm and RoPE run in fp32 whatever the weights' dtype, as in
the official model file; everything else runs in the weights' dtype (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from evotok_cli.base.errors import CheckpointError
from evotok_cli.runtime import architectures as arch
from evotok_cli.runtime.architectures.family import FamilyConfig, FamilyModel, FamilySpec

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


@dataclass(frozen=True, kw_only=True)
class LLaDAConfig(FamilyConfig):
    """Sizes under LLaDA's own key names (d_model, n_heads, ... are the runtime's names too)."""

    aliases: ClassVar[dict[str, str]] = {"ffn_size": "mlp_hidden_size", "embedding_rows": "embedding_size",
                                         "tied_head": "weight_tying"}
    mlp_hidden_size: int
    embedding_size: int
    max_sequence_length: int
    weight_tying: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str) -> LLaDAConfig:
        """Validate a LLaDA `config.json` and keep what the forward pass needs."""
        arch.check_supported(raw, _REQUIRED_VALUES, where, "LLaDA")
        arch.require_keys(raw, _SIZE_KEYS, where,
                          "a LLaDA config needs d_model, n_heads, n_layers, mlp_hidden_size, ...")
        size = {k: arch.config_int(raw, k, where) for k in _SIZE_KEYS}
        n_kv = arch.config_int(raw, "n_kv_heads", where, default=size["n_heads"])
        arch.check_heads(size["d_model"], size["n_heads"], n_kv, ("d_model", "n_heads", "n_kv_heads"), where)
        embedding_size = arch.config_int(raw, "embedding_size", where, default=size["vocab_size"])
        if embedding_size < size["vocab_size"]:
            raise CheckpointError(f"embedding_size {embedding_size} is smaller than vocab_size {size['vocab_size']}",
                                  where=where, fix="correct embedding_size or vocab_size in config.json")
        ids = arch.token_ids(raw, {"mask_token_id": 126336, "eos_token_id": 126081}, size["vocab_size"], where)
        known = set(_REQUIRED_VALUES) | _INERT_KEYS | {f.name for f in fields(cls)}
        return cls(
            **size, n_kv_heads=n_kv, embedding_size=embedding_size, **ids,
            rope_theta=arch.config_float(raw, "rope_theta", where, default=10000.0),
            rms_norm_eps=arch.config_float(raw, "rms_norm_eps", where, default=1e-5),
            weight_tying=arch.config_bool(raw, "weight_tying", where, default=False),
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


# LLaDA's checkpoint names: a flat block, the OLMo-style `transformer` tree, an untied `ff_out` head.
SPEC = FamilySpec(
    qkv_bias=False, rope_in_fp32=True, shifted_logits=False,
    block={"attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "attn_out",
           "ff_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"},
    embedding="model.transformer.wte", blocks="model.transformer.blocks", final_norm="model.transformer.ln_f",
    head="model.transformer.ff_out",
)


class LLaDAModelLM(FamilyModel):
    """LLaDA's network (`family.FamilyModel`): position i is predicted from the output at i."""

    spec = SPEC


# The names the architecture registry looks for in every family module.
Config = LLaDAConfig
Model = LLaDAModelLM
EOT_TOKENS = ("<|eot_id|>",)
