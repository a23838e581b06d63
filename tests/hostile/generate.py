"""`evotok generate`: bad flags, texts, prompt files, output paths and config files."""

from __future__ import annotations

import os

from tests.hostile import BAD_BYTES, Case, Ctx, write

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BARE = ["generate", "-m", "{model}", "--gen-length", "8", "--block-length", "4", "--steps", "4"]


def _flag(id: str, extra: list[str], expect: str) -> Case:
    return Case(f"generate-{id}", GEN + extra, expect)


def _loop(rel: str):
    def setup(ctx: Ctx) -> None:
        os.symlink(ctx.tmp / rel, ctx.tmp / rel)
    return setup


def _file_parent(ctx: Ctx) -> None:
    (ctx.tmp / "f.txt").write_text("a file\n")


CASES = [
    # layout and numbers: each names the flag and the real problem
    _flag("steps-zero", ["--steps", "0"], "--steps: steps must be positive, got 0"),
    _flag("steps-negative", ["--steps", "-6"], "steps must be positive, got -6"),
    _flag("block-zero", ["--block-length", "0"], "block length must be positive, got 0"),
    _flag("block-negative", ["--block-length", "-16"], "block length must be positive, got -16"),
    _flag("gen-zero", ["--gen-length", "0"], "gen length must be positive"),
    _flag("gen-not-divisible", ["--gen-length", "10"], "not divisible by block length"),
    _flag("steps-not-divisible", ["--steps", "3"], "not divisible by the number of blocks"),
    _flag("gen-not-int", ["--gen-length", "abc"], "--gen-length"),
    _flag("temperature-negative", ["--temperature", "-1"], "temperature must be a finite number >= 0"),
    _flag("temperature-nan", ["--temperature", "nan"], "got nan"),
    _flag("temperature-inf", ["--temperature", "inf"], "got inf"),
    _flag("temperature-text", ["--temperature", "warm"], "--temperature"),
    _flag("seed-text", ["--seed", "abc"], "--seed"),
    _flag("batch-zero", ["--batch-size", "0"], "batch size must be >= 1"),
    _flag("batch-negative", ["--batch-size", "-2"], "batch size must be >= 1"),
    _flag("decoder-typo", ["--decoder", "hrd-mask"], "did you mean hard-mask"),
    _flag("decoder-empty", ["--decoder", ""], "unknown decoder"),
    _flag("remasking-unknown", ["--remasking", "sideways"], "not one of low_confidence, random"),
    _flag("threshold-range", ["--threshold", "2"], "out of range"),
    _flag("threshold-nan", ["--threshold", "nan"], "not a finite number"),
    _flag("opt-unknown", ["--opt", "nonsense=1"], "has no option 'nonsense'"),
    _flag("opt-no-value", ["--opt", "novalue"], "is not key=value"),
    _flag("opt-no-key", ["--opt", "=3"], "is not key=value"),
    _flag("evotoken-alpha-one", ["-d", "evotoken", "--opt", "alpha=1"], "out of range [0.0, 1.0)"),
    _flag("evotoken-alpha-nan", ["-d", "evotoken", "--opt", "alpha=nan"], "not a finite number"),
    _flag("evotoken-k-text", ["-d", "evotoken", "--opt", "k_soft=two"], "not a valid int"),
    _flag("evotoken-k-zero", ["-d", "evotoken", "--opt", "k_soft=0"], "out of range"),
    _flag("rng-unknown", ["--opt", "rng=exact"], "rng='exact' is not one of fast, reference"),
    _flag("rng-reference-cache", ["-d", "evotoken", "--opt", "rng=reference", "--opt", "cache=dual"],
          "rng=reference reproduces the release"),
    _flag("rng-reference-threshold", ["--opt", "rng=reference", "--threshold", "0.9"],
          "rng=reference reproduces the release"),
    _flag("evotoken-soft-mask-text", ["-d", "evotoken", "--opt", "soft_mask=maybe"], "not a valid bool"),
    _flag("evotoken-revise-number", ["-d", "evotoken", "--opt", "revise=2"], "not a valid bool"),
    _flag("d2f-budget", ["-d", "d2f", "--opt", "block_size=3"], "not a multiple of block_size 3"),
    _flag("d2f-block-zero", ["-d", "d2f", "--opt", "block_size=0"], "out of range"),
    _flag("device-cuda", ["--device", "cuda"], "CUDA was asked for but is not available"),
    _flag("device-unknown", ["--device", "tpu"], "tpu"),
    _flag("dtype-unknown", ["--dtype", "float8"], "unknown dtype"),
    # --lora-mode and --compile (issue 20): a bad mode, compile where it cannot run, with a bad device
    _flag("lora-mode-unknown", ["--lora-mode", "bogus"], "--lora-mode: unknown LoRA mode 'bogus'"),
    _flag("lora-mode-empty", ["--lora-mode", ""], "unknown LoRA mode ''"),
    _flag("padded-attention-bad-bytes", ["--padded-attention", "\udcff"], "unknown padded attention mode"),
    _flag("padded-attention-unknown", ["--padded-attention", "row-wise"],
          "--padded-attention: unknown padded attention mode 'row-wise'"),
    Case("generate-padded-attention-env-unknown", GEN, "--padded-attention: unknown padded attention mode 'fused'",
         env={"EVOTOK_PADDED_ATTENTION": "fused"}),
    Case("generate-compile-no-compiler", GEN + ["--compile"], "--compile: torch.compile needs a C++ compiler",
         env={"CXX": "/nonexistent/c++"}),
    _flag("compile-and-cuda", ["--compile", "--device", "cuda"], "CUDA was asked for but is not available"),
    _flag("compile-and-bad-dtype", ["--compile", "--dtype", "float8"], "unknown dtype"),
    _flag("compile-value", ["--compile=yes"], "--compile"),
    _flag("unknown-flag", ["--nope"], "No such option"),
    _flag("chat-template-value", ["--chat-template=maybe"], "chat-template"),
    # text that is not UTF-8 (undecodable argv bytes reach Python as lone surrogates)
    Case("generate-prompt-bad-bytes", BARE + ["-p", "caf\udce9"], "--prompt: text is not valid UTF-8"),
    _flag("system-bad-bytes", ["--system", "\udcff"], "--system: text is not valid UTF-8"),
    _flag("prefill-bad-bytes", ["--prefill", "<r\udcff>"], "--prefill: text is not valid UTF-8"),
    # token ids
    Case("generate-ids-text", BARE + ["--prompt-ids", "1,x"], "not a comma-separated list of token ids"),
    Case("generate-ids-negative", BARE + ["--prompt-ids", "-1,3"], "token id -1 is negative"),
    Case("generate-ids-empty", BARE + ["--prompt-ids", ","], "holds no token ids"),
    Case("generate-ids-outside", BARE + ["--prompt-ids", "99999"], "outside the vocabulary"),
    Case("generate-no-prompt", BARE, "no prompt given"),
    # prompt files
    Case("generate-prompts-missing", BARE + ["--prompts-file", "{tmp}/none.jsonl"], "prompts file does not exist"),
    Case("generate-prompts-bad-bytes", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "is not UTF-8 text (byte 0xff",
         write("p.jsonl", BAD_BYTES)),
    Case("generate-prompts-latin1", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "line 2",
         write("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')),
    Case("generate-prompts-folder", BARE + ["--prompts-file", "{tmp}"], "is a folder, not a file"),
    Case("generate-prompts-stdin-unreadable", BARE + ["--prompts-file", "-"], "standard input, which cannot be read"),
    Case("generate-prompts-loop", BARE + ["--prompts-file", "{tmp}/loop"], "symbolic link loop", _loop("loop")),
    Case("generate-prompts-not-json", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "p.jsonl:2: invalid JSON",
         write("p.jsonl", '"ok"\n{oops\n')),
    Case("generate-prompts-empty", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "no prompts in file",
         write("p.jsonl", "\n\n")),
    Case("generate-prompts-number", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "p.jsonl:1",
         write("p.jsonl", '{"prompt": 3}\n')),
    Case("generate-prompts-list", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "p.jsonl:1", write("p.jsonl", "[1]\n")),
    Case("generate-prompts-ids-negative", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "prompt_ids must be",
         write("p.jsonl", '{"prompt_ids": [1, -2]}\n')),
    Case("generate-prompts-ids-bool", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "prompt_ids must be",
         write("p.jsonl", '{"prompt_ids": [true]}\n')),
    Case("generate-prompts-system-type", BARE + ["--prompts-file", "{tmp}/p.jsonl"], '"system" is int',
         write("p.jsonl", '{"prompt": "hi", "system": 5}\n')),
    Case("generate-prompts-surrogate", BARE + ["--prompts-file", "{tmp}/p.jsonl"], "not valid UTF-8",
         write("p.jsonl", '{"prompt": "bad \\udcff"}\n')),
    # the trace output: checked before the model loads, never left half-written
    _flag("trace-folder", ["--trace", "{tmp}"], "is a folder, not a file"),
    _flag("trace-proc", ["--trace", "/proc/evotok/trace.jsonl"], "--trace: cannot write into"),
    Case("generate-trace-under-file", GEN + ["--trace", "{tmp}/f.txt/trace.jsonl"], "is a file, so", _file_parent),
    Case("generate-trace-loop", GEN + ["--trace", "{tmp}/loop"], "symbolic link loop", _loop("loop")),
    # config files
    _flag("config-missing", ["--config", "{tmp}/none.yaml"], "config file does not exist"),
    _flag("config-folder", ["--config", "{tmp}"], "is a folder, not a file"),
    Case("generate-config-bad-yaml", GEN + ["--config", "{tmp}/c.yaml"], "invalid YAML", write("c.yaml", "a: [1, 2\n")),
    Case("generate-config-bad-bytes", GEN + ["--config", "{tmp}/c.yaml"], "not UTF-8", write("c.yaml", BAD_BYTES)),
    Case("generate-config-not-mapping", GEN + ["--config", "{tmp}/c.yaml"], "expected a mapping",
         write("c.yaml", "- 1\n- 2\n")),
    Case("generate-config-typo", GEN + ["--config", "{tmp}/c.yaml"], "did you mean gen_length",
         write("c.yaml", "gen_lenght: 8\n")),
    Case("generate-config-type", ["generate", "-m", "{model}", "-p", "hi", "--config", "{tmp}/c.yaml"], "expected int",
         write("c.yaml", "gen_length: eight\n")),
    Case("generate-config-model-list", ["generate", "-p", "hi", "--config", "{tmp}/c.yaml"], "model: expected str",
         write("c.yaml", "model: [1, 2]\n")),
    Case("generate-config-trace-dict", GEN + ["--config", "{tmp}/c.yaml"], "trace: expected str",
         write("c.yaml", "trace: {a: 1}\n")),
    Case("generate-config-threshold-text", GEN + ["--config", "{tmp}/c.yaml"], "threshold: expected float",
         write("c.yaml", "threshold: high\n")),
    Case("generate-config-compile-text", GEN + ["--config", "{tmp}/c.yaml"], "compile: expected bool",
         write("c.yaml", "compile: maybe\n")),
    Case("generate-config-lora-mode", GEN + ["--config", "{tmp}/c.yaml"], "unknown LoRA mode 'fused'",
         write("c.yaml", "lora_mode: fused\n")),
    Case("generate-config-decoder-list", GEN + ["--config", "{tmp}/c.yaml"], "must be a mapping",
         write("c.yaml", "decoder: [alpha]\n")),
    Case("generate-config-decoder-option", GEN + ["--config", "{tmp}/c.yaml"], "has no option 'alphaa'",
         write("c.yaml", "decoder: {alphaa: 0.5}\n")),
    # environment variables: named when they carried the bad value
    Case("generate-env-gen-length", ["generate", "-m", "{model}", "-p", "hi"], "EVOTOK_GEN_LENGTH",
         env={"EVOTOK_GEN_LENGTH": "abc"}),
    Case("generate-env-temperature", GEN, "got nan", env={"EVOTOK_TEMPERATURE": "nan"}),
    Case("generate-env-decoder", GEN, "unknown decoder", env={"EVOTOK_DECODER": "nosuch"}),
    Case("generate-env-lora-mode", GEN, "unknown LoRA mode 'x'", env={"EVOTOK_LORA_MODE": "x"}),
    Case("generate-env-compile", GEN, "EVOTOK_COMPILE", env={"EVOTOK_COMPILE": "maybe"}),
    # models
    Case("generate-model-missing", ["generate", "-m", "{tmp}/nope", "-p", "hi"], "does not exist"),
    Case("generate-model-file", ["generate", "-m", "{tmp}/f.txt", "-p", "hi"], "f.txt", _file_parent),
    Case("generate-adapter-missing", GEN + ["--adapter", "{tmp}/nope"], "nope"),
]
