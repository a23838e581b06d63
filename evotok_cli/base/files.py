"""Reading the user's files and writing ours without surprises.

Inputs: a missing file, a folder, a symlink loop, a FIFO or device (which would block or never end),
unreadable or non-UTF-8 bytes, a file over `MAX_INPUT_BYTES` each become one `DataError` line naming the
file (and the byte offset), never a `UnicodeDecodeError` traceback or a hang.
Outputs: every command checks its output paths *before* the work starts (a folder where a file is
wanted, a file where a folder is wanted, a place nothing can be created in, a device, FIFO or socket, an
output that is one of the command's own inputs), and writes through a temporary sibling that is renamed
into place, so a crash, a signal or a full disk never leaves half a file, and a failed write never leaves
the temporary behind. An output path that is a symbolic link is written through when the link points to
a regular file: that file is replaced and the link kept; a link to anything else (nothing, a folder, a
device) is refused. A full disk, a read-only file system or a spent quota is one line (`disk_error`).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from evotok_cli.base.errors import ConfigError, DataError, EvotokError

MAX_INPUT_BYTES = 1 << 30  # no input we read whole is this large; /proc-like files report no size at all
NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only"}


def _stat_problem(path: Path) -> str | None:
    """Why `path` cannot be opened as an existing file or folder, or None when it can."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if exc.errno == errno.ENOENT:
            return "is a broken symbolic link" if path.is_symlink() else "does not exist"
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        return f"cannot be opened ({exc.strerror})"
    return None


def input_file(path: str | Path, *, what: str, fix: str, error: type = DataError) -> Path:
    """`path` as an existing regular file, or one line saying what is wrong with it."""
    p = Path(path).expanduser()
    problem = _stat_problem(p)
    if problem is None and p.is_dir():
        problem = "is a folder, not a file"
    elif problem is None and special_kind(p):
        problem = f"is {special_kind(p)}, not a regular file (reading it could block or never end)"
    if problem is not None:
        raise error(f"{what} {problem}", where=str(p), fix=fix)
    return p


def special_kind(path: Path) -> str | None:
    """'a FIFO', 'a character device', ... for what `path` (followed) is when it exists and is neither a
    regular file nor a folder; else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def input_dir(path: str | Path, *, what: str, fix: str, error: type = DataError) -> Path:
    """`path` as an existing folder, or one line saying what is wrong with it."""
    p = Path(path).expanduser()
    problem = _stat_problem(p)
    if problem is None and not p.is_dir():
        problem = "is a file, not a folder"
    if problem is not None:
        raise error(f"{what} {problem}", where=str(p), fix=fix)
    return p


def decode_utf8(data: bytes, where: str, *, what: str = "file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}, offset {exc.start})",
                        where=where, fix="save it as UTF-8") from None


def read_text(path: str | Path, *, what: str = "file", fix: str = "pass a readable UTF-8 text file",
              error: type = DataError) -> str:
    """The whole file as text; every way of failing is one line naming the file."""
    p = input_file(path, what=what, fix=fix, error=error)
    chunks: list[bytes] = []
    size = 0
    try:
        with open(p, "rb", buffering=0) as handle:
            while size <= MAX_INPUT_BYTES:  # bounded: a file that grows as it is read ends here
                chunk = handle.read(1 << 24)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror})", where=str(p), fix=fix) from None
    data = b"".join(chunks)
    if size > MAX_INPUT_BYTES:
        raise error(f"{what} is larger than {MAX_INPUT_BYTES >> 30} GiB", where=str(p),
                    fix="split it into smaller files")
    return decode_utf8(data, str(p), what=what)


def read_stdin_text(*, what: str = "input") -> str:
    """Standard input as text, for a user who names it (`-`): a pipe is what they mean, so it is not
    refused like a FIFO they did not name; bounded like a file."""
    import sys

    if sys.stdin is None:
        raise DataError(f"{what} is standard input, which is closed", where="-",
                        fix="pipe the input in, or pass a file")
    if sys.stdin.isatty():
        print(f"note: reading the {what} from standard input (end it with Ctrl-D)", file=sys.stderr)
    try:
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    except (OSError, ValueError) as exc:  # not readable (a closed or captured stream, a broken socket)
        raise DataError(f"{what} is standard input, which cannot be read ({exc})", where="-",
                        fix="pipe the input in, or pass a file") from None
    if len(data) > MAX_INPUT_BYTES:
        raise DataError(f"{what} is larger than {MAX_INPUT_BYTES >> 30} GiB", where="-",
                        fix="split it into smaller files")
    return decode_utf8(data, "<stdin>", what=what)


def check_text(value: str, where: str) -> str:
    """Command-line text that carries undecodable bytes (Python keeps them as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"text is not valid UTF-8 (bad byte at character {exc.start})", where=where,
                          fix="pass UTF-8 text") from None
    return value


