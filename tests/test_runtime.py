"""The native LLaDA runtime against an independent implementation (transformers' Llama with a
bidirectional mask), and the loading paths (single file, shards, dtype, padding)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evotok_cli.base.errors import CheckpointError
from evotok_cli.runtime.architectures.llada import LLaDAConfig
from evotok_cli.runtime.model import inspect_model, load_model
from tests.conftest import write_llada


def _to_llama(net, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden_size,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                     num_hidden_layers=cfg.n_layers, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
                     max_position_embeddings=cfg.max_sequence_length)
    ref = LlamaForCausalLM(hc).eval()
    t = net.model.transformer
    sd = {"model.embed_tokens.weight": t.wte.weight, "model.norm.weight": t.ln_f.weight,
          "lm_head.weight": t.ff_out.weight}
    names = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    for i, block in enumerate(t.blocks):
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = getattr(block, ours).weight
    ref.load_state_dict(sd, strict=True)
    return ref


def test_logits_match_transformers_llama_with_bidirectional_mask(tmp_path, tokenizer_dir):
    for kv_heads in (4, 2):  # full multi-head and grouped-query attention
        folder = write_llada(tmp_path / f"kv{kv_heads}", tokenizer_dir, kv_heads=kv_heads, seed=kv_heads)
        lm = load_model(folder)
        ref = _to_llama(lm.net, lm.config)
        ids = torch.randint(0, lm.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = lm(ids)
            theirs = ref(input_ids=ids, attention_mask=torch.zeros(2, 1, 23, 23)).logits
            causal = ref(input_ids=ids).logits
        assert (ours - theirs).abs().max() < 1e-5
        assert (ours - causal).abs().max() > 1e-2  # the comparison can tell causal from bidirectional


def test_sharded_checkpoint_loads_identically(tiny_llada, tiny_llada_sharded):
    assert len(list(tiny_llada_sharded.glob("model-*-of-*.safetensors"))) > 2
    a, b = load_model(tiny_llada), load_model(tiny_llada_sharded)
    for (na, pa), (nb, pb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_module_names_equal_checkpoint_tensor_names(tiny_llada):
    from safetensors import safe_open

    with safe_open(str(tiny_llada / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    lm = load_model(tiny_llada)
    assert stored == set(lm.net.state_dict())
    assert "model.transformer.blocks.0.ff_proj.weight" in stored and "model.transformer.ff_out.weight" in stored


def test_dtype_is_fp32_on_cpu_and_overridable(tiny_llada):
    assert load_model(tiny_llada).dtype == torch.float32
    lm = load_model(tiny_llada, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    logits = lm(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_embeddings_input_equals_ids_input(tiny_model):
    ids = torch.tensor([[5, 9, 11, 2, 2]])
    with torch.no_grad():
        assert torch.equal(tiny_model(ids), tiny_model(inputs_embeds=tiny_model.embed(ids)))
        weights = torch.zeros(1, 5, 4)
        weights[..., -1] = 1
        soft = tiny_model.embed_soft(ids[..., None].expand(1, 5, 4), weights)
        assert torch.allclose(soft, tiny_model.embed(ids))


def test_left_padded_rows_are_bit_identical_to_unpadded(tiny_model):
    from evotok_cli.decoding.canvas import build_canvas

    canvas = build_canvas([[5, 6, 7, 8], [9, 10]], 4, mask_id=tiny_model.mask_id, pad_id=tiny_model.eos_id,
                          max_length=64, device=torch.device("cpu"))
    with torch.no_grad():
        exact = tiny_model(canvas.x, pad_offsets=canvas.pad_offsets, position_ids=canvas.positions)
        masked = tiny_model(canvas.x, attention_mask=canvas.key_mask(), position_ids=canvas.positions)
        alone = tiny_model(torch.tensor([[9, 10] + [tiny_model.mask_id] * 4]))
        longest = tiny_model(torch.tensor([[5, 6, 7, 8] + [tiny_model.mask_id] * 4]))
    assert torch.equal(exact[1, 2:], alone[0]) and torch.equal(exact[0], longest[0])
    assert (masked[1, 2:] - alone[0]).abs().max() < 1e-4  # a padding mask agrees only up to rounding


def test_kv_cache_is_exact_when_nothing_before_changes(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_cache(1, 8)
        tiny_model(ids, cache=cache)
        tail = tiny_model(ids[:, 5:], cache=cache, start=5)
    assert torch.allclose(full[:, 5:], tail, atol=1e-4, rtol=1e-5)  # equal up to float rounding


def test_info_reads_headers_only(tiny_llada_sharded):
    info = inspect_model(tiny_llada_sharded)
    assert info["architecture"] == "LLaDAModelLM" and info["shards"] > 2 and info["chat_template"] is True
    assert info["parameters"] == sum(p.numel() for p in load_model(tiny_llada_sharded).net.parameters())
    assert info["dtype"] == "F32" and info["mask_id"] is not None


def test_soft_inputs_are_mixed_by_the_model(tiny_model):
    ids = torch.randint(5, 100, (2, 6, 4), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(2, 6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_model(soft_inputs=(ids, weights)),
                           tiny_model(inputs_embeds=tiny_model.embed_soft(ids, weights)))


def test_finite_logits_are_checked_once(tiny_llada, monkeypatch):
    """The NaN/inf guard is one reduction on the first forward pass, never a per-step cost."""
    lm = load_model(tiny_llada)
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.shape) or real(t))
    with torch.no_grad():
        for _ in range(3):
            lm(torch.tensor([[5, 6, 7]]))
    assert len(calls) == 1 and lm.logits_checked


def test_nan_weights_stop_at_the_first_forward_pass(tmp_path, tiny_llada):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_llada, tmp_path / "nan")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.transformer.blocks.1.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    lm = load_model(folder)
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(CheckpointError, match="NaN or infinite logits") as exc:
            lm(torch.tensor([[5, 6, 7]]))
        assert exc.value.where == str(folder)


def test_config_nulls_mean_the_defaults(tiny_llada):
    """Real configs write null for "same as" values (n_kv_heads, embedding_size): those still load."""
    raw = json.loads((tiny_llada / "config.json").read_text())
    cfg = LLaDAConfig.from_hf({**raw, "n_kv_heads": None, "embedding_size": None}, "config.json")
    assert cfg.n_kv_heads == raw["n_heads"] and cfg.embedding_size == raw["vocab_size"]
    with pytest.raises(CheckpointError, match="key n_layers must be a positive integer, got -1"):
        LLaDAConfig.from_hf({**raw, "n_layers": -1}, "config.json")


def _create(out, **sizes):
    from evotok_cli.runtime.init import create_model
    args = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": None, "mlp": None, "max_length": 64,
            "vocab_size": 300, **sizes}
    return create_model(out, **args)


def test_init_model_leaves_nothing_when_building_fails(tmp_path, monkeypatch):
    from evotok_cli.runtime import init

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(init, "save_model", fail)
    with pytest.raises(OSError):
        _create(tmp_path / "new" / "deeper" / "m")
    assert list(tmp_path.iterdir()) == []  # no staging folder, no half-made model, no parents made for it
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError):
        _create(tmp_path / "empty")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"] and list((tmp_path / "empty").iterdir()) == []


def test_init_model_fills_an_existing_empty_folder(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    inode = out.stat().st_ino
    _create(out, shard_mb=0.01)
    assert out.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert load_model(out).vocab_size > 0
