"""The CLI as a user meets it: instant help, runnable examples, JSON schemas, settings precedence,
prompts from every source, and the trace file."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import run_cli

GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]


def test_help_does_not_import_torch():
    code = ("import sys; from evotok_cli.cli.app import app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import at module level'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_help_shows_an_example(cli):
    for command in ("info", "decoders", "generate", "finetune", "init-model", "data"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "evotok " + command.split()[0] in proc.stdout.replace("\n", " "), command
    assert cli("--version").stdout.startswith("evotok ")


def test_info_json(cli, tiny_llada):
    proc = cli("info", str(tiny_llada), "--json")
    info = json.loads(proc.stdout)
    assert info["schema"] == "evotok.info/1" and info["architecture"] == "LLaDAModelLM"
    assert info["chat_template"] is True and info["shards"] == 1 and info["adapter"] is None


def test_decoders_list_and_details(cli):
    listing = json.loads(cli("decoders", "--json").stdout)["decoders"]
    names = {d["name"]: d for d in listing}
    assert {"hard-mask", "evotoken", "d2f"} <= set(names) and all(names[n]["ok"] for n in ("hard-mask", "evotoken", "d2f"))
    details = json.loads(cli("decoders", "--details", "evotoken", "--json").stdout)
    options = {o["name"]: o for o in details["options"]}
    assert options["alpha"]["default"] == 0.7 and options["alpha"]["range"] == "[0.0, 1.0)"
    assert options["k_soft"]["default"] == 3 and "cache" in options


def test_generate_json_schema(cli, tiny_llada):
    proc = cli("generate", "-m", str(tiny_llada), "-p", "What is 2+3?", "-p", "Hello", *GEN, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "evotok.generate/1" and doc["decoder"] == "hard-mask"
    assert doc["params"]["gen_length"] == 8 and doc["params"]["decoder_options"]["cache"] == "none"
    assert [r["prompt"] for r in doc["results"]] == ["What is 2+3?", "Hello"]
    for r in doc["results"]:
        assert len(r["token_ids"]) == 8 and r["nfe"] == 4 and r["seconds"] > 0 and isinstance(r["text"], str)
    assert "NFE 4" in proc.stderr and "tok/s" in proc.stderr


def test_human_output_is_the_text(cli, tiny_llada):
    proc = cli("generate", "-m", str(tiny_llada), "-p", "Hi", *GEN)
    as_json = json.loads(cli("generate", "-m", str(tiny_llada), "-p", "Hi", *GEN, "--json").stdout)
    assert proc.stdout.rstrip("\n") == as_json["results"][0]["text"]


def test_precedence_flags_over_env_over_config_over_defaults(cli, tiny_llada, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("gen_length: 16\nblock_length: 8\nsteps: 8\ndecoder: {alpha: 0.6}\n")

    def params(*extra, env=None):
        proc = cli("generate", "-m", str(tiny_llada), "-p", "x", "-d", "evotoken", "--json", *extra, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["params"]

    assert params()["gen_length"] == 128  # built-in default
    from_config = params("--config", str(config))
    assert from_config["gen_length"] == 16 and from_config["decoder_options"]["alpha"] == 0.6
    from_env = params("--config", str(config), env={"EVOTOK_GEN_LENGTH": "32"})
    assert from_env["gen_length"] == 32 and from_env["steps"] == 8
    from_flag = params("--config", str(config), "--gen-length", "64", "--opt", "alpha=0.8",
                       env={"EVOTOK_GEN_LENGTH": "32"})
    assert from_flag["gen_length"] == 64 and from_flag["decoder_options"]["alpha"] == 0.8


def test_prompt_ids_and_prompts_file(cli, tiny_llada, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('"plain string"\n{"prompt": "object"}\n{"prompt_ids": [5, 6, 7]}\n')
    proc = cli("generate", "-m", str(tiny_llada), "--prompts-file", str(f), "--prompt-ids", "9,10", *GEN, "--json",
               "--batch-size", "2")
    results = json.loads(proc.stdout)["results"]
    assert [r["prompt"] for r in results] == [[9, 10], "plain string", "object", [5, 6, 7]]
    alone = json.loads(cli("generate", "-m", str(tiny_llada), "--prompt-ids", "5,6,7", *GEN, "--json").stdout)
    assert alone["results"][0]["token_ids"] == results[3]["token_ids"]  # batching does not change a row


def test_prompts_file_dash_reads_stdin(cli, tiny_llada, tmp_path, monkeypatch):
    """`--prompts-file -` reads a pipe (a FIFO named by path is still refused: it could block)."""
    import io

    lines = '"plain string"\n{"prompt_ids": [5, 6, 7]}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    piped = json.loads(cli("generate", "-m", str(tiny_llada), "--prompts-file", "-", *GEN, "--json").stdout)
    f = tmp_path / "prompts.jsonl"
    f.write_text(lines)
    filed = json.loads(cli("generate", "-m", str(tiny_llada), "--prompts-file", str(f), *GEN, "--json").stdout)
    assert [r["token_ids"] for r in piped["results"]] == [r["token_ids"] for r in filed["results"]]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\n")))
    bad = cli("generate", "-m", str(tiny_llada), "--prompts-file", "-", *GEN)
    assert bad.returncode == 2 and "<stdin>: prompts file is not UTF-8" in bad.stderr


def test_tokenizer_less_checkpoint_takes_prompt_ids(cli, tmp_path):
    from tests.conftest import write_llada
    folder = write_llada(tmp_path / "bare", None, vocab=64, mask_id=63, eos_id=1)
    proc = cli("generate", "-m", str(folder), "--prompt-ids", "3,4,5", *GEN, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"][0]["token_ids"]) == 8
    from tests.conftest import one_line_error
    assert "has no tokenizer" in one_line_error(cli("generate", "-m", str(folder), "-p", "text", *GEN))


def test_trace_file_schema(cli, tiny_llada, tmp_path):
    trace = tmp_path / "t.jsonl"
    proc = cli("generate", "-m", str(tiny_llada), "-p", "a", "-p", "bb", "-d", "evotoken", *GEN, "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == 2 * 4  # one per forward pass and prompt
    first = records[0]
    assert first["schema"] == "evotok.trace/1" and first["decoder"] == "evotoken"
    assert set(first) >= {"prompt_index", "step", "block", "states", "tokens", "confidence", "committed", "revised",
                          "candidates", "mask_id"}
    assert {r["prompt_index"] for r in records} == {0, 1}
    assert all(len(r["states"]) == 8 for r in records)


def test_init_model_one_liner(tmp_path):
    folder = tmp_path / "m"
    assert run_cli("init-model", str(folder), "--layers", "1", "--hidden", "32", "--heads", "2").returncode == 0
    proc = run_cli("generate", "-m", str(folder), "-p", "hello", *GEN)
    assert proc.returncode == 0, proc.stderr


def test_model_folder_generation_defaults(cli, tmp_path, tiny_llada):
    import shutil
    folder = shutil.copytree(tiny_llada, tmp_path / "m")
    (folder / "generation_config.json").write_text('{"evotok": {"gen_length": 12, "block_length": 4, "steps": 6}}')
    doc = json.loads(cli("generate", "-m", str(folder), "-p", "x", "--json").stdout)
    assert (doc["params"]["gen_length"], doc["params"]["block_length"], doc["params"]["steps"]) == (12, 4, 6)
    assert len(doc["results"][0]["token_ids"]) == 12
    flagged = json.loads(cli("generate", "-m", str(folder), "-p", "x", "--gen-length", "8", "--steps", "4", "--json").stdout)
    assert flagged["params"]["gen_length"] == 8 and flagged["params"]["block_length"] == 4
    (folder / "generation_config.json").write_text('{"evotok": {"gen_length": -1}}')
    from tests.conftest import one_line_error
    assert "invalid entry 'gen_length'" in one_line_error(cli("generate", "-m", str(folder), "-p", "x"))


def test_prefill_follows_the_chat_template(cli, tmp_path, tiny_llada):
    """--prefill (or the model folder's default) ends the rendered prompt, the human output shows it before
    the answer, and a flag overrides the folder's value."""
    import shutil

    from evotok_cli.runtime.prompts import Prompt, encode_prompts
    from evotok_cli.runtime.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tiny_llada)
    plain, pre = encode_prompts([Prompt("x")], tokenizer, chat=True, vocab_size=10**6)[0], \
        encode_prompts([Prompt("x")], tokenizer, chat=True, vocab_size=10**6, prefill="<reasoning>")[0]
    assert tokenizer.decode(pre.ids).endswith("<reasoning>") and len(pre.ids) > len(plain.ids)
    folder = shutil.copytree(tiny_llada, tmp_path / "m")
    args = ("generate", "-m", str(folder), "-p", "x", "--gen-length", "4", "--steps", "4", "--block-length", "4")
    assert json.loads(cli(*args, "--json").stdout)["params"]["prefill"] == ""
    (folder / "generation_config.json").write_text('{"evotok": {"prefill": "<reasoning>"}}')
    assert json.loads(cli(*args, "--json").stdout)["params"]["prefill"] == "<reasoning>"
    assert cli(*args).stdout.startswith("<reasoning>")
    assert json.loads(cli(*args, "--json", "--prefill", "").stdout)["params"]["prefill"] == ""


