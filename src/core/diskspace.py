"""Disk space and write failures: checked before a big write, and one line when a write fails.

A full disk used to kill `prepare` with "Bus error" (a memmap page that cannot be backed is a
SIGBUS, not an exception) and to surface in `train` as torch's "PytorchStreamWriter failed";
a read-only output was a raw OSError.  Now the space a known-size file needs is checked first
and then reserved (posix_fallocate turns a later SIGBUS into ENOSPC now), and every
ENOSPC / EDQUOT / EROFS / EACCES / EPERM becomes a NoSpaceError or an OutputError naming the
path, and for space, the bytes needed and free.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from src.core.errors import BoneHealthError

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Room left beside a checked write: the small files written with it and the file system's own
# blocks (a tmpfs or ext4 rounds every file up to whole blocks).
SLACK_BYTES = 1 << 20


class OutputError(BoneHealthError):
    """An output that cannot be written: read-only, not permitted, or out of space."""


class NoSpaceError(OutputError):
    """Not enough free space for an output whose size is known."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system that holds `path` (or
    would hold it: the nearest existing parent is asked)."""
    return shutil.disk_usage(_existing(Path(path))).free


def _space(needed: int | None, free: int) -> str:
    need = f"needs {human_bytes(needed)} ({needed} bytes), " if needed else ""
    return f"{need}{human_bytes(free)} ({free} bytes) free"


def require_free(path: str | Path, needed: int, what: str) -> None:
    """Refuse before writing `needed` bytes at `path` when its file system has less free."""
    free = free_bytes(path)
    if needed + SLACK_BYTES > free:
        raise NoSpaceError(f"{what} {path}: not enough disk space: {_space(needed + SLACK_BYTES, free)}; "
                           f"free some space or choose another {what.split()[0]}")


def reserve(path: str | Path, size: int) -> None:
    """Allocate `size` bytes of the file at `path` now, so that writing through a memmap later
    cannot hit a full disk (on file systems without fallocate, the space check stands alone)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            # raised as an OSError naming the file (fallocate's names none): the caller may know
            # a better name for it, a temporary file being what the user will see under another
            failed = OSError(exc.errno, exc.strerror, str(path))
            failed.needed_bytes = size
            raise failed from None
    finally:
        os.close(fd)


def as_output_error(exc: OSError, path: str | Path | None = None, needed: int | None = None) -> OSError | OutputError:
    """The one-line error for a failed write, or `exc` itself when it is not a write failure."""
    reason = WRITE_ERRNOS.get(exc.errno)
    if reason is None:
        return exc
    where = Path(path if path is not None else (exc.filename or "?"))
    needed = needed if needed is not None else getattr(exc, "needed_bytes", None)
    if exc.errno in SPACE_ERRNOS:
        return NoSpaceError(f"cannot write {where}: {reason} ({_space(needed, free_bytes(where))})")
    return OutputError(f"cannot write {where}: {reason}")


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a write failure inside the block into one line naming `path` (not a temp name)."""
    try:
        yield
    except OSError as exc:
        converted = as_output_error(exc, path, needed)
        if converted is exc:
            raise
        raise converted from None
