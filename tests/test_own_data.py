"""A user's own radiographs on the first try (issue 15): a plain two-class folder with class
names of its own (healthy/osteoporotic), JPEG and PNG, grey and RGB, sizes 700-1800 px, no
manifest, no boxes, patient ids in the file names, runs inspect -> prepare -> train -> evaluate
-> gradcam -> register -> predict through the real CLIs with only `data.root` and
`data.positive_class` set among the data settings.  The other settings below only put the
outputs in a temporary folder and keep the run small (tiny model, one epoch, one thread)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.foreign_data import make_foreign_xrays
from tests.train_helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_data")
    xrays = make_foreign_xrays(tmp / "xrays")
    where = {
        "prepare.out": tmp / "store", "train.out": tmp / "models", "evaluate.out": tmp / "reports",
        "gradcam.out": tmp / "reports" / "gradcam", "register.out": tmp / "reports" / "registry",
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}", "mlflow.artifact_root": tmp / "mlruns" / "a",
        "train.model": TINY_MODEL, "train.epochs": 1, "train.threads": 1,
    }
    sets = [a for k, v in where.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def cli(stage: str, *args: str, data: bool = True) -> subprocess.CompletedProcess:
        data_sets = ["--set", f"data.root={xrays}", "--set", "data.positive_class=osteoporotic"] if data else \
            ["--set", f"data.root={xrays}"]
        return subprocess.run([sys.executable, "-m", f"src.{stage}", *args, *data_sets, *sets], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    return {"cli": cli, "tmp": tmp, "xrays": xrays}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_1_inspect_describes_the_folder_and_writes_an_overlay(run):
    without = run["cli"]("prepare", "--inspect", data=False)
    out = ok(without).stdout
    assert "2 classes, 22 images" in out
    for text in ("healthy", "osteoporotic", "JPEG", "PNG", "RGB", " L ", "boxes: 0 of 22 images -> prepare.mode auto -> "
                 "full", "16 patients, 1-2 images each", "store: 22 x 384x512", "change aspect ratio",
                 "data.positive_class 'C3' is not a class here", "--set data.positive_class=osteoporotic"):
        assert text in out, (text, out)
    refused = run["cli"]("prepare", "--inspect", "--write-overlay", str(run["tmp"] / "mine.yaml"), data=False)
    assert refused.returncode == 2 and "choose the positive class first" in refused.stderr

    written = ok(run["cli"]("prepare", "--inspect", "--write-overlay", str(run["tmp"] / "mine.yaml")))
    assert "wrote" in written.stdout
    overlay = yaml.safe_load((run["tmp"] / "mine.yaml").read_text())
    assert overlay["data"]["positive_class"] == "osteoporotic" and overlay["prepare"] == {
        "mode": "full", "full": {"size": [384, 512]}}
    assert not (run["tmp"] / "store").exists()  # inspect writes no store


def test_2_the_pipeline_runs_on_data_root_and_positive_class_alone(run):
    prep = ok(run["cli"]("prepare")).stdout
    assert "prepare.mode auto -> full: 0 of 22 images have a box" in prep
    assert "patients from file names" in prep and "(auto:" in prep
    assert "warning: 14 of 22 images change aspect ratio" in prep
    meta = json.loads((run["tmp"] / "store" / "meta.json").read_text())
    assert meta["mode"] == "full" and meta["size"] == [384, 512] and meta["classes"] == ["healthy", "osteoporotic"]
    manifest = (run["tmp"] / "store" / "manifest.csv").read_text()
    assert "pt0000" in manifest  # the two visits of pt0000 are one patient, kept in one fold

    train = ok(run["cli"]("train"))
    assert "warning: training from scratch on" in train.stderr and "small inner validation split" in train.stderr
    cv = json.loads((run["tmp"] / "models" / "cv.json").read_text())
    assert any("from scratch" in w for w in cv["warnings"])

    ok(run["cli"]("evaluate"))
    metrics = json.loads((run["tmp"] / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["oof_roc_auc"] <= 1.0 and "from scratch" in metrics["data_warnings"]
    ok(run["cli"]("gradcam"))

    ok(run["cli"]("register"))
    card = (run["tmp"] / "reports" / "registry" / "model_card.md").read_text()
    assert "healthy, osteoporotic (positive: osteoporotic)" in card
    assert "dental" not in card.lower() and "Mandibular Cortical Index" not in card
    assert "Training data warning: training from scratch" in card

    champion = run["cli"]("predict", str(run["xrays"] / "healthy"))
    assert champion.returncode == 2
    assert "no version of 'bone-health' has the alias @champion yet (aliases: @challenger -> v1)" in champion.stderr
    assert "python -m src.promote" in champion.stderr
    pred = ok(run["cli"]("predict", str(run["xrays"]), "--model", "models:/bone-health@challenger", "--json"))
    rows = json.loads(pred.stdout)
    assert len(rows) == 22 and all(r["error"] is None for r in rows)
    assert {"prob_healthy", "prob_osteoporotic"} <= set(rows[0])
