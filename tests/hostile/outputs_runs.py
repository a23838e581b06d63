"""Outputs we must not write and runs we must not mix (issue 30): a folder or file another run holds
(`lock-`), outputs that are devices, FIFOs, sockets, bad links or the command's own inputs, and inputs
that would block or never end (`out-`), and resumes that differ from the run they continue (`resume-`).

A lock is held by the test process itself, through an fd that setup opens and never closes (flock is per
open file, so the command's own open meets it); its pid is ours. FIFOs, sockets and /dev/zero-like
nodes live beside the case folder ({tmp}/..), where the matrix's byte snapshot does not read them."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable

from evotok_cli.base import locks
from tests.hostile import Case, Ctx, both, write
from tests.hostile.finetune import DATA, RUN, data_file, ft, trained, unfinished

HELD: list[locks.Lock] = []  # kept referenced: the locks live until the test process ends
PROMPTS = '{"prompt": "hi"}\n'
GEN = ["generate", "-m", "{model}", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "arith-small", "-m", "{model}", "--limit", "1"]
FIFO, SOCK, ZERO = "{tmp}/../fifo", "{tmp}/../sock", "{tmp}/../zero"


def hold_dir(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        lock = locks.acquire_dir(ctx.tmp / rel, "--out")
        assert lock is not None
        HELD.append(lock)
    return setup


def hold_file(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        lock = locks.acquire_file(ctx.tmp / rel, "--out")
        assert lock is not None
        HELD.append(lock)
    return setup


def link(rel: str, target: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.format(**ctx.vars()), path)
    return setup


def null_device(rel: str) -> Callable[[Ctx], None]:
    """A copy of /dev/null made with mknod (root); elsewhere a link to /dev/null, which reads the same."""
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        try:
            os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))
        except OSError:
            os.symlink("/dev/null", path)
    return setup


def zero_device(ctx: Ctx) -> None:
    """An endless input: a copy of /dev/zero beside the case folder (or a link to it)."""
    path = ctx.tmp.parent / "zero"
    try:
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 5))
    except OSError:
        os.symlink("/dev/zero", path)


def fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.tmp.parent / "fifo")


def unix_socket(ctx: Ctx) -> None:
    """A socket file beside the case folder (a FIFO where the path is too long for a socket)."""
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(ctx.tmp.parent / "sock"))
    except OSError:
        os.mkfifo(ctx.tmp.parent / "sock")
    finally:
        server.close()


def hardlink(src: str, dst: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        os.link(ctx.tmp / src, ctx.tmp / dst)
    return setup


def run_with(*extra: str) -> list[str]:
    """Resume {tmp}/run with `extra` flags appended (the last of a repeated flag wins)."""
    return ft("--resume", *extra, out=RUN)


def interrupted(*extra: str) -> Callable[[Ctx], None]:
    return trained(finished=False, extra=extra)


def copied_model(ctx: Ctx) -> None:
    shutil.copytree(ctx.model, ctx.tmp / "m")


def flip_last_byte(rel: str) -> Callable[[Ctx], None]:
    """Replace a weights file at the same path by one that differs in its last byte (the last tensor)."""
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    return setup


def run_on_copied_model(ctx: Ctx) -> None:
    copied_model(ctx)
    data_file(ctx)
    argv = [a.format(**ctx.vars()) for a in _resume_on("{tmp}/m")]
    argv.remove("--resume")
    proc = ctx.cli(*argv)
    assert proc.returncode == 0, proc.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (ctx.tmp / "run" / name).unlink(missing_ok=True)


def run_on_adapter(ctx: Ctx) -> None:
    """An adapter trained in {tmp}/a, then an interrupted run in {tmp}/run on top of it."""
    data_file(ctx)
    first = ctx.cli(*[a.format(**ctx.vars()) for a in ft(out="{tmp}/a")])
    assert first.returncode == 0, first.stderr
    interrupted("--adapter", str(ctx.tmp / "a"))(ctx)


def _resume_on(model: str, *extra: str) -> list[str]:
    argv = run_with(*extra)
    argv[argv.index("{model}")] = model
    return argv


CASES = [
    # one writer per output folder or file
    Case("lock-finetune-out-held", ft(), "another evotok run (pid", both(data_file, hold_dir("out"))),
    Case("lock-finetune-resume-held", run_with(), "is writing here", both(unfinished, hold_dir("run"))),
    Case("lock-finetune-out-through-a-link", ft(out="{tmp}/link"), "another evotok run (pid",
         both(data_file, hold_dir("real"), link("link", "{tmp}/real"))),
    Case("lock-bench-out-held", [*BENCH, "--out", "{tmp}/b"], "another evotok run (pid", hold_dir("b")),
    Case("lock-bench-out-other-spelling", [*BENCH, "--out", "{tmp}/x/../b"], "choose another --out",
         both(hold_dir("b"), lambda ctx: (ctx.tmp / "x").mkdir())),
    Case("lock-init-model-held", ["init-model", "{tmp}/m"], "another evotok run (pid", hold_dir("m")),
    Case("lock-data-out-held", ["data", "sudoku4", "--n", "2", "--out", "{tmp}/t.jsonl"], "another evotok run (pid",
         hold_file("t.jsonl")),
    Case("lock-data-out-held-new-folder", ["data", "sudoku4", "--n", "2", "--out", "{tmp}/new/t.jsonl"],
         "is writing here", hold_file("new/t.jsonl")),
    # outputs that are not regular files we own
    Case("out-generate-trace-char-device", [*GEN, "-p", "hi", "--trace", "{tmp}/null"], "is a character device",
         null_device("null")),
    Case("out-trace-html-char-device", ["trace", "{tmp}/run.jsonl", "--html", "{tmp}/null"],
         "is a character device", both(write("run.jsonl", "{}\n"), null_device("null"))),
    Case("out-data-char-device", ["data", "sudoku4", "--n", "2", "--out", "{tmp}/null"], "is a character device",
         null_device("null")),
    Case("out-data-fifo", ["data", "sudoku4", "--n", "2", "--out", FIFO], "is a FIFO, not a regular file", fifo),
    Case("out-generate-trace-fifo", [*GEN, "-p", "hi", "--trace", FIFO], "is a FIFO", fifo),
    Case("out-trace-png-socket", ["trace", "{tmp}/run.jsonl", "--png", SOCK], "not a regular file",
         both(write("run.jsonl", "{}\n"), unix_socket)),
    Case("out-data-link-to-a-device", ["data", "sudoku4", "--n", "2", "--out", "{tmp}/dev"],
         "is a character device", link("dev", "/dev/null")),
    Case("out-data-broken-link", ["data", "sudoku4", "--n", "2", "--out", "{tmp}/gone"],
         "output is a broken symbolic link", link("gone", "{tmp}/nothing")),
    Case("out-trace-html-link-to-fifo", ["trace", "{tmp}/run.jsonl", "--html", "{tmp}/l"], "is a FIFO",
         both(write("run.jsonl", "{}\n"), fifo, link("l", "{tmp}/../fifo"))),
    Case("out-bench-out-char-device", [*BENCH, "--out", "{tmp}/null"], "is a character device, not a folder",
         null_device("null")),
    Case("out-finetune-out-fifo", ft(out=FIFO), "is a FIFO, not a folder", both(data_file, fifo)),
    # outputs that are the command's own inputs
    Case("out-trace-html-is-its-input", ["trace", "{tmp}/run.jsonl", "--html", "{tmp}/run.jsonl"],
         "is also the FILE input", write("run.jsonl", "{}\n")),
    Case("out-trace-png-is-its-input-respelled", ["trace", "{tmp}/run.jsonl", "--png", "{tmp}/./x/../run.jsonl"],
         "is also the FILE input", both(write("run.jsonl", "{}\n"), lambda ctx: (ctx.tmp / "x").mkdir())),
    Case("out-trace-html-hard-link-to-input", ["trace", "{tmp}/run.jsonl", "--html", "{tmp}/h.html"],
         "is also the FILE input", both(write("run.jsonl", "{}\n"), hardlink("run.jsonl", "h.html"))),
    Case("out-trace-html-and-png-same-file", ["trace", "{tmp}/run.jsonl", "--html", "{tmp}/p", "--png", "{tmp}/p"],
         "--html and --png name the same file", write("run.jsonl", "{}\n")),
    Case("out-generate-trace-is-prompts-file", [*GEN, "--prompts-file", "{tmp}/p.jsonl", "--trace", "{tmp}/p.jsonl"],
         "is also the --prompts-file input", write("p.jsonl", PROMPTS)),
    Case("out-generate-trace-is-config", [*GEN, "-p", "hi", "--config", "{tmp}/c.yaml", "--trace", "{tmp}/c.yaml"],
         "is also the --config input", write("c.yaml", "seed: 1\n")),
    Case("out-generate-trace-links-to-prompts", [*GEN, "--prompts-file", "{tmp}/p.jsonl", "--trace", "{tmp}/l"],
         "is also the --prompts-file input", both(write("p.jsonl", PROMPTS), link("l", "{tmp}/p.jsonl"))),
    Case("out-finetune-data-is-its-loss-log", ft(data="{tmp}/out/loss_log.jsonl"), "is also the DATA input",
         write("out/loss_log.jsonl", DATA)),
    Case("out-bench-data-is-its-results", ["bench", "gsm8k", "-m", "{model}", "--data", "{tmp}/b/results.json",
                                           "--out", "{tmp}/b"], "is also the --data input",
         write("b/results.json", '{"question": "1+1?", "answer": "#### 2"}\n')),
    # inputs that would block or never end
    Case("out-finetune-data-fifo", ft(data=FIFO), "is a FIFO, not a regular file", fifo),
    Case("out-finetune-data-dev-zero", ft(data=ZERO), "is a character device", zero_device),
    Case("out-generate-prompts-fifo", [*GEN, "--prompts-file", FIFO], "is a FIFO", fifo),
    Case("out-trace-input-dev-zero", ["trace", ZERO, "--html", "{tmp}/t.html"], "is a character device",
         zero_device),
    Case("out-init-model-corpus-fifo", ["init-model", "{tmp}/m", "--corpus", FIFO], "is a FIFO", fifo),
    Case("out-generate-config-fifo", [*GEN, "-p", "hi", "--config", FIFO], "FIFO", fifo),
    # a resume that is another run
    Case("resume-other-seed", run_with("--seed", "7"), "trained with --seed 42, now 7", unfinished),
    Case("resume-other-lr", run_with("--lr", "1e-3"), "--lr 1e-05, now 0.001", unfinished),
    Case("resume-other-batch-size", run_with("--batch-size", "2"), "--batch-size 1, now 2", unfinished),
    Case("resume-other-grad-accum", run_with("--grad-accum", "2"), "--grad-accum 1, now 2", unfinished),
    Case("resume-other-warmup", run_with("--warmup", "1"), "--warmup 0, now 1", unfinished),
    Case("resume-other-max-length", run_with("--max-length", "32"), "--max-length 64, now 32", unfinished),
    Case("resume-fewer-max-steps", run_with("--max-steps", "1"), "--max-steps 2, now 1 (it may only grow)",
         interrupted("--max-steps", "2", "--save-every", "1")),
    Case("resume-more-processes", run_with(), "processes (torchrun --nproc_per_node) 1, now 2", unfinished,
         env={"WORLD_SIZE": "2"}),
    Case("resume-base-weights-replaced", _resume_on("{tmp}/m"), "base model file model.safetensors sha256",
         both(run_on_copied_model, flip_last_byte("m/model.safetensors"))),
    Case("resume-base-config-replaced", _resume_on("{tmp}/m"), "base model file config.json sha256",
         both(run_on_copied_model, lambda ctx: (ctx.tmp / "m" / "config.json").write_text(
             (ctx.tmp / "m" / "config.json").read_text().replace("{", '{"x": 1, ', 1)))),
    Case("resume-adapter-replaced", run_with("--adapter", "{tmp}/a"), "adapter file adapter_model.safetensors",
         both(run_on_adapter, flip_last_byte("a/adapter_model.safetensors"))),
]

assert all(c.id.startswith(("lock-", "out-", "resume-")) for c in CASES)
