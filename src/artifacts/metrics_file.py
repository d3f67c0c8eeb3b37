"""The flat metrics files that MLflow and the promotion gate read: `{evaluate.out}/metrics.json`
(out-of-fold figures) and `{gradcam.out}/metrics.json`; and beside each, `headline.json`: the
few numbers people compare between experiments, under short names (the DVC metrics that
`dvc exp show` and `dvc metrics show` print; metrics.json holds ~40 more).

Each file also names the CV it was computed from (`Provenance`: two string keys beside the
numbers), so register can refuse metrics of another CV.  They live inside the file rather than
in a sidecar so that one atomic write binds the numbers to their CV: a sidecar could be left
behind by a failed or partial rerun and vouch for numbers it never saw.  `dvc metrics show/diff`
print strings as they are; `numeric()` keeps them out of MLflow and the gate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from src.core.errors import DataError
from src.core.fileio import atomic_write_json, read_json_object

METRICS_FILE = "metrics.json"
HEADLINE_FILE = "headline.json"
CV_RUN_KEY = "cv_parent_run_id"
CHECKPOINTS_KEY = "checkpoints_sha256"


def metrics_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / METRICS_FILE


def clean(value: Any) -> Any:
    """NaN/inf are not JSON: undefined metrics become null; numpy scalars become Python ones."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    return atomic_write_json(metrics_path(out_dir), {k: clean(v) for k, v in metrics.items()})


HEADLINE_DIGITS = 3


def headline(metrics: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """{short name: metrics[key]} for `names` {short name: key}, in its order, rounded to
    HEADLINE_DIGITS decimals (narrow columns; metrics.json keeps every digit, and the CI is
    ~0.1 wide on a few hundred images); a key the metrics lack (no masks, say) is null, so
    every run has the same columns."""
    def short(value: Any) -> Any:
        value = clean(value)
        return round(value, HEADLINE_DIGITS) if isinstance(value, float) else value

    return {name: short(metrics.get(key)) for name, key in names.items()}


def write_headline(out_dir: str | Path, metrics: Mapping[str, Any], names: Mapping[str, str]) -> Path:
    return atomic_write_json(Path(out_dir) / HEADLINE_FILE, headline(metrics, names))


def read_metrics(out_dir: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    return read_json_object(metrics_path(out_dir), f"{what} not found" + (f"; {hint}" if hint else ""))


def numeric(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers only (bools and nulls dropped); counts stay ints: "n_images 22", not "22.0000"."""
    return {k: v for k, v in metrics.items() if not isinstance(v, bool) and isinstance(v, (int, float))}


# ----------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class Provenance:
    """The CV a metrics file was computed from: its MLflow parent run (cv.json) and the content
    hash of its fold checkpoints (src.artifacts.cv_run.checkpoints_sha256)."""
    cv_parent_run_id: str
    checkpoints_sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def with_provenance(metrics: Mapping[str, Any], provenance: Provenance) -> dict[str, Any]:
    """The metrics (keys and values unchanged) plus the provenance keys, last."""
    return {**metrics, **provenance.to_dict()}


def read_provenance(metrics: Mapping[str, Any], path: str | Path, rerun: str) -> Provenance:
    """The provenance keys of a metrics file; a file from before they existed (or with broken
    ones) is a one-line error saying which command rewrites it."""
    values = [metrics.get(CV_RUN_KEY), metrics.get(CHECKPOINTS_KEY)]
    if not all(isinstance(v, str) and v for v in values):
        raise DataError(f"{path}: no {CV_RUN_KEY!r}/{CHECKPOINTS_KEY!r} strings naming the CV these metrics come from "
                        f"(written by an older version?); rerun `{rerun}`")
    return Provenance(*values)


def check_provenance(metrics: Mapping[str, Any], path: str | Path, expected: Provenance, cv_file: str | Path,
                     rerun: str) -> Provenance:
    """Refuse metrics computed for another CV run, or for other checkpoints of the same run,
    than the one in `cv_file`: one line naming the file and both run ids."""
    found = read_provenance(metrics, path, rerun)
    if found.cv_parent_run_id != expected.cv_parent_run_id:
        raise DataError(f"{path}: metrics of CV run {found.cv_parent_run_id}, but {cv_file} is CV run "
                        f"{expected.cv_parent_run_id}; rerun `{rerun}` for it")
    if found.checkpoints_sha256 != expected.checkpoints_sha256:
        raise DataError(f"{path}: metrics of CV run {found.cv_parent_run_id} with checkpoints sha256 "
                        f"{found.checkpoints_sha256[:12]}..., but the fold checkpoints of {cv_file} (CV run "
                        f"{expected.cv_parent_run_id}) now hash to {expected.checkpoints_sha256[:12]}...; rerun `{rerun}`")
    return found
