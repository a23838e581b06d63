"""Every failure a user can cause ends in one line on stderr and exit code 2, without a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import one_line_error, run_cli, write_llada

GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]


@pytest.fixture
def broken(tmp_path, tiny_llada):
    """A fresh copy of the tiny checkpoint to break."""
    target = tmp_path / "broken"
    shutil.copytree(tiny_llada, target)
    return target


def _gen(cli, model, *extra):
    return cli("generate", "-m", str(model), "-p", "hi", *GEN, *extra)


def test_missing_folder(cli, tmp_path):
    line = one_line_error(_gen(cli, tmp_path / "nope"))
    assert "does not exist" in line and "nope" in line


def test_no_config(cli, broken):
    (broken / "config.json").unlink()
    assert "no config.json" in one_line_error(_gen(cli, broken))


def test_config_not_json(cli, broken):
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(_gen(cli, broken))


def test_unknown_architecture(cli, broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (broken / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(_gen(cli, broken))
    assert "unknown model family" in line and "LLaDAModelLM" in line and "DreamModel" in line


def test_unsupported_config_option(cli, broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["alibi"] = True
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "unsupported config option alibi=True" in one_line_error(_gen(cli, broken))


def test_invalid_size_is_named_not_blamed_on_the_architecture(cli, broken):
    """`n_layers: -1` once built no blocks and then blamed the weights on "another architecture"."""
    cfg = json.loads((broken / "config.json").read_text())
    cfg["n_layers"] = -1
    (broken / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(_gen(cli, broken))
    assert "key n_layers must be a positive integer, got -1" in line and "another architecture" not in line
    assert str(broken / "config.json") in line


def test_symlink_loop_is_named_in_a_fresh_process(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = one_line_error(run_cli("info", str(loop)))
    assert "symbolic link loop" in line and "does not exist" not in line


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(cli, broken):
    _edit_weights(broken, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    assert "missing tensor model.transformer.blocks.1.up_proj.weight" in one_line_error(_gen(cli, broken))


def test_unexpected_tensor(cli, broken):
    import torch
    _edit_weights(broken, lambda t: t.__setitem__("model.transformer.extra.weight", torch.zeros(2)))
    assert "unexpected tensor model.transformer.extra.weight" in one_line_error(_gen(cli, broken))


def test_wrongly_shaped_tensor(cli, broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["mlp_hidden_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(_gen(cli, broken))
    assert "has shape" in line and "ff_proj" in line


def test_truncated_safetensors(cli, broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = one_line_error(_gen(cli, broken))
    assert "model.safetensors" in line and ("truncated" in line or "corrupt" in line)


def test_corrupt_header(cli, broken):
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "unreadable safetensors" in one_line_error(_gen(cli, broken))


def test_index_names_missing_shard(cli, tmp_path, tiny_llada_sharded):
    target = shutil.copytree(tiny_llada_sharded, tmp_path / "sharded")
    victim = sorted(target.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    line = one_line_error(_gen(cli, target))
    assert f"index names shard {victim.name}, which is missing" in line


def test_pickle_weights_refused(cli, broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not really a pickle")
    line = one_line_error(_gen(cli, broken))
    assert "never unpickles" in line and "save_file" in line


def test_adapter_for_another_architecture(cli, tmp_path, tiny_llada):
    import torch
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": "Dream-org/Dream-v0-Instruct-7B"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(adapter / "adapter_model.safetensors"))
    line = one_line_error(_gen(cli, tiny_llada, "--adapter", str(adapter)))
    assert "another architecture" in line and "Dream-org" in line


def test_prompt_longer_than_max(cli, tmp_path, tokenizer_dir):
    small = write_llada(tmp_path / "short", tokenizer_dir, max_length=16)
    line = one_line_error(cli("generate", "-m", str(small), "--prompt-ids", ",".join(["5"] * 12), *GEN))
    assert "exceeds the model's maximum 16" in line


@pytest.mark.parametrize("args, expected", [
    (["--gen-length", "10", "--block-length", "4", "--steps", "4"], "not divisible by block length"),
    (["--gen-length", "8", "--block-length", "4", "--steps", "3"], "not divisible by the number of blocks"),
    (GEN + ["--temperature", "-1"], "temperature must be"),
    (GEN + ["--decoder", "hrd-mask"], "did you mean hard-mask"),
    (GEN + ["--remasking", "sideways"], "not one of low_confidence, random"),
    (GEN + ["--opt", "nonsense=1"], "has no option 'nonsense'"),
    (GEN + ["--opt", "threshold=2"], "out of range"),
    (GEN + ["--opt", "novalue"], "is not key=value"),
    (GEN + ["-d", "evotoken", "--opt", "alpha=1"], "alpha=1.0 is out of range [0.0, 1.0)"),
    (GEN + ["-d", "evotoken", "--opt", "k_soft=two"], "not a valid int"),
    (GEN + ["--device", "cuda"], "CUDA was asked for but is not available"),
    (GEN + ["--dtype", "float8"], "unknown dtype"),
    (GEN + ["--gen-length", "abc"], "--gen-length"),
    (GEN + ["--batch-size", "0"], "batch size must be >= 1"),
])
def test_bad_flag_values(cli, tiny_llada, args, expected):
    line = one_line_error(cli("generate", "-m", str(tiny_llada), "-p", "hi", *args))
    assert expected in line, line


def test_bad_prompt_ids(cli, tiny_llada):
    assert "not a comma-separated list" in one_line_error(cli("generate", "-m", str(tiny_llada), "--prompt-ids", "1,x", *GEN))
    assert "outside the vocabulary" in one_line_error(cli("generate", "-m", str(tiny_llada), "--prompt-ids", "99999", *GEN))


def test_bad_prompts_file(cli, tmp_path, tiny_llada):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    line = one_line_error(cli("generate", "-m", str(tiny_llada), "--prompts-file", str(f), *GEN))
    assert "p.jsonl:2" in line


def test_bad_config_file(cli, tmp_path, tiny_llada):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gen_length: [1, 2\n")
    assert "invalid YAML" in one_line_error(cli("generate", "-m", str(tiny_llada), "-p", "hi", "--config", str(bad)))
    typo = tmp_path / "typo.yaml"
    typo.write_text("gen_lenght: 8\n")
    assert "did you mean gen_length" in one_line_error(cli("generate", "-m", str(tiny_llada), "-p", "hi", "--config", str(typo)))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("gen_length: eight\n")
    assert "expected int" in one_line_error(cli("generate", "-m", str(tiny_llada), "-p", "hi", "--config", str(wrong)))


def test_no_prompt(cli, tiny_llada):
    assert "no prompt given" in one_line_error(cli("generate", "-m", str(tiny_llada), *GEN))


def test_console_script_reports_errors_without_traceback(tmp_path):
    """The real console entry point in a fresh process, end to end."""
    line = one_line_error(run_cli("generate", "-m", str(tmp_path / "missing"), "-p", "hi"))
    assert line.startswith("error:")