def _nearest_existing(p: Path) -> Path:
    for candidate in (p, *p.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe_writable(folder: Path, flag: str) -> None:
    """Create and delete one empty file in `folder`: the only test that holds for root and odd
    file systems (/proc, read-only mounts) alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=".evotok-probe-", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write into {folder} ({exc.strerror})", where=flag,
                          fix="choose a writable location") from None
    os.close(fd)
    os.unlink(name)


def _check_parent(p: Path, flag: str) -> None:
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise ConfigError(f"{base} is a file, so {p} cannot be created", where=flag,
                          fix="choose a path whose parent is a folder")
    _probe_writable(base, flag)


def output_file(path: str | Path, flag: str, *, overwrite: bool = True) -> Path:
    """Check, before any work, that a file can be written at `path` (its parent folder may be created):
    nothing but a regular file (or a link to one) is ever replaced."""
    p = Path(path).expanduser()
    problem = _stat_problem(p) if os.path.lexists(p) else None
    if problem in ("is a symbolic link loop", "is a broken symbolic link"):
        raise ConfigError(f"output {problem}", where=flag,
                          fix="choose another path (a link is written through only to a regular file)")
    if p.is_dir():
        raise ConfigError(f"{p} is a folder, not a file", where=flag, fix="pass a file path, e.g. out.jsonl")
    _refuse_special(p, flag)
    if p.exists() and not overwrite:
        raise ConfigError(f"{p} already exists", where=flag, fix="choose a new path or remove the file")
    _check_parent(Path(os.path.realpath(p)), flag)
    return p


def _refuse_special(p: Path, where: str) -> None:
    kind = special_kind(p)
    if kind is not None:
        raise ConfigError(f"{p} is {kind}, not a regular file, so it is not replaced", where=where,
                          fix="choose a regular file path")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links, `..`, hard links), also when neither exists yet."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def not_an_input(path: str | Path, flag: str, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is one of the command's inputs (`inputs`: its flag -> path): writing it
    would destroy what the command reads (`trace run.jsonl --html run.jsonl`)."""
    for source_flag, source in inputs.items():
        if source is not None and same_file(path, source):
            raise ConfigError(f"{path} is also the {source_flag} input, which writing it would destroy", where=flag,
                              fix="write the output to another path")


def disk_error(exc: OSError, path: str | Path | None = None) -> EvotokError | None:
    """One line for a write that failed for want of room or a writable file system; None for others."""
    what = NO_ROOM.get(exc.errno)  # type: ignore[arg-type]
    if what is None:
        return None
    where = str(path or exc.filename or "write")
    return EvotokError(f"cannot write: {what}", where=where,
                       fix="free some space (or remount read-write) and run again; finished files were kept")


def output_dir(path: str | Path, flag: str) -> Path:
    """Check, before any work, that `path` is a folder or can be created as one. Creates nothing."""
    p = Path(path).expanduser()
    if os.path.lexists(p):
        problem = _stat_problem(p)
        if problem is not None:
            raise ConfigError(f"output folder {problem}", where=flag, fix="choose another folder")
        if not p.is_dir():
            kind = special_kind(p) or "a file"
            raise ConfigError(f"{p} is {kind}, not a folder", where=flag, fix="choose a folder path")
        _probe_writable(p, flag)
        return p
    _check_parent(p, flag)
    return p


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[TextIO]:
    """Write `path` through a temporary sibling renamed into place on success, removed on failure."""
    p = Path(path)
    if p.is_symlink():  # write through the link: its regular target is replaced, the link stays
        p = Path(os.path.realpath(p))
    _refuse_special(p, str(path))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, p)
    except BaseException as exc:  # a failure, Ctrl-C or SIGTERM (cli.main makes it an exception)
        with suppress(OSError):
            os.unlink(tmp)
        full = disk_error(exc, p) if isinstance(exc, OSError) else None
        if full is not None:
            raise full from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
