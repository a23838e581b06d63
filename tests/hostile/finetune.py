"""Hostile fine-tunes: bad data files, output folders that cannot or must not be written (another run is
there), bad flag and config values, and --resume of a run that is finished, different or damaged. Setups
that need a run train one for a step or two on the tiny checkpoint, in the case's own folder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

from tests.hostile import BAD_BYTES, Case, Ctx, both, write

ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}."} for a in range(1, 4) for b in range(1, 3)]
DATA = "".join(json.dumps(r) + "\n" for r in ROWS)
FAST = ["--objective", "sft", "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--max-length", "64",
        "--min-response", "1", "--lora-r", "2", "--lora-alpha", "4"]
RUN = "{tmp}/run"
STATE = "run/checkpoints/checkpoint-0000001/state.json"


def ft(*extra: str, data: str = "{tmp}/data.jsonl", out: str = "{tmp}/out") -> list[str]:
    """finetune on the case's data file into a fresh folder; a data file is written by `data_file`."""
    return ["finetune", data, "-m", "{model}", "--out", out, *FAST, *extra]


def resume(*extra: str) -> list[str]:
    return ft("--resume", *extra, out=RUN)


data_file = write("data.jsonl", DATA)


def trained(*, finished: bool = True, extra: tuple[str, ...] = ()) -> Callable[[Ctx], None]:
    """A run in {tmp}/run trained for one step; unfinished: its export removed, as if interrupted after
    the last checkpoint."""
    def setup(ctx: Ctx) -> None:
        data_file(ctx)
        argv = [a.format(**ctx.vars()) for a in ft(*extra, out=RUN)]
        proc = ctx.cli(*argv)
        assert proc.returncode == 0, proc.stderr
        if not finished:
            for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
                (ctx.tmp / "run" / name).unlink(missing_ok=True)
    return setup


def unfinished(ctx: Ctx) -> None:
    trained(finished=False)(ctx)


