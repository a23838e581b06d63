"""Hostile checkpoints and adapters: a model folder or adapter a user could hand to `generate`, `bench`
or `info` (wrongly typed config values, a folder that is no folder, damaged JSON, integer or NaN weights,
adapters that contradict their own config). Every setup breaks a copy, never the session's checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.hostile import BAD_BYTES, Case, Ctx, both, write

GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]
DROP = object()  # an edit_config value: remove the key
Q0 = "model.transformer.blocks.0.q_proj"


def generate(model: str = "{tmp}/m", *extra: str) -> list[str]:
    return ["generate", "-m", model, "-p", "hi", *GEN, *extra]


def copy(which: str = "model") -> Callable[[Ctx], None]:
    """A setup copying the tiny LLaDA (`model`) or Dream (`dream`) checkpoint to `{tmp}/m`."""
    def setup(ctx: Ctx) -> None:
        shutil.copytree(getattr(ctx, which), ctx.tmp / "m")
    return setup


def edit_config(which: str = "model", **changes: Any) -> Callable[[Ctx], None]:
    """A copy whose config.json has `changes` applied (DROP removes a key)."""
    def setup(ctx: Ctx) -> None:
        copy(which)(ctx)
        path = ctx.tmp / "m" / "config.json"
        cfg = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DROP:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        path.write_text(json.dumps(cfg))
    return setup


def edit_weights(fn: Callable[[dict[str, torch.Tensor]], None], which: str = "model") -> Callable[[Ctx], None]:
    """A copy whose model.safetensors was rewritten after `fn` changed its tensors."""
    def setup(ctx: Ctx) -> None:
        copy(which)(ctx)
        path = ctx.tmp / "m" / "model.safetensors"
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return setup


def put(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = make(tensors[name])
    return fn


def poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return make


def adapter(tensors: dict[str, torch.Tensor] | None = None, rank: int = 4, **config: Any) -> Callable[[Ctx], None]:
    """A LoRA adapter at `{tmp}/a` for the tiny LLaDA (q_proj of block 0 unless `tensors` is given)."""
    def setup(ctx: Ctx) -> None:
        folder = ctx.tmp / "a"
        folder.mkdir()
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none", **config}
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        data = tensors if tensors is not None else lora(Q0, rank)
        save_file(data, str(folder / "adapter_model.safetensors"))
    return setup


def lora(module: str, rank: int, a_dtype: torch.dtype = torch.float32, b_value: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"base_model.model.{module}.lora_A.weight": (torch.randn(rank, 64, generator=g) * 10).to(a_dtype),
            f"base_model.model.{module}.lora_B.weight": torch.full((64, rank), b_value)}


def symlink_loop(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        os.symlink(ctx.tmp / rel, ctx.tmp / rel)
    return setup


def make_folder(rel: str) -> Callable[[Ctx], None]:
    """Replace the file `rel` by an empty folder of the same name."""
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / rel).unlink()
        (ctx.tmp / rel).mkdir()
    return setup


def with_adapter(*extra: str) -> list[str]:
    return generate("{model}", "--adapter", "{tmp}/a", *extra)


CONFIG_CASES = [  # LLaDA config.json values of the wrong type or range: (id, changes, expected)
    ("heads-string", {"n_heads": "four"}, "key n_heads must be a positive integer, got 'four'"),
    ("d-model-null", {"d_model": None}, "key d_model must be a positive integer, got None"),
    ("layers-list", {"n_layers": [2]}, "key n_layers must be a positive integer, got [2]"),
    ("mlp-float", {"mlp_hidden_size": 96.5}, "key mlp_hidden_size must be a positive integer, got 96.5"),
    ("layers-negative", {"n_layers": -1}, "key n_layers must be a positive integer, got -1"),
    ("vocab-zero", {"vocab_size": 0}, "key vocab_size must be a positive integer, got 0"),
    ("max-length-bool", {"max_sequence_length": True}, "key max_sequence_length must be a positive integer"),
    ("kv-heads-3", {"n_kv_heads": 3}, "n_kv_heads 3 do not divide"),
    ("head-size-odd", {"n_heads": 64, "n_kv_heads": 64}, "is odd"),
    ("rope-string", {"rope_theta": "big"}, "key rope_theta must be a positive number"),
    ("eps-negative", {"rms_norm_eps": -1e-5}, "key rms_norm_eps must be a positive number"),
    ("tying-string", {"weight_tying": "false"}, "key weight_tying must be true or false"),
    ("mask-id-outside", {"mask_token_id": 10**6}, "mask_token_id = 1000000 is outside the vocabulary"),
    ("eos-id-negative", {"eos_token_id": -5}, "key eos_token_id must be an integer >= 0, got -5"),
    ("embedding-small", {"embedding_size": 10}, "embedding_size 10 is smaller than vocab_size"),
    ("architectures-number", {"architectures": 7, "model_type": DROP}, "architectures must be a list of names"),
    ("size-missing", {"d_model": DROP}, "config.json lacks d_model"),
    ("vocab-huge", {"vocab_size": 10**30}, "key vocab_size must be below 2**31"),
]

DREAM_CASES = [  # the same for Dream's Qwen2 keys
    ("heads-string", {"num_attention_heads": "four"}, "key num_attention_heads must be a positive integer"),
    ("hidden-null", {"hidden_size": None}, "key hidden_size must be a positive integer, got None"),
    ("layers-negative", {"num_hidden_layers": -1}, "key num_hidden_layers must be a positive integer, got -1"),
    ("mlp-float", {"intermediate_size": 1.5}, "key intermediate_size must be a positive integer, got 1.5"),
    ("kv-heads-zero", {"num_key_value_heads": 0}, "key num_key_value_heads must be a positive integer, got 0"),
    ("tie-string", {"tie_word_embeddings": "no"}, "key tie_word_embeddings must be true or false"),
    ("layer-types-number", {"layer_types": 5}, "key layer_types must be a list"),
    ("eos-list", {"eos_token_id": [1, 2]}, "key eos_token_id must be an integer >= 0, got [1, 2]"),
    ("rope-zero", {"rope_theta": 0}, "key rope_theta must be a positive number, got 0"),
]

CASES = [
    *[Case(f"model-config-{name}", generate(), expect, edit_config(**changes)) for name, changes, expect in CONFIG_CASES],
    *[Case(f"model-dream-config-{name}", generate(), expect, edit_config("dream", **changes))
      for name, changes, expect in DREAM_CASES],
    # the folder and its JSON files
    Case("model-missing", generate("{tmp}/nope"), "model folder does not exist"),
    Case("model-is-a-file", generate("{tmp}/f"), "model folder is a file, not a folder", write("f", "x")),
    Case("model-symlink-loop", generate("{tmp}/m"), "model folder is a symbolic link loop", symlink_loop("m")),
    Case("model-config-is-a-folder", generate(), "config.json is a folder, not a file",
         both(copy(), make_folder("m/config.json"))),
    Case("model-config-not-utf8", generate(), "config.json is not UTF-8", both(copy(), write("m/config.json", BAD_BYTES))),
    Case("model-config-deeply-nested", generate(), "config.json: not valid JSON (maximum recursion depth",
         both(copy(), write("m/config.json", "[" * 100_000 + "]" * 100_000))),
    Case("model-config-5000-digits", generate(), "config.json: not valid JSON",
         both(copy(), write("m/config.json", '{"d_model": ' + "9" * 5000 + "}"))),
    Case("model-config-a-list", generate(), "expected a JSON object", both(copy(), write("m/config.json", "[1, 2]"))),
    Case("model-generation-config-not-utf8", generate(), "generation_config.json is not UTF-8",
         both(copy(), write("m/generation_config.json", BAD_BYTES))),
    Case("model-generation-config-not-json", generate(), "generation_config.json: not valid JSON",
         both(copy(), write("m/generation_config.json", "{evotok"))),
    Case("model-generation-config-bool", generate(), "invalid entry 'gen_length'",
         both(copy(), write("m/generation_config.json", '{"evotok": {"gen_length": true}}'))),
    Case("model-tokenizer-config-not-utf8", generate(), "tokenizer_config.json is not UTF-8",
         both(copy(), write("m/tokenizer_config.json", BAD_BYTES))),
    Case("model-tokenizer-config-not-json", generate(), "tokenizer_config.json: not valid JSON",
         both(copy(), write("m/tokenizer_config.json", "{"))),
    Case("model-dream-tokenizer-config-list", generate(), "tokenizer_config.json: expected a JSON object",
         both(copy("dream"), write("m/tokenizer_config.json", "[]"))),
    # weights that would load silently and compute garbage
    Case("model-weights-int8", generate(), "tensor model.transformer.blocks.0.q_proj.weight has dtype I8",
         edit_weights(put(f"{Q0}.weight", lambda t: t.to(torch.int8)))),
    Case("model-weights-int32", generate(), "tensor model.transformer.wte.weight has dtype I32",
         edit_weights(put("model.transformer.wte.weight", lambda t: (t * 100).to(torch.int32)))),
    Case("model-weights-bool", generate(), "has dtype BOOL",
         edit_weights(put("model.transformer.ln_f.weight", lambda t: t > 0))),
    Case("model-weights-nan", generate(), "first forward pass gave NaN or infinite logits",
         edit_weights(put(f"{Q0}.weight", poison(math.nan)))),
    Case("model-weights-inf", generate(), "first forward pass gave NaN or infinite logits",
         edit_weights(put("model.transformer.ff_out.weight", poison(math.inf)))),
    Case("model-dream-weights-nan", generate(), "first forward pass gave NaN or infinite logits",
         edit_weights(put("model.layers.0.self_attn.q_proj.bias", poison(math.nan)), "dream")),
    Case("model-dream-weights-int8", generate(), "model.norm.weight has dtype I8",
         edit_weights(put("model.norm.weight", lambda t: t.to(torch.int8)), "dream")),
    # adapters
    Case("model-adapter-r-contradicts", with_adapter(), "lora_A has rank 4, but adapter_config.json says r=8",
         adapter(r=8)),
    Case("model-adapter-rank-pattern-contradicts", with_adapter(), "says r=2", adapter(rank_pattern={"q_proj": 2})),
    Case("model-adapter-alpha-string", with_adapter(), "lora_alpha must be a positive number, got 'x'",
         adapter(lora_alpha="x")),
    Case("model-adapter-alpha-zero", with_adapter(), "lora_alpha must be a positive number, got 0", adapter(lora_alpha=0)),
    Case("model-adapter-r-bool", with_adapter(), "r must be a positive integer, got True", adapter(r=True)),
    Case("model-adapter-rslora-string", with_adapter(), "use_rslora must be true or false", adapter(use_rslora="yes")),
    Case("model-adapter-targets-number", with_adapter(), "target_modules must be a list", adapter(target_modules=5)),
    Case("model-adapter-bad-regex", with_adapter(), "invalid regular expression", adapter(target_modules="(q_proj")),
    Case("model-adapter-targets-nothing", with_adapter(), "the adapter matches nothing in this llada model",
         adapter(target_modules=["o_proj", "gate_proj"])),
    Case("model-adapter-no-lora-weights", with_adapter(), "matches nothing", adapter({})),
    Case("model-adapter-int8", with_adapter(), "lora_A.weight has dtype I8", adapter(lora(Q0, 4, torch.int8))),
    Case("model-adapter-nan", with_adapter(), "or the adapter", adapter(lora(Q0, 4, b_value=math.nan))),
    Case("model-adapter-config-not-json", with_adapter(), "adapter_config.json: not valid JSON",
         both(adapter(), write("a/adapter_config.json", "{r: 4}"))),
    Case("model-adapter-config-not-utf8", with_adapter(), "adapter_config.json is not UTF-8",
         both(adapter(), write("a/adapter_config.json", BAD_BYTES))),
    Case("model-adapter-config-missing", with_adapter(), "no adapter_config.json",
         both(adapter(), lambda ctx: (ctx.tmp / "a" / "adapter_config.json").unlink())),
    Case("model-adapter-missing", with_adapter(), "adapter folder does not exist"),
    Case("model-adapter-is-a-file", with_adapter(), "adapter folder is a file, not a folder", write("a", "x")),
    Case("model-adapter-symlink-loop", with_adapter(), "adapter folder is a symbolic link loop", symlink_loop("a")),
    # the same checks behind the other commands that load a model
    Case("model-bench-int8", ["bench", "sudoku4", "-m", "{tmp}/m", "--limit", "1", *GEN, "--out", "{tmp}/out"],
         "has dtype I8", edit_weights(put(f"{Q0}.weight", lambda t: t.to(torch.int8)))),
    Case("model-bench-config-heads", ["bench", "sudoku4", "-m", "{tmp}/m", "--limit", "1", *GEN, "--out", "{tmp}/out"],
         "key n_heads must be a positive integer", edit_config(n_heads="four")),
    Case("model-bench-adapter-r", ["bench", "sudoku4", "-m", "{model}", "--adapter", "{tmp}/a", "--limit", "1", *GEN,
                                   "--out", "{tmp}/out"], "says r=8", adapter(r=8)),
]
