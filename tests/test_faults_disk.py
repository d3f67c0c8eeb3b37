"""Full disks, read-only and forbidden outputs (issue 13, item 6), on real file systems: each
test mounts a small tmpfs in its own user and mount namespace (`unshare`, no root needed), runs
the stage there, and lists what the stage left on that file system before the mount goes.

What the user gets: exit 2 and one line naming the path (and, for space, the bytes needed and
free); no half-written store, checkpoint or temporary file left behind."""
from __future__ import annotations

import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from src.core.diskspace import as_output_error, human_bytes, require_free
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_write_bytes, sweep_stale_temps
from tests.prepare_helpers import make_dataset, make_params
from tests.train_helpers import make_tiny_store, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]
FULL = {"mode": "full", "full": {"size": [512, 1024]}}  # 512 KB a row: a store of a few MB
ROW = 512 * 1024


def _namespaces_reason() -> str | None:
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}"
    return None


NAMESPACES = _namespaces_reason()
needs_namespaces = pytest.mark.skipif(NAMESPACES is not None, reason=NAMESPACES or "")


def on_small_fs(mount: Path, size: str, argv: list[str], *,
                read_only: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `argv` (from the repository) with a fresh `size` tmpfs on `mount`; returns the
    process and the files and folders left on that tmpfs afterwards."""
    mount.mkdir(parents=True, exist_ok=True)
    listing = mount.with_name(mount.name + ".listing")
    options = f"size={size}" + (",ro" if read_only else "")
    script = (f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} || exit 99\n"
              f"{shlex.join(argv)}\nrc=$?\n"
              f"find {shlex.quote(str(mount))} -mindepth 1 -printf '%P\\n' | sort > {shlex.quote(str(listing))}\n"
              "exit $rc\n")
    proc = _unshare(["--map-root-user", "--mount", "sh", "-c", script])
    assert proc.returncode != 99, proc.stderr
    return proc, listing.read_text().split()


def as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    """Run `argv` unmapped in a user namespace: the process is `nobody` there, so the host's
    permission bits apply to it even when the tests run as root."""
    return _unshare(argv)


def _unshare(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(["unshare", "--user", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def one_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, \
        (proc.returncode, proc.stderr[-3000:])
    assert all(n in errors[0] for n in names), errors[0]
    return errors[0]


def prepare_argv(tmp_path: Path, out: Path, corrupt: bool = False) -> list[str]:
    data = make_dataset(tmp_path / "user", patients_per_class=3, visits=2)
    if corrupt:  # one unreadable image: the store is built with 12 rows, then compacted to 11
        next(iter(sorted((data["root"] / "C1").glob("*.png")))).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    params = write_params(make_params(data, out, folds=2, prepare=FULL, data={"on_bad_file": "skip"}),
                          tmp_path / "params.yaml")
    return [sys.executable, "-m", "src.prepare", "--params", params]


# ------------------------------------------------------------------------------- prepare
@needs_namespaces
def test_prepare_on_a_disk_too_small_stops_before_writing(tmp_path):
    mount = tmp_path / "disk"
    proc, left = on_small_fs(mount, "4m", prepare_argv(tmp_path, mount / "store"))
    line = one_line(proc, "prepare.out", str(mount / "store"), "not enough disk space",
                    f"({12 * ROW + (1 << 20)} bytes)", "free")
    assert "MB" in line
    assert left == [".store.bh-lock"]  # the lock file only: no store, no temporary folder


@needs_namespaces
def test_a_disk_that_fills_up_during_prepare_fails_cleanly_without_a_bus_error(tmp_path):
    """The space check passes (12 rows fit), the compaction to 11 rows does not: before this
    change a memmap on a full tmpfs died with SIGBUS (exit 135) and left its temp store behind."""
    mount = tmp_path / "disk"
    proc, left = on_small_fs(mount, "10m", prepare_argv(tmp_path, mount / "store", corrupt=True))
    one_line(proc, f"cannot write {mount / 'store' / 'images.npy'}", "no space left on device",
             f"needs {human_bytes(11 * ROW + 128)} ({11 * ROW + 128} bytes)", "free")
    assert left == [".store.bh-lock"]


@needs_namespaces
def test_prepare_into_a_read_only_file_system_is_one_line(tmp_path):
    mount = tmp_path / "disk"
    proc, left = on_small_fs(mount, "1m", prepare_argv(tmp_path, mount / "store"), read_only=True)
    one_line(proc, f"cannot write {mount / 'store'}: read-only file system")
    assert left == []


@needs_namespaces
def test_prepare_into_a_folder_it_may_not_write_is_one_line(tmp_path):
    """Unmapped in its user namespace, the process is `nobody`: a 0555 folder is forbidden to it
    (as root on the host the permission check would be skipped)."""
    shared = Path(tempfile.mkdtemp(prefix="bone-health-eacces-"))
    try:
        shared.chmod(0o755)
        argv = prepare_argv(shared, shared / "locked" / "store")
        for path in shared.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (shared / "locked").mkdir(mode=0o555)
        (shared / "locked").chmod(0o555)
        proc = as_nobody(argv)
        one_line(proc, f"cannot write {shared / 'locked' / 'store'}: permission denied")
        assert list((shared / "locked").iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)


# --------------------------------------------------------------------------------- train
@needs_namespaces
def test_train_on_a_full_disk_names_the_checkpoint_and_cleans_the_fold(tmp_path):
    """train.out on a 256 KB disk: the resume state fits, a 437 KB checkpoint does not.  Before,
    torch's own 'PytorchStreamWriter failed writing file' traceback."""
    store = make_tiny_store(tmp_path / "store", n_per_class=8, folds=2)
    mount = tmp_path / "disk"
    params = tiny_params(tmp_path, store, epochs=1, out=str(mount / "models"))
    argv = [sys.executable, "-m", "src.train", "--params", write_params(params, tmp_path / "params.yaml")]
    proc, left = on_small_fs(mount, "256k", argv)
    line = one_line(proc, f"cannot write {mount / 'models' / 'fold_0' / 'model.pt'}", "no space left on device",
                    "needs", "free")
    needed = int(line.split("needs ")[1].split("(")[1].split(" bytes")[0])
    assert needed > 256 * 1024
    assert left == [".models.bh-lock", "models", "models/cv_state.json"]  # fold_0 removed, no temp file
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:
        statuses = dict(db.execute("select name, status from runs"))
    assert statuses["fold_0"] == "FAILED"


@needs_namespaces
def test_train_into_a_read_only_file_system_is_one_line(tmp_path):
    store = make_tiny_store(tmp_path / "store", n_per_class=8, folds=2)
    mount = tmp_path / "disk"
    params = tiny_params(tmp_path, store, epochs=1, out=str(mount / "models"))
    argv = [sys.executable, "-m", "src.train", "--params", write_params(params, tmp_path / "params.yaml")]
    proc, left = on_small_fs(mount, "1m", argv, read_only=True)
    one_line(proc, f"cannot write {mount / 'models'}: read-only file system")
    assert left == []


# ------------------------------------------------------------------------------ the parts
@needs_namespaces
def test_a_memmap_larger_than_the_disk_is_refused_when_opened(tmp_path):
    """The SIGBUS itself: rows written through a memmap the disk cannot back."""
    mount = tmp_path / "disk"
    code = ("import numpy as np; from pathlib import Path; from src.artifacts.store import open_images\n"
            f"a = open_images(Path({str(mount / 'images.npy')!r}), 'uint8', (4, 1024, 1024))\n"
            "a[:] = 7; a.flush()\n")
    proc, _ = on_small_fs(mount, "2m", [sys.executable, "-c", code])
    assert proc.returncode == 1 and "No space left on device" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


def test_require_free_and_the_message_for_space(tmp_path):
    with pytest.raises(BoneHealthError, match=r"prepare.out .*: not enough disk space: needs .* bytes\), .* free"):
        require_free(tmp_path / "store", 1 << 62, "prepare.out")
    require_free(tmp_path / "store", 1024, "prepare.out")  # plenty: no error
    err = as_output_error(OSError(28, "No space left on device", str(tmp_path / "x")), needed=5000)
    assert str(err).startswith(f"cannot write {tmp_path / 'x'}: no space left on device (needs 5.0 KB (5000 bytes), ")
    other = OSError(5, "Input/output error")
    assert as_output_error(other) is other  # not a write-permission or space failure: left as it is


def test_temporary_files_of_a_dead_writer_are_swept_and_a_live_ones_kept(tmp_path):
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "store"
    stale_dir = tmp_path / f".store.{host}-{dead_pid}.abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "images.npy").write_bytes(np.zeros(10, np.uint8).tobytes())
    live = tmp_path / f".store.{host}-{os.getpid()}.def.tmp"
    live.mkdir()
    other_host = tmp_path / f".store.elsewhere-{dead_pid}.ghi.tmp"
    other_host.mkdir()
    assert sweep_stale_temps(target) == [stale_dir]
    assert live.exists() and other_host.exists() and not stale_dir.exists()
    atomic_write_bytes(tmp_path / "f.bin", b"x")  # every atomic write sweeps its own name's leftovers
    assert (tmp_path / "f.bin").read_bytes() == b"x"
