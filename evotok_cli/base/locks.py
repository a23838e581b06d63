"""One writer per output: an advisory lock that a second evotok run on the same folder or file runs into.

Two runs writing one folder at once mix their results (two fine-tunes interleave one loss log and
overwrite each other's adapter; two benches generate every item twice), so `finetune`, `bench`,
`init-model` and `data` hold `hold_dir` / `hold_file` while they work. The lock is an exclusive
`flock` on a small file that also names the holder's pid: `.evotok.lock` inside an output folder,
`.NAME.lock` beside an output file. A second run fails at once with one line naming that pid.

The kernel drops a `flock` whenever its process ends, even on SIGKILL, so a lock file that outlived
its process is stale: the next run takes it over and says so in one line on stderr. The holder removes
the file when it is done (and a folder it had to create, if that stayed empty), so a run that fails
leaves nothing behind. Under torchrun only rank 0 takes the lock: the other ranks are its helpers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from evotok_cli.base.errors import ConfigError

LOCK_NAME = ".evotok.lock"  # inside an output folder


class Lock:
    """A held lock; `release` removes its file and the folders made for it (those that stayed empty)."""

    def __init__(self, path: Path, fd: int, made: list[Path]):
        self.path, self.fd, self.made = path, fd, made

    def release(self) -> None:
        if self.fd < 0:
            return
        with suppress(OSError):
            os.unlink(self.path)  # before the unlock: a waiting opener then sees a stale inode and retries
        os.close(self.fd)
        self.fd = -1
        _remove_empty(self.made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders made for a lock, deepest first; a folder the run filled stays."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _make_parents(folder: Path, flag: str) -> list[Path]:
    """Create `folder` and its missing parents; the ones made, deepest first."""
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {folder} ({exc.strerror})", where=flag,
                          fix="choose a writable location") from None
    return made


def _holder(fd: int) -> int | None:
    """The pid written in an open lock file (None when there is none yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _busy(lock: Path, output: Path, fd: int, flag: str) -> ConfigError:
    pid = _holder(fd)
    for _ in range(20):  # the holder may be between its flock and writing its pid
        if pid is not None:
            break
        time.sleep(0.01)
        pid = _holder(fd)
    who = f"another evotok run (pid {pid})" if pid is not None else "another evotok run"
    return ConfigError(f"{who} is writing here (lock {lock.name})", where=str(output),
                       fix=f"wait for it to finish, or choose another {flag}")


def acquire(lock: Path, output: Path, flag: str, made: list[Path] | None = None) -> Lock:
    """Take the lock file `lock` for `output`, or one line naming the run that holds it."""
    made = made or []
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {lock.name} ({exc.strerror})", where=str(output),
                              fix=f"choose a writable {flag}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            error = _busy(lock, output, fd, flag) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if error is None:
                raise ConfigError(f"cannot lock {lock.name} ({exc.strerror})", where=str(output),
                                  fix=f"choose another {flag}") from None
            raise error from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one instead
    stale = _holder(fd)
    if stale is not None and stale != os.getpid():
        print(f"note: {output}: took over the lock of pid {stale}, which is no longer running", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Lock(lock, fd, made)


def _acquire_making(lock: Path, output: Path, flag: str) -> Lock:
    """`acquire`, after making the lock's folder and its missing parents; a run that cannot take the
    lock leaves no folder behind."""
    made = _make_parents(lock.parent, flag)
    try:
        return acquire(lock, output, flag, made)
    except BaseException:
        _remove_empty(made)
        raise


def acquire_dir(folder: str | Path, flag: str) -> Lock | None:
    """The lock of an output folder (made if missing); None on a torchrun rank other than 0."""
    if not _rank_zero():
        return None
    folder = Path(folder).expanduser().resolve()  # two spellings of one folder share one lock
    return _acquire_making(folder / LOCK_NAME, folder, flag)


def acquire_file(path: str | Path, flag: str) -> Lock | None:
    """The lock of an output file, beside it (its folder made if missing); None on a rank other than 0."""
    if not _rank_zero():
        return None
    path = Path(path).expanduser().resolve()
    return _acquire_making(path.parent / f".{path.name}.lock", path, flag)


@contextmanager
def _held(lock: Lock | None) -> Iterator[None]:
    """Release `lock` however the `with` block ends (None: a rank that holds no lock)."""
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def hold_dir(folder: str | Path, flag: str) -> Iterator[None]:
    """`acquire_dir` for the length of a `with` block (taken when the block is entered)."""
    with _held(acquire_dir(folder, flag)):
        yield


@contextmanager
def hold_file(path: str | Path, flag: str) -> Iterator[None]:
    """`acquire_file` for the length of a `with` block (taken when the block is entered)."""
    with _held(acquire_file(path, flag)):
        yield
