"""The flat metrics files that `dvc metrics show`, MLflow and the promotion gate read:
`{evaluate.out}/metrics.json` (out-of-fold figures) and `{gradcam.out}/metrics.json`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from src.core.fileio import atomic_write_json, read_json_object

METRICS_FILE = "metrics.json"


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


def read_metrics(out_dir: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    return read_json_object(metrics_path(out_dir), f"{what} not found" + (f"; {hint}" if hint else ""))


def numeric(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers only (bools and nulls dropped); counts stay ints: "n_images 22", not "22.0000"."""
    return {k: v for k, v in metrics.items() if not isinstance(v, bool) and isinstance(v, (int, float))}
