"""Where a study lives and how local workers share it: storage (a journal file by default, any
RDB URL across machines), the study itself, a file lock around ask/recover, and heartbeats
that let a crashed trial be failed and retried (Optuna's own heartbeat is RDB-only)."""
from __future__ import annotations

import contextlib
import fcntl
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import optuna
from optuna.trial import TrialState

from src.core.config import Params
from src.core.errors import BoneHealthError
from src.core.redact import redact_url
from src.tuning.pruners import make_pruner

STUDY_TAG = "bone_health.tune_study"
KIND_TAG = "bone_health.kind"
# FAIL trials count as done (a crashing config must not loop forever) unless their
# heartbeat went stale, in which case they are marked RETRIED and re-enqueued.
RETRIED_ATTR = "retried"
HEARTBEAT_ATTR = "heartbeat"
MLFLOW_RUN_ATTR = "mlflow_run_id"  # the trial's child run, closed as KILLED when its worker dies


def storage_url(params: Params) -> str:
    """The storage a study lives in; the default is a journal file under tune.out."""
    if params.tune.storage:
        return params.tune.storage
    return f"journal:///{Path(params.tune.out).resolve() / (params.tune.study_name + '.journal')}"


def open_storage(url: str):
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:///") or url.endswith(".journal") and "://" not in url:
        path = Path(url.removeprefix("journal:///") if url.startswith("journal:///") else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:"):
        warnings.warn("SQLite storage is not safe for parallel workers; use the journal default or PostgreSQL",
                      stacklevel=2)
    if "://" not in url:
        raise BoneHealthError(f"tune.storage: {redact_url(url)!r} is neither a journal path (*.journal) nor a database URL")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # driver missing, server down, bad credentials ...
        # the driver's message may quote the URL too: mask the whole line, not just our part
        line = f"tune.storage: cannot open {url!r}: {type(exc).__name__}: {exc}".splitlines()[0]
        raise BoneHealthError(redact_url(line)) from None


def open_study(params: Params, url: str | None = None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=params.tune.sampler_seed, n_startup_trials=params.tune.n_startup_trials)
    return optuna.create_study(storage=open_storage(url or storage_url(params)), study_name=params.tune.study_name,
                               direction="maximize", sampler=sampler, pruner=make_pruner(params), load_if_exists=True)


def _done_states():
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def count_counted(study) -> int:
    """Trials that count towards a target: finished or running, minus stale ones that were retried."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=_done_states()) if not t.user_attrs.get(RETRIED_ATTR))


@contextlib.contextmanager
def study_lock(params: Params, url: str) -> Iterator[None]:
    """Serialise ask/recover between local workers (a file lock; RDB across machines may overshoot by a trial)."""
    lock_path = Path(params.tune.out) / f".{params.tune.study_name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def recover_stale_trials(study, grace: float, max_retry: int, now: float | None = None) -> list[int]:
    """Fail RUNNING trials whose heartbeat is older than `grace` s and re-enqueue their params."""
    now = time.time() if now is None else now
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - float(beat) <= grace:
            continue
        retries = int(t.user_attrs.get("retries", 0))
        origin = int(t.user_attrs.get("retry_of", t.number))
        study._storage.set_trial_user_attr(t._trial_id, RETRIED_ATTR, retries < max_retry)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        if retries < max_retry:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": origin, "retries": retries + 1})
        recovered.append(t.number)
    return recovered


class Heartbeat:
    """Background thread stamping the trial's user attrs so a dead worker can be told from a slow one."""

    def __init__(self, study, trial, interval: float):
        self._storage, self._trial_id, self._interval = study._storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a finished trial refuses updates: nothing to keep alive
                self._beat()

    def __enter__(self):
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


