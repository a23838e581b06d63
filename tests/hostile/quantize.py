"""--quantize (runtime/quantize.py) on generate, bench, serve and finetune: unknown modes, an adapter merged
into quantized weights, torch.compile over the quantized kernels, and what QLoRA cannot train."""

from __future__ import annotations

from tests.hostile import Case, Ctx
from tests.hostile.finetune import data_file, ft, resume, trained

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "sudoku4", "-m", "{model}", "--limit", "1", "--gen-length", "8", "--block-length", "4",
         "--steps", "4", "--out", "{tmp}/runs"]



def _bench_int8(ctx: Ctx) -> None:
    """A finished one-item bench run in {tmp}/runs, quantized."""
    proc = ctx.cli(*[a.format(**ctx.vars()) for a in BENCH], "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr


CASES = [
    # unknown modes, from a flag or its variable, on every command that loads a model
    Case("quant-generate-unknown", [*GEN, "--quantize", "int3"], "unknown quantization mode 'int3'"),
    Case("quant-generate-empty", [*GEN, "--quantize", ""], "unknown quantization mode ''"),
    Case("quant-generate-case", [*GEN, "--quantize", "INT8"], "unknown quantization mode 'INT8'"),
    Case("quant-generate-env", GEN, "unknown quantization mode 'nf4'", env={"EVOTOK_QUANTIZE": "nf4"}),
    Case("quant-bench-unknown", [*BENCH, "--quantize", "fp4"], "unknown quantization mode 'fp4'"),
    Case("quant-serve-unknown", ["serve", "-m", "{model}", "--quantize", "int2"], "unknown quantization mode"),
    # what a quantized load refuses before any weight is read
    Case("quant-generate-merged", [*GEN, "--adapter", "{tmp}", "--lora-mode", "merged", "--quantize", "int8"],
         "cannot be merged into int8 weights"),
    Case("quant-bench-merged", [*BENCH, "--adapter", "{tmp}", "--lora-mode", "merged", "--quantize", "int4"],
         "cannot be merged into int4 weights"),
    Case("quant-generate-compile", [*GEN, "--compile", "--quantize", "int4"],
         "--compile is not supported with --quantize int4"),
    # QLoRA: the quantized weights stay frozen and whole
    Case("quant-finetune-full", ft("--full", "--quantize", "int8"), "--full does not go with --quantize int8",
         setup=data_file),
    Case("quant-finetune-adapter", ft("--adapter", "{tmp}", "--quantize", "int4"),
         "--adapter does not go with --quantize int4", setup=data_file),
    Case("quant-finetune-fsdp", ft("--fsdp", "--quantize", "int8"), "--fsdp does not go with --quantize int8",
         setup=data_file),
    Case("quant-finetune-unknown", ft("--quantize", "int5"), "--quantize", setup=data_file),
    # a resume over another base (quantized vs not) is another run, for bench as for finetune
    Case("quant-bench-resume-other-mode", BENCH, "differs in quantize", setup=_bench_int8),
    Case("quant-bench-resume-int4-over-int8", [*BENCH, "--quantize", "int4"], "differs in quantize",
         setup=_bench_int8),
    Case("quant-finetune-resume-changed", resume("--max-steps", "2", "--quantize", "int8"), "quantize",
         setup=trained(finished=False)),
]
