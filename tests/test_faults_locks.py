"""One writer per stage output: a second run on the same output gets one line naming the holder
and exits 2 without touching anything; the lock dies with its holder, even under SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from src import evaluate, gradcam, phantom, prepare, register, train
from src.core.cli import run_main
from src.core.locks import HELD_ENV, lock_file, output_locks
from tests.prepare_helpers import make_dataset
from tests.prepare_helpers import make_params as prepare_params
from tests.train_helpers import make_tiny_store, tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]


class Holder:
    """A real second process holding the locks of {setting: path}, in its own process group."""

    def __init__(self, outputs: dict[str, str]):
        code = textwrap.dedent(f"""
            import sys, time
            from src.core.locks import output_locks
            with output_locks({outputs!r}):
                print("held", flush=True)
                time.sleep(120)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture()
def holders():
    started: list[Holder] = []

    def hold(outputs: dict[str, str]) -> Holder:
        started.append(Holder(outputs))
        return started[-1]

    yield hold
    for h in started:
        if h.proc.poll() is None:
            h.kill()


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def test_second_prepare_is_refused_and_the_lock_dies_with_its_holder(tmp_path, holders, capsys):
    data = make_dataset(tmp_path / "data", patients_per_class=4, visits=1)
    params = prepare_params(data, tmp_path / "prepared")
    pfile = write_params(params, tmp_path / "params.yaml")
    holder = holders({"prepare.out": str(tmp_path / "prepared")})

    assert run_main(prepare.main, ["--params", pfile]) == 2
    line = one_error_line(capsys)
    assert "prepare.out" in line and f"pid {holder.proc.pid}" in line and "another run is writing it" in line
    assert not (tmp_path / "prepared").exists()  # nothing was written
    assert lock_file(tmp_path / "prepared").parent == tmp_path  # beside the output, never inside it

    holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
    assert run_main(prepare.main, ["--params", pfile]) == 0
    assert (tmp_path / "prepared" / "images.npy").is_file()


def test_second_train_stops_before_any_run_or_folder(tmp_path, holders, capsys):
    store = make_tiny_store(tmp_path / "store", n_per_class=6, folds=2)
    params = tiny_params(tmp_path, store, epochs=1)
    pfile = write_params(params, tmp_path / "params.yaml")
    holder = holders({"train.out": params.train.out})
    assert run_main(train.main, ["--params", pfile]) == 2
    assert f"pid {holder.proc.pid}" in one_error_line(capsys)
    assert not Path(params.train.out).exists()
    assert not (tmp_path / "mlruns").exists()  # no MLflow run was opened, so none can be joined or killed


@pytest.mark.parametrize("stage, key", [(phantom, "phantom.masks_out"), (evaluate, "evaluate.out"),
                                        (gradcam, "gradcam.out"), (register, "register.out")])
def test_every_stage_takes_its_output_lock(tmp_path, holders, capsys, stage, key):
    store = make_tiny_store(tmp_path / "store", n_per_class=6, folds=2)
    params = tiny_params(tmp_path, store)
    overrides = {"phantom.out": tmp_path / "phantom", "phantom.masks_out": tmp_path / "phantom_masks",
                 "evaluate.out": tmp_path / "reports", "gradcam.out": tmp_path / "reports" / "gradcam",
                 "register.out": tmp_path / "reports" / "register"}
    pfile = write_params(params, tmp_path / "params.yaml")
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    holder = holders({key: str(overrides[key])})
    assert run_main(stage.main, ["--params", pfile, *sets]) == 2
    line = one_error_line(capsys)
    assert key in line and f"pid {holder.proc.pid}" in line


def test_locks_are_reentrant_for_the_children_of_a_holder(tmp_path, monkeypatch):
    out = tmp_path / "models"
    with output_locks({"train.out": out}):
        monkeypatch.setenv(HELD_ENV, "1")  # what train sets before relaunching under torchrun
        with output_locks({"train.out": out}):
            pass
        monkeypatch.delenv(HELD_ENV)
        with pytest.raises(Exception, match="train.out .*another run is writing it"):
            with output_locks({"train.out": out}):
                pass
