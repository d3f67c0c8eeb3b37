"""Atomic writes and content hashes: nothing we write may look complete when it is not."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.core.diskspace import as_output_error, writing
from src.core.errors import BoneHealthError
from src.core.outputs import check_replaceable, write_marker


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only be read
    by setting it, and another thread could create a file in between)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owner_tag() -> str:
    """Host and pid in every temporary name, so a later run can tell a dead writer's leftovers
    (removed: a killed run may have left gigabytes) from a live writer's (kept)."""
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:32]}-{os.getpid()}"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_owner_tag()}."


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` whose writer, on this host, is no longer alive."""
    host = _owner_tag().rsplit("-", 1)[0]
    lead = f".{path.name}.{host}-"
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            rest = entry.name[len(lead):] if entry.name.startswith(lead) else ""
            pid = rest.split(".", 1)[0]
            if not (pid.isdigit() and ".tmp" in rest) or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    with writing(path):
        fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
    # mkstemp makes 0600 files; the renamed result must get what any new file gets (a lab group
    # reads the outputs of a shared project).
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    return Path(name)


def _make_parent(path: Path) -> None:
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.
    A failed write is one line naming `path` (and `needed` bytes, when known)."""
    path = Path(path)
    _make_parent(path)
    sweep_stale_temps(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        with writing(path, needed):
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json_object(path: str | Path, missing: str, error: type[BoneHealthError] = BoneHealthError) -> dict[str, Any]:
    """A JSON file that must hold an object; every failure is one line naming the file
    (`missing` says what the file is and what to do when it is not there)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path, key: str | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in whole at the end.

    `key` is the setting that names the folder (e.g. "prepare.out"): refusals name it and the
    ownership marker records it.  An existing folder is replaced only when it is empty, ours
    or an earlier version's output (src/core/outputs.py), checked before the work starts, so a
    refusal costs nothing, and again just before the swap.  On any failure the old folder
    stays as it was."""
    path = Path(path)
    check_replaceable(path, key)
    _make_parent(path)
    sweep_stale_temps(path)
    with writing(path):
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 folders (see _tmp_sibling)
    try:
        try:
            yield tmp
        except OSError as exc:  # name the file as it will be, not its temporary folder
            inside = exc.filename and Path(exc.filename).is_relative_to(tmp)
            converted = as_output_error(exc, path / Path(exc.filename).relative_to(tmp) if inside else None)
            if converted is exc:
                raise
            raise converted from None
        write_marker(tmp, key)  # last: nothing the block logs or lists from tmp sees it
        check_replaceable(path, key)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
