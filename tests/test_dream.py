"""The native Dream runtime against an independent implementation (transformers' Qwen2 with a
bidirectional mask), its config mapping and refusals, loading, `evotok info`, PEFT adapters and padding."""

from __future__ import annotations

import json

import pytest
import torch

from evotok_cli.base.errors import CheckpointError
from evotok_cli.runtime.architectures import detect_family
from evotok_cli.runtime.architectures.dream import DreamConfig
from evotok_cli.runtime.model import inspect_model, load_model
from tests.conftest import one_line_error, write_dream

# Dream-v0-Instruct-7B's config.json, key for key.
REAL_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}


def test_real_config_maps_onto_the_runtime_names():
    cfg = DreamConfig.from_hf(REAL_CONFIG, "config.json")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (3584, 28, 28, 4, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (18944, 152064, 1e6, 1e-6)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (151666, 151643, 151643)
    assert cfg.max_sequence_length == 2048 and cfg.unknown_keys == ()
    assert set(cfg.to_hf()) == set(REAL_CONFIG) and DreamConfig.from_hf(cfg.to_hf(), "x") == cfg


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"type": "yarn", "factor": 4.0}), ("hidden_act", "gelu"), ("use_sliding_window", True),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    ("layer_types", ["sliding_attention"] * 28), ("head_dim", 64),
])
def test_unsupported_options_are_refused_in_one_line(key, value):
    with pytest.raises(CheckpointError) as err:
        DreamConfig.from_hf({**REAL_CONFIG, key: value}, "config.json")
    assert key in err.value.line() and "\n" not in err.value.line()


def _qwen2(lm):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = lm.config
    hc = Qwen2Config(hidden_size=c.d_model, intermediate_size=c.intermediate_size, num_attention_heads=c.n_heads,
                     num_key_value_heads=c.n_kv_heads, num_hidden_layers=c.n_layers, vocab_size=c.vocab_size,
                     rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
                     max_position_embeddings=c.max_position_embeddings, use_sliding_window=False)
    ref = Qwen2ForCausalLM(hc).eval()
    ref.load_state_dict(lm.net.state_dict(), strict=True)  # same names: Dream's tensors are Qwen2's
    return ref


