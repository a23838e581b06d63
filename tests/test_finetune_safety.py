"""`evotok finetune` never loses or mixes a run: a used --out is refused without --resume, an interrupted
run exits non-zero after its checkpoint and resumes to the end, a torn loss log does not stop a resume,
and a run without a terminal still reports progress. (The refusals themselves are in tests/hostile.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import one_line_error

ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}."} for a in range(1, 7) for b in range(1, 5)]
FAST = ["--objective", "sft", "--batch-size", "1", "--grad-accum", "1", "--max-length", "64", "--min-response", "1",
        "--lora-r", "2", "--lora-alpha", "4"]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(data), "-m", str(model), "--out", str(out), *FAST, *extra]


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "loss_log.jsonl").read_text().splitlines()]


def _interrupt_after_export(out: Path, keep_step: int) -> None:
    """What an interruption after checkpoint `keep_step` leaves: later checkpoints and the export gone."""
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.rsplit("-", 1)[1]) > keep_step:
            shutil.rmtree(ckpt)
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (out / name).unlink(missing_ok=True)


def test_a_used_out_is_refused_and_resume_continues_the_same_run(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty existing folder is fine
    first = cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--save-every", "1"))
    assert first.returncode == 0, first.stderr
    _interrupt_after_export(out, keep_step=1)
    log_before = (out / "loss_log.jsonl").read_bytes()
    line = one_line_error(cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--save-every", "1")))
    assert "already holds a training run" in line and "--resume" in line
    assert (out / "loss_log.jsonl").read_bytes() == log_before
    again = cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--save-every", "1", "--resume"))
    assert again.returncode == 0, again.stderr
    assert "resumed from checkpoint-0000001" in again.stderr
    assert _log_steps(out) == [1, 2, 3]
    args = json.loads((out / "training_args.json").read_text())
    assert args["run"]["lora_r"] == 2 and len(args["run"]["data_sha256"]) == 64
    adapter = (out / "adapter_model.safetensors").read_bytes()
    line = one_line_error(cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--resume")))
    assert "already finished at step 3" in line
    assert (out / "adapter_model.safetensors").read_bytes() == adapter


def test_resume_of_an_empty_folder_starts_from_step_zero(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "fresh"
    proc = cli(*_args(data, tiny_llada, out, "--max-steps", "1", "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoint" in proc.stderr and "starting from step 0" in proc.stderr
    assert _log_steps(out) == [1]


def test_a_torn_loss_log_is_trimmed_on_resume(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "run"
    assert cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--save-every", "1")).returncode == 0
    _interrupt_after_export(out, keep_step=2)
    with (out / "loss_log.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.12')  # the crash hit mid-append
    proc = cli(*_args(data, tiny_llada, out, "--max-steps", "3", "--save-every", "1", "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "dropped 1 unreadable line" in proc.stderr
    assert _log_steps(out) == [1, 2, 3]


def test_min_response_zero_means_zero(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "run"
    proc = cli("finetune", str(data), "-m", str(tiny_llada), "--out", str(out), "--objective", "cts",
               "--min-response", "0", "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1",
               "--trajectory-steps", "1", "--block-sizes", "8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "training_args.json").read_text())["min_response"] == 0
    unset = tmp_path / "unset"
    proc = cli("finetune", str(data), "-m", str(tiny_llada), "--out", str(unset), "--objective", "cts")
    assert "no usable examples" in one_line_error(proc)  # cts's default of 32 response tokens skips them all


def test_progress_without_a_terminal_reports_every_tenth_and_every_30_seconds():
    from evotok_cli.training.progress import TrainProgress as _TrainProgress

    class Console:
        is_terminal = False

        def __init__(self):
            self.lines: list[str] = []

        def print(self, text: str) -> None:
            self.lines.append(text)

    record = {"loss": 1.0, "pass_losses": [1.0], "lr": 1e-5, "tokens_per_s": 10.0}
    console = Console()
    with _TrainProgress(console, 100, 1000) as bar:
        now = [0.0]
        bar.clock, bar.last = (lambda: now[0]), 0.0
        for step in range(1, 101):
            now[0] += 1.0 if step != 15 else 40.0  # step 15 took 40 s
            bar.update(step, 100, record)
    steps = [int(line.split()[1].split("/")[0]) for line in console.lines]
    assert steps[:3] == [10, 15, 20]  # every 10% of the steps, and after 30 s without a line
    assert steps[-1] == 100 and len(steps) == 11


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {k: v for k, v in env.items() if not k.startswith("EVOTOK_")}
    return subprocess.Popen([sys.executable, "-m", "evotok_cli", *args], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_finetune_exits_non_zero_after_its_checkpoint(data, tiny_llada, tmp_path, cli, sig, code):
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("log_every: 1\n")
    args = _args(data, tiny_llada, out, "--max-steps", "400", "--save-every", "1000", "--config",
                 str(tmp_path / "c.yaml"))
    proc = _start(args, tmp_path)
    stderr = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        stderr.append(line)
        if line.startswith("step 1/400"):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(stderr)
    stderr.append(proc.stderr.read())
    assert proc.wait(timeout=300) == code, "".join(stderr)
    text = " ".join("".join(stderr).split())  # rich may wrap long lines
    assert f"{sig.name}: saved" in text and "continue with --resume" in text and "Traceback" not in text
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (out / "adapter_model.safetensors").exists()
    stopped_at = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert 1 <= stopped_at < 400
    if sig == signal.SIGTERM:  # and the same command with --resume finishes the run
        done = cli(*args, "--resume")
        assert done.returncode == 0, done.stderr
        assert _log_steps(out) == list(range(1, 401))
        assert (out / "adapter_model.safetensors").is_file()
