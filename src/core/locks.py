"""One writer per stage output: a second run on the same output stops at once with one line
naming the holder, instead of joining the first run's MLflow run or deleting its folders.

The lock is an fcntl lock on a hidden sibling file (`.<out>.bh-lock` beside the output, never
inside it: outputs are swapped in whole).  The kernel releases it when the holder exits or is
killed, so a crashed run never leaves a stale lock behind; the file itself stays, holding the
last holder's pid for the message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Iterator, Mapping

from src.core.diskspace import writing
from src.core.errors import BoneHealthError

LOCK_SUFFIX = ".bh-lock"
# Set by a process that holds its stage's locks for the children it starts to do the work
# (train.devices > 1 relaunches itself under torchrun): the children must not wait for their parent.
HELD_ENV = "BONE_HEALTH_OUTPUT_LOCKS_HELD"


def lock_file(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _acquire(key: str, out: str | Path) -> IO[str]:
    path = lock_file(out)
    with writing(out):  # a read-only or forbidden output shows here first: name it, not the lock file
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BoneHealthError(f"{key} {out}: another run is writing it ({holder}); "
                              f"wait for it to finish or stop it, or choose another {key}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


@contextlib.contextmanager
def output_locks(outputs: Mapping[str, str | Path | None]) -> Iterator[None]:
    """Hold an exclusive lock on every output ({setting: path}) for the block; None paths are skipped.
    Taken in path order, so two stages that share outputs cannot deadlock."""
    if os.environ.get(HELD_ENV):
        yield
        return
    with contextlib.ExitStack() as stack:
        items = sorted(((str(lock_file(p)), k, p) for k, p in outputs.items() if p), key=lambda x: x[0])
        for _, key, path in items:
            stack.callback(_acquire(key, path).close)  # closing the file releases its lock
        yield