def test_logits_match_transformers_qwen2_with_bidirectional_mask(tmp_path, dream_tokenizer_dir):
    for kv_heads in (2, 4):  # grouped-query and full multi-head attention
        lm = load_model(write_dream(tmp_path / f"kv{kv_heads}", dream_tokenizer_dir, kv_heads=kv_heads, seed=kv_heads))
        assert lm.net.model.layers[0].self_attn.q_proj.bias.abs().min() > 0  # biases are really exercised
        ref = _qwen2(lm)
        ids = torch.randint(0, lm.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = lm(ids)
            theirs = ref(input_ids=ids, attention_mask=torch.zeros(2, 1, 23, 23)).logits
            causal = ref(input_ids=ids).logits
        assert (ours - theirs).abs().max() < 1e-5
        assert (ours - causal).abs().max() > 1e-2  # the comparison can tell causal from bidirectional


def test_loads_through_the_registry_with_shifted_logits(tiny_dream):
    lm = load_model(tiny_dream)
    assert lm.family.name == "dream" and lm.shifted_logits and lm.dtype == torch.float32
    tok = lm.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|mask|>", "<|endoftext|>", "<|im_end|>")}
    assert (lm.mask_id, lm.eos_id, lm.eot_id) == (ids["<|mask|>"], ids["<|endoftext|>"], ids["<|im_end|>"])
    assert lm.stop_ids == (lm.eos_id, lm.eot_id)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")


def test_module_names_equal_checkpoint_tensor_names(tiny_dream):
    from safetensors import safe_open

    with safe_open(str(tiny_dream / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert stored == set(load_model(tiny_dream).net.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight",
            "model.norm.weight", "lm_head.weight"} <= stored
    assert "model.layers.0.self_attn.o_proj.bias" not in stored


def test_info_and_cli_info(tiny_dream, cli):
    info = inspect_model(tiny_dream)
    assert info["family"] == "dream" and info["architecture"] == "DreamModel" and info["chat_template"] is True
    assert (info["heads"], info["kv_heads"], info["layers"], info["hidden"]) == (4, 2, 2, 64)
    assert info["parameters"] == load_model(tiny_dream).parameter_count() and info["unknown_config_keys"] == []
    proc = cli("info", str(tiny_dream), "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["architecture"] == "DreamModel" and shown["eot_id"] == info["eot_id"] is not None


def test_tied_embeddings_and_sharded_weights_load(tmp_path, dream_tokenizer_dir):
    tied = load_model(write_dream(tmp_path / "tied", dream_tokenizer_dir, tie=True))
    assert "lm_head.weight" not in tied.net.state_dict()
    sharded = write_dream(tmp_path / "sharded", dream_tokenizer_dir, shard_bytes=40_000)
    single = write_dream(tmp_path / "single", dream_tokenizer_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_model(sharded)(ids), load_model(single)(ids))
        assert torch.isfinite(tied(ids)).all()


def test_peft_adapter_on_q_and_v_merges_and_reports(tmp_path, tiny_dream):
    """An adapter saved by peft itself (keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`)
    merges into the same function peft computes."""
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_dream)
    peft_net = get_peft_model(base.net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_net.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the adapter do something
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    peft_net.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = peft_net(ids)
    merged = load_model(tiny_dream, adapter=tmp_path / "adapter")
    assert merged.adapter.matched == {"q_proj": 2, "v_proj": 2} and merged.adapter.partial == []
    with torch.no_grad():
        assert (merged(ids) - expected).abs().max() < 1e-4
    info = inspect_model(tiny_dream, adapter=tmp_path / "adapter")
    assert info["adapter"]["matched"] == {"q_proj": 2, "v_proj": 2} and info["adapter"]["merged_modules"] == 4


def test_unknown_family_lists_llada_and_dream(tmp_path, tiny_dream, cli):
    with pytest.raises(CheckpointError) as err:
        detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "config.json")
    assert "llada" in err.value.line() and "dream" in err.value.line()
    folder = tmp_path / "gpt2"
    folder.mkdir()
    cfg = json.loads((tiny_dream / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    line = one_line_error(cli("info", str(folder)))
    assert "unknown model family" in line and "DreamModel" in line and "LLaDAModelLM" in line


def test_left_padded_rows_are_bit_identical_to_unpadded(tiny_dream):
    from evotok_cli.decoding.canvas import build_canvas

    lm = load_model(tiny_dream)
    canvas = build_canvas([[5, 6, 7, 8], [9, 10]], 4, mask_id=lm.mask_id, pad_id=lm.eos_id, max_length=64,
                          device=torch.device("cpu"))
    with torch.no_grad():
        exact = lm(canvas.x, pad_offsets=canvas.pad_offsets, position_ids=canvas.positions)
        alone = lm(torch.tensor([[9, 10] + [lm.mask_id] * 4]))
        longest = lm(torch.tensor([[5, 6, 7, 8] + [lm.mask_id] * 4]))
    assert torch.equal(exact[1, 2:], alone[0]) and torch.equal(exact[0], longest[0])


def test_kv_cache_and_logits_slice(tiny_dream):
    lm = load_model(tiny_dream)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        full = lm(ids)
        cache = lm.new_cache(1, 8)
        lm(ids, cache=cache)
        tail = lm(ids[:, 5:], cache=cache, start=5)
        sliced = lm(ids, logits_slice=(2, 5))
    assert torch.allclose(full[:, 5:], tail, atol=1e-4, rtol=1e-5)
    assert torch.allclose(sliced, full[:, 2:5], atol=1e-5)  # the LM head on fewer rows may round differently


def test_bf16_runs(tiny_dream):
    lm = load_model(tiny_dream, dtype="bfloat16")
    logits = lm(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