def test_serve_declares_the_model_options_generate_declares():
    """`serve`'s model, adapter, decoder, device, dtype, LoRA-mode, compile and padded-attention options (and
    `bench`'s model-loading ones) are `generate`'s own declarations (only the decoder's help is serve's), and
    serve's --help lists every option with its default."""
    import dataclasses

    from typer.testing import CliRunner

    from evotok_cli.base.options import default_of, from_flags, shown
    from evotok_cli.cli.app import app
    from evotok_cli.jobs.config import GenerateOptions
    from evotok_cli.serve.config import ServeOptions

    generate = {f.name: f for f in dataclasses.fields(GenerateOptions)}
    serve = {f.name: f for f in dataclasses.fields(ServeOptions)}
    for name in ("model", "adapter", "decoder", "device", "dtype", "lora_mode", "compile", "padded_attention"):
        mine, theirs = dict(serve[name].metadata), dict(generate[name].metadata)
        if name == "decoder":
            mine.pop("help"), theirs.pop("help")
        assert (default_of(serve[name]), mine) == (default_of(generate[name]), theirs), name
    from evotok_cli.bench.config import BenchOptions

    bench = {f.name: f for f in dataclasses.fields(BenchOptions)}
    for name in ("device", "dtype", "lora_mode", "compile", "padded_attention"):  # bench's are generate's too
        assert (default_of(bench[name]), dict(bench[name].metadata)) == (default_of(generate[name]),
                                                                         dict(generate[name].metadata)), name
    assert from_flags(ServeOptions, {"port": 0}) == ServeOptions(port=0)  # unset flags are the defaults
    text = " ".join(CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output.split())
    for f in serve.values():
        assert f"{f.metadata['help']} [default: {shown(f)}]" in text if shown(f) else f.metadata["help"] in text, f.name