def symlink(rel: str, target: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        os.symlink(target, ctx.tmp / rel)
    return setup


def mkdir(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / rel).mkdir(parents=True)
    return setup


def edit_state(edit: Callable[[dict], object]) -> Callable[[Ctx], None]:
    """An unfinished run whose newest state.json was changed by `edit` (which may return raw bytes)."""
    def setup(ctx: Ctx) -> None:
        unfinished(ctx)
        path = ctx.tmp / STATE
        state = json.loads(path.read_text())
        result = edit(state)
        path.write_bytes(result if isinstance(result, bytes) else json.dumps(state).encode())
    return setup


def remove(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def config(text: str) -> Callable[[Ctx], None]:
    return both(data_file, write("c.yaml", text))


def flag(case_id: str, extra: list[str], expect: str) -> Case:
    return Case(f"finetune-{case_id}", ft(*extra), expect, data_file)


CASES = [
    # the data file
    Case("finetune-data-missing", ft(data="{tmp}/nope.jsonl"), "training data does not exist"),
    Case("finetune-data-is-a-folder", ft(data="{tmp}/d"), "is a folder, not a file", mkdir("d")),
    Case("finetune-data-symlink-loop", ft(data="{tmp}/loop"), "symbolic link loop", symlink("loop", "loop")),
    Case("finetune-data-broken-symlink", ft(data="{tmp}/gone"), "broken symbolic link", symlink("gone", "nothing")),
    Case("finetune-data-not-utf8", ft(), "not UTF-8 text (byte 0xff on line 2",
         write("data.jsonl", DATA.splitlines()[0].encode() + b"\n" + BAD_BYTES)),
    Case("finetune-data-empty", ft(), "no usable examples", write("data.jsonl", "")),
    Case("finetune-data-blank-lines", ft(), "no usable examples (0 examples from 0 lines)",
         write("data.jsonl", "\n\n  \n")),
    Case("finetune-data-wrong-shape", ft(), "unrecognised line (keys: input, output)",
         write("data.jsonl", '{"input": "a", "output": "b"}\n')),
    Case("finetune-data-bad-json", ft(), "data.jsonl:2: invalid JSON",
         write("data.jsonl", DATA.splitlines()[0] + "\n{broken\n")),
    Case("finetune-data-not-an-object", ft(), "expected a JSON object", write("data.jsonl", "[1, 2]\n")),
    Case("finetune-data-nested-too-deeply", ft(), "nested too deeply", write("data.jsonl", "[" * 100_000 + "\n")),
    Case("finetune-data-one-message", ft(), "at least two turns",
         write("data.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')),
    Case("finetune-data-response-not-text", ft(), "response must be a string",
         write("data.jsonl", '{"prompt": "a", "response": 5}\n')),
    Case("finetune-data-too-long", ft("--max-length", "8"), "no usable examples", data_file),
    # the output folder
    Case("finetune-out-missing", ["finetune", "{tmp}/data.jsonl", "-m", "{model}"], "no output folder", data_file),
    Case("finetune-out-is-a-file", ft(out="{tmp}/data.jsonl"), "is a file, not a folder", data_file),
    Case("finetune-out-unwritable", ft(out="/proc/evotok-run"), "cannot write into /proc", data_file),
    Case("finetune-out-parent-is-a-file", ft(out="{tmp}/data.jsonl/run"), "is a file, so", data_file),
    Case("finetune-out-symlink-loop", ft(out="{tmp}/loop"), "output folder is a symbolic link loop",
         both(data_file, symlink("loop", "loop"))),
    Case("finetune-out-holds-a-finished-run", ft(out=RUN), "already holds a training run", trained()),
    Case("finetune-out-holds-an-interrupted-run", ft(out=RUN), "pass --resume to continue it", unfinished),
    Case("finetune-out-holds-a-loss-log", ft(), "already holds a training run (loss_log.jsonl)",
         both(data_file, write("out/loss_log.jsonl", '{"step": 1, "loss": 1.0}\n'))),
    Case("finetune-out-is-a-model-folder", ft(), "already holds a training run (config.json)",
         both(data_file, write("out/config.json", "{}"))),
    # flag values
    flag("lr-zero", ["--lr", "0"], "learning rate must be > 0"),
    flag("lr-negative", ["--lr", "-1e-5"], "learning rate must be > 0"),
    flag("lr-not-a-number", ["--lr", "fast"], "Invalid value for '--lr'"),
    flag("batch-size-zero", ["--batch-size", "0"], "batch size must be >= 1"),
    flag("grad-accum-zero", ["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    flag("lora-r-zero", ["--lora-r", "0"], "LoRA rank must be >= 1"),
    flag("lora-alpha-negative", ["--lora-alpha", "-4"], "--lora-alpha: must be > 0"),
    flag("lora-dropout-one", ["--lora-dropout", "1"], "--lora-dropout: must be in [0, 1)"),
    flag("lora-targets-empty", ["--lora-targets", ","], "no module names given"),
    flag("lora-targets-no-linear-layer", ["--lora-targets", "q_proj,nonsense"], "'nonsense' is not a linear layer"),
    flag("alpha-range-reversed", ["--alpha-range", "1.0,0.5"], "need two values 0 <= lo <= hi <= 1"),
    flag("alpha-range-one-value", ["--alpha-range", "0.5"], "need two values"),
    flag("alpha-range-junk", ["--alpha-range", "a,b"], "is not a comma-separated list of float"),
    flag("decode-counts-junk", ["--decode-counts", "1,two"], "is not a comma-separated list of int"),
    flag("decode-counts-zero", ["--decode-counts", "0,1"], "counts must be >= 1"),
    flag("decode-counts-empty", ["--decode-counts", ","], "counts must be >= 1"),
    flag("block-sizes-zero", ["--block-sizes", "0"], "sizes must be >= 1"),
    flag("unknown-objective", ["--objective", "rlhf"], "unknown objective 'rlhf'"),
    flag("full-with-d2f", ["--objective", "d2f", "--full"], "needs LoRA"),
    flag("max-steps-zero", ["--max-steps", "0"], "--max-steps: must be >= 1"),
    Case("finetune-epochs-zero", ["finetune", "{tmp}/data.jsonl", "-m", "{model}", "--out", "{tmp}/out", "--epochs",
                                  "0"], "nothing to train", data_file),
    Case("finetune-epochs-infinite", ["finetune", "{tmp}/data.jsonl", "-m", "{model}", "--out", "{tmp}/out",
                                      "--epochs", "inf"], "--epochs: must be finite", data_file),
    flag("lr-infinite", ["--lr", "inf"], "learning rate must be > 0 and finite"),
    flag("min-response-negative", ["--min-response", "-1"], "--min-response: must be >= 0"),
    flag("max-length-tiny", ["--max-length", "4"], "--max-length: must be >= 8"),
    flag("warmup-negative", ["--warmup", "-3"], "--warmup: must be >= 0"),
    flag("keep-checkpoints-negative", ["--keep-checkpoints", "-1"], "--keep-checkpoints: must be >= 0"),
    flag("response-length-zero", ["--response-length", "0"], "--response-length: must be >= 1"),
    flag("save-every-zero", ["--save-every", "0"], "--save-every: must be >= 1"),
    # --config
    Case("finetune-config-missing", ft("--config", "{tmp}/none.yaml"), "config file", data_file),
    Case("finetune-config-wrong-type", ft("--config", "{tmp}/c.yaml"), "lr: expected float", config("lr: fast\n")),
    Case("finetune-config-unknown-key", ft("--config", "{tmp}/c.yaml"), "unknown option 'lora_rank'",
         config("lora_rank: 8\n")),
    Case("finetune-config-not-a-mapping", ft("--config", "{tmp}/c.yaml"), "expected a mapping",
         config("- lr\n- 1e-5\n")),
    Case("finetune-config-max-steps-text", ["finetune", "{tmp}/data.jsonl", "-m", "{model}", "--out", "{tmp}/out",
                                            "--config", "{tmp}/c.yaml"], "max_steps: expected int, got 'ten'",
         config("max_steps: ten\n")),
    Case("finetune-config-model-number", ["finetune", "{tmp}/data.jsonl", "--out", "{tmp}/out", "--config",
                                          "{tmp}/c.yaml"], "model folder does not exist", config("model: 5\n")),
    Case("finetune-config-adapter-list", ft("--config", "{tmp}/c.yaml"), "adapter: expected str",
         config("adapter: [a, b]\n")),
    Case("finetune-config-log-every-zero", ft("--config", "{tmp}/c.yaml"), "log_every: must be >= 1",
         config("log_every: 0\n")),
    Case("finetune-config-d2f-mask-range", ft("--config", "{tmp}/c.yaml"), "d2f_mask_range: need two values",
         config("d2f_mask_range: 0.9,0.1\n")),
    Case("finetune-config-decoder-section", ft("--config", "{tmp}/c.yaml"), "`decoder:` has no meaning",
         config("decoder:\n  alpha: 0.5\n")),
    # --resume
    Case("finetune-resume-finished-run", resume(), "the run already finished at step 1", trained()),
    Case("finetune-resume-other-lora-r", resume("--lora-r", "8"), "trained with --lora-r 2, now 8", unfinished),
    Case("finetune-resume-other-lora-alpha", resume("--lora-alpha", "16"), "--lora-alpha 4.0, now 16.0",
         unfinished),
    Case("finetune-resume-other-objective", resume("--objective", "cts"), "--objective sft, now cts", unfinished),
    Case("finetune-resume-other-targets", resume("--lora-targets", "q_proj"), "--lora-targets", unfinished),
    Case("finetune-resume-full-over-lora", resume("--full"), "--full/--lora False, now True", unfinished),
    Case("finetune-resume-other-model", resume(*["-m", "{dream}"]), "trained with --model", unfinished),
    Case("finetune-resume-data-changed", resume(), "the training data changed since the run started",
         both(unfinished, write("data.jsonl", DATA + DATA))),
    Case("finetune-resume-state-step-text", resume(), "'step' should be a count, got \"abc\"",
         edit_state(lambda s: s.update(step="abc"))),
    Case("finetune-resume-state-step-negative", resume(), "'step' should be a count",
         edit_state(lambda s: s.update(step=-1))),
    Case("finetune-resume-state-missing-key", resume(), "state.json lacks 'micro'",
         edit_state(lambda s: s.pop("micro"))),
    Case("finetune-resume-state-not-json", resume(), "state.json is not valid JSON",
         edit_state(lambda s: b'{"step": 1,')),
    Case("finetune-resume-state-nested-too-deeply", resume(), "nested too deeply",
         edit_state(lambda s: b"[" * 100_000)),
    Case("finetune-resume-state-not-utf8", resume(), "not UTF-8", edit_state(lambda s: BAD_BYTES)),
    Case("finetune-resume-state-not-an-object", resume(), "not a JSON object", edit_state(lambda s: b"[1]")),
    Case("finetune-resume-state-missing", resume(), "state.json does not exist",
         both(unfinished, remove(STATE))),
    Case("finetune-resume-weights-damaged", resume(), "cannot read training checkpoint",
         both(unfinished, write("run/checkpoints/checkpoint-0000001/model.safetensors", b"not safetensors"))),
    Case("finetune-resume-export-without-checkpoint", resume(), "nothing to resume",
         both(trained(), remove("run/checkpoints"))),
    Case("finetune-resume-checkpoints-is-a-file", resume(), "checkpoints is not a folder",
         both(data_file, write("run/checkpoints", "x"))),
    Case("finetune-resume-training-args-damaged", resume(), "training_args.json is not valid JSON",
         both(data_file, write("run/training_args.json", "{"))),
]
