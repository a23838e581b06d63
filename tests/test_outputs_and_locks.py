"""Issue 30 beyond the hostile matrix: two real concurrent runs into one folder, a stale lock taken over,
SIGTERM during `generate --trace`, a disk that fills up mid-write, links written through, and the
history a resume with a safe change leaves (the refusals themselves are rows of tests/hostile/outputs_runs.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evotok_cli.base import files, locks
from evotok_cli.base.errors import EvotokError
from tests.conftest import one_line_error

ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}."} for a in range(1, 4) for b in range(1, 3)]
FAST = ["--objective", "sft", "--batch-size", "1", "--grad-accum", "1", "--max-length", "64", "--min-response", "1",
        "--lora-r", "2", "--lora-alpha", "4"]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _popen(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}
    return subprocess.Popen([sys.executable, "-m", "evotok_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "TOKENIZERS_PARALLELISM": "false"})


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holds(lock: Path, pid: int) -> bool:
    try:
        return lock.read_text().strip() == str(pid)
    except OSError:
        return False


def test_two_concurrent_finetunes_into_one_folder(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "run"
    first = _popen("finetune", str(data), "-m", str(tiny_llada), "--out", str(out), *FAST, "--max-steps", "100000",
                   "--save-every", "100000")
    try:
        _wait_for(lambda: _holds(out / locks.LOCK_NAME, first.pid), "the first run's lock")
        second = cli("finetune", str(data), "-m", str(tiny_llada), "--out", str(out), *FAST, "--max-steps", "1")
        line = one_line_error(second)  # (this one runs in the test process: one torch start-up less)
        assert f"another evotok run (pid {first.pid}) is writing here" in line and "--out" in line
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err  # stopped by us (after a checkpoint once training had begun)
    assert not (out / locks.LOCK_NAME).exists()  # released on the way out


def test_a_stale_lock_is_taken_over_with_a_note(cli, tmp_path):
    out = tmp_path / "t.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from evotok_cli.base import locks; "
                               "locks.acquire_file(sys.argv[1], '--out'); print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no cleanup, the lock file stays behind with the dead pid
    holder.wait()
    lock = tmp_path / ".t.jsonl.lock"
    assert lock.read_text().strip() == str(holder.pid)
    proc = cli("data", "sudoku4", "--n", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"took over the lock of pid {holder.pid}, which is no longer running" in proc.stderr
    assert len(out.read_text().splitlines()) == 3 and not lock.exists()


def test_sigterm_during_generate_trace_leaves_no_temporary(tiny_llada, tmp_path):
    trace = tmp_path / "t.jsonl"
    prompts = [arg for i in range(64) for arg in ("-p", f"count to {i}")]
    proc = _popen("generate", "-m", str(tiny_llada), *prompts, "--gen-length", "64", "--block-length", "8",
                  "--steps", "64", "--batch-size", "1", "--trace", str(trace))
    try:
        _wait_for(lambda: any(tmp_path.glob(".t.jsonl.*.tmp")) or proc.poll() is not None, "the trace's temporary")
        assert proc.poll() is None, "generation finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the temporary nor half a trace


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root, as CI containers run; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_finished_files(cli, tiny_disk):
    first = cli("data", "sudoku4", "--n", "5", "--out", str(tiny_disk / "small.jsonl"))
    assert first.returncode == 0, first.stderr
    kept = (tiny_disk / "small.jsonl").read_bytes()
    line = one_line_error(cli("data", "arith", "--n", "100000", "--out", str(tiny_disk / "big.jsonl")))
    assert "no space left on the device" in line and "free some space" in line
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["small.jsonl"]  # no temporary, no lock, no half file
    assert (tiny_disk / "small.jsonl").read_bytes() == kept


def test_a_write_that_finds_no_room_leaves_the_old_file(tmp_path, monkeypatch):
    """The same contract without root: the rename into place fails with ENOSPC (or EDQUOT, EROFS)."""
    path = tmp_path / "out.json"
    path.write_text("old")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        def refuse(src, dst, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(files.os, "replace", refuse)
        with pytest.raises(EvotokError) as info:
            files.atomic_write_text(path, "new")
        assert str(path) in info.value.line() and info.value.line().endswith(")")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_output_link_to_a_regular_file_is_written_through(cli, tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    proc = cli("data", "sudoku4", "--n", "2", "--out", str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link kept ...
    assert len(real.read_text().splitlines()) == 2  # ... its target replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]


def test_input_size_is_bounded(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("x" * 100)
    monkeypatch.setattr(files, "MAX_INPUT_BYTES", 10)
    with pytest.raises(EvotokError, match="is larger than"):
        files.read_text(path)


def _ft(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(data), "-m", str(model), "--out", str(out), *FAST, *extra]


def test_a_safe_change_on_resume_is_recorded_in_the_history(cli, data, tiny_llada, tmp_path):
    out = tmp_path / "run"
    first = cli(*_ft(data, tiny_llada, out, "--max-steps", "2", "--save-every", "1"))
    assert first.returncode == 0, first.stderr
    longer = cli(*_ft(data, tiny_llada, out, "--max-steps", "3", "--save-every", "2", "--resume"))
    assert longer.returncode == 0, longer.stderr  # a finished run trained further: --max-steps grew
    assert "--resume: changed --max-steps 2 -> 3, --save-every 1 -> 2" in longer.stderr
    args = json.loads((out / "training_args.json").read_text())
    [entry] = args["history"]
    assert entry["resumed_at_step"] == 2
    assert entry["changed"] == {"max_steps": {"then": 2, "now": 3}, "save_every": {"then": 1, "now": 2}}
    assert [json.loads(x)["step"] for x in (out / "loss_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert args["run"]["max_steps"] == 3 and len(args["run"]["model_files"]["model.safetensors"]["sha256"]) == 64
    line = one_line_error(cli(*_ft(data, tiny_llada, out, "--max-steps", "4", "--seed", "1", "--lr", "1e-3",
                                   "--resume")))
    assert "the run was trained with --lr 1e-05, now 0.001; --seed 42, now 1" in line  # every difference, one line


def test_a_resume_rehashes_only_changed_files(tmp_path, monkeypatch):
    from evotok_cli.training import runs

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    recorded = runs.weight_files(tmp_path)
    hashed: list[str] = []
    real = runs.file_sha256
    monkeypatch.setattr(runs, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert runs.weight_files(tmp_path, recorded) == recorded and hashed == []
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    again = runs.weight_files(tmp_path, recorded)
    assert hashed == ["model.safetensors"] and again["model.safetensors"]["sha256"] != \
        recorded["model.safetensors"]["sha256"]
