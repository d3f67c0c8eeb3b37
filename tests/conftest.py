"""Test-wide settings: no network, no telemetry, and nothing written outside tmp dirs."""
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own SQLite stores

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later test's subprocess would
    inherit a previous test's store as if a user had chosen it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a shared 2-core box, 2 intra-op threads make a tiny forward pass ~10-40x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
