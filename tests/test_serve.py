"""The real `mlflow models serve` answers POST /invocations like `python -m src.predict`.

The served model is the hardest case: crop mode with the locate stage's localisers bundled, so
one request holds a row with its box and a row without (cropped where the localiser points);
full mode's answer is a subset of those columns (tests/test_register.py checks it in-process).
The server runs in its own process group, from a folder outside the checkout (the model
must carry its own code), and the whole group is killed and checked gone at the end.
"""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from registry_helpers import (
    make_localisers,
    make_params,
    make_pipeline_outputs,
    radiograph,
    write_dicom,
    write_png,
)
from servers import free_port, stop_group, wait_http

from src.serving.inference import load_ensemble, predict_files
from src.serving.registry import register

STARTUP_S = 180  # two loaded cores: importing torch + mlflow in the server can take a while


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.mark.slow
def test_served_model_answers_like_predict(tmp_path):
    params = make_params(tmp_path, mode="crop")
    make_pipeline_outputs(params)
    make_localisers(params)
    register(params)
    png = write_png(tmp_path / "in" / "r.png", radiograph(96, 160, seed=21))
    dcm = write_dicom(tmp_path / "in" / "r.dcm", radiograph(90, 150, seed=22).astype(np.uint16) * 257)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.mlflow.tracking_uri,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("PYTHONPATH", None)
    venv_bin = Path(sys.executable).parent  # mlflow starts `uvicorn` by name, as an activated venv would
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    mlflow_bin = str(venv_bin / "mlflow")
    log = tmp_path / "serve.log"
    outside = tmp_path / "elsewhere"  # not the checkout: `src` must come from the model itself
    outside.mkdir()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [mlflow_bin, "models", "serve", "-m", "models:/bone-health@challenger", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            cwd=outside, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid
    try:
        try:
            wait_http(f"{url}/ping", STARTUP_S, proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}; server log:\n{log_tail(log)}")
        box = [60.0, 50.0, 20.0, 16.0]
        body = {"dataframe_split": {"columns": ["image", "box_x", "box_y", "box_w", "box_h"], "data": [
            [base64.b64encode(png.read_bytes()).decode("ascii"), *box],
            [base64.b64encode(dcm.read_bytes()).decode("ascii"), None, None, None, None]]}}
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"]

        bad = {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}  # b64 "not an image"
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(bad).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 400  # the client's mistake, not the server's
        error = json.loads(info.value.read().decode())
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "row 0: not an image" in error["message"]
    finally:
        stop_group(proc)  # SIGTERM, then SIGKILL, to the whole group
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no process of the server's group is left

    local = predict_files(load_ensemble(params, "models:/bone-health@challenger"), [png, dcm],
                          boxes={png.as_posix(): tuple(box)})
    assert len(answer) == 2
    assert [served["box_source"] for served in answer] == [mine.box.source for mine in local] == ["given", "found"]
    assert math.isnan(answer[0]["box_confidence"])  # the scoring server writes NaN as is (json.loads reads it)
    assert answer[1]["box_confidence"] == pytest.approx(local[1].box.confidence, rel=1e-5)
    for served, mine in zip(answer, local):
        assert served["predicted"] == mine.predicted and served["error"] is None
        np.testing.assert_allclose([served[c] for c in ("box_x", "box_y", "box_w", "box_h")], mine.box.box, rtol=1e-6)
        np.testing.assert_allclose([served["prob_C1"], served["prob_C3"]],
                                   [mine.probs["C1"], mine.probs["C3"]], rtol=1e-5, atol=1e-6)
