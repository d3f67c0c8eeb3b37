"""The process defaults that keep a run offline.  Every stage entry (`run_main`) and the served
model call `offline_defaults()` explicitly; importing a module of this project changes nothing.
No torch here: `import src.evaluate` must stay light."""
from __future__ import annotations

import os


def offline_defaults() -> None:
    """No network call at run time unless the user asks for one.

    albumentations 2.0.8 checks PyPI at import; timm reaches for the weights hub when
    pretrained weights are not cached.  HF_HUB_OFFLINE=1 makes a missing cache fail in well
    under a second; users who want downloads set HF_HUB_OFFLINE=0 themselves.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Not network: MLflow's per-file download bars fill a console (5 folds, 10 bars) with nothing to read.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
