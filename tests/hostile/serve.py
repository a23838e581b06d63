"""`evotok serve`: bad flags, folders and settings, each refused in one line before the port is bound."""

from __future__ import annotations

import json
import shutil

from tests.hostile import Case, Ctx, write


def _model_copy(generation_config: dict) -> object:
    """A copy of the tiny model whose generation_config.json says `generation_config`."""
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.model, ctx.tmp / "m")
        (ctx.tmp / "m" / "generation_config.json").write_text(json.dumps(generation_config))
    return setup


M = ["-m", "{model}"]

CASES = [
    Case("serve-port-negative", ["serve", *M, "--port", "-1"], "--port"),
    Case("serve-port-too-big", ["serve", *M, "--port", "70000"], "65535"),
    Case("serve-port-text", ["serve", *M, "--port", "http"], "--port"),
    Case("serve-max-rows-zero", ["serve", *M, "--max-rows", "0"], "--max-rows"),
    Case("serve-max-tokens-in-flight-zero", ["serve", *M, "--max-tokens-in-flight", "0"], "--max-tokens-in-flight"),
    Case("serve-max-tokens-in-flight-text", ["serve", *M, "--max-tokens-in-flight", "many"], "--max-tokens-in-flight"),
    Case("serve-max-rows-text", ["serve", *M, "--max-rows", "many"], "--max-rows"),
    Case("serve-max-queue-negative", ["serve", *M, "--max-queue", "-1"], "--max-queue"),
    Case("serve-timeout-zero", ["serve", *M, "--timeout", "0"], "--timeout: 0.0 is not a positive number"),
    Case("serve-timeout-nan", ["serve", *M, "--timeout", "nan"], "--timeout: nan"),
    Case("serve-timeout-inf", ["serve", *M, "--timeout", "inf"], "--timeout: inf"),
    Case("serve-grace-negative", ["serve", *M, "--grace", "-1"], "--grace"),
    Case("serve-host-empty", ["serve", *M, "--host", " "], "--host: empty host"),
    Case("serve-api-key-empty", ["serve", *M, "--api-key", ""], "--api-key: empty API key"),
    Case("serve-api-key-bad-bytes", ["serve", *M, "--api-key", "k\udcff"], "--api-key: text is not valid UTF-8"),
    Case("serve-decoder-unknown", ["serve", *M, "-d", "hard_mask"], "unknown decoder 'hard_mask'"),
    Case("serve-model-missing", ["serve", "-m", "{tmp}/none"], "model folder does not exist"),
    Case("serve-model-file", ["serve", "-m", "{tmp}/f.txt"], "is a file, not a folder", write("f.txt", "x\n")),
    Case("serve-model-bad-defaults", ["serve", "-m", "{tmp}/m"], "generation_config.json",
         _model_copy({"evotok": {"gen_length": "many"}})),
    Case("serve-model-defaults-vs-decoder", ["serve", "-m", "{tmp}/m"], "not divisible",
         _model_copy({"evotok": {"gen_length": 48, "block_length": 10, "steps": 48}})),
    Case("serve-adapter-missing", ["serve", *M, "--adapter", "{tmp}/none"], "adapter folder does not exist"),
    Case("serve-adapter-file", ["serve", *M, "--adapter", "{tmp}/f.txt"], "is a file, not a folder",
         write("f.txt", "x\n")),
    Case("serve-device-unknown", ["serve", *M, "--device", "tpu"], "--device"),
    Case("serve-dtype-unknown", ["serve", *M, "--dtype", "float8"], "unknown dtype 'float8'"),
    Case("serve-lora-mode-unknown", ["serve", *M, "--lora-mode", "fused"], "--lora-mode: unknown LoRA mode 'fused'"),
    Case("serve-padded-attention-unknown", ["serve", *M, "--padded-attention", ""],
         "--padded-attention: unknown padded attention mode ''"),
    Case("serve-compile-no-compiler", ["serve", *M, "--compile"], "--compile: torch.compile needs a C++ compiler",
         env={"CXX": "/nonexistent/c++"}),
    Case("serve-env-decoder", ["serve", *M], "unknown decoder 'evo'", env={"EVOTOK_DECODER": "evo"}),
    # the limits on clients (issue 30): connections, read deadlines, Host headers
    Case("serve-max-connections-zero", ["serve", *M, "--max-connections", "0"], "--max-connections"),
    Case("serve-max-connections-negative", ["serve", *M, "--max-connections", "-5"], "--max-connections"),
    Case("serve-max-connections-text", ["serve", *M, "--max-connections", "lots"], "--max-connections"),
    Case("serve-max-connections-huge", ["serve", *M, "--max-connections", "1000000"], "--max-connections"),
    Case("serve-read-timeout-zero", ["serve", *M, "--read-timeout", "0"],
         "--read-timeout: 0.0 is not a positive number"),
    Case("serve-read-timeout-negative", ["serve", *M, "--read-timeout", "-1"], "--read-timeout: -1.0"),
    Case("serve-read-timeout-nan", ["serve", *M, "--read-timeout", "nan"], "--read-timeout: nan"),
    Case("serve-read-timeout-inf", ["serve", *M, "--read-timeout", "inf"], "--read-timeout: inf"),
    Case("serve-read-timeout-text", ["serve", *M, "--read-timeout", "slow"], "--read-timeout"),
    Case("serve-allowed-hosts-empty", ["serve", *M, "--allowed-hosts", ""],
         "--allowed-hosts: '' is not a host name or address"),
    Case("serve-allowed-hosts-port", ["serve", *M, "--allowed-hosts", "example.com:8000"],
         "'example.com:8000' is not a host name"),
    Case("serve-allowed-hosts-url", ["serve", *M, "--allowed-hosts", "http://example.com"],
         "'http://example.com' is not a host name"),
    Case("serve-allowed-hosts-star-and-names", ["serve", *M, "--allowed-hosts", "*,example.com"],
         "'*' is not a host name"),
    Case("serve-allowed-hosts-glob", ["serve", *M, "--allowed-hosts", "*.example.com"],
         "'*.example.com' is not a host name"),
    Case("serve-allowed-hosts-space", ["serve", *M, "--allowed-hosts", "local host"], "'local host' is not a host"),
    Case("serve-allowed-hosts-trailing-comma", ["serve", *M, "--allowed-hosts", "localhost,"],
         "'' is not a host name"),
    Case("serve-allowed-hosts-bad-bytes", ["serve", *M, "--allowed-hosts", "h\udcff"], "--allowed-hosts"),
]
