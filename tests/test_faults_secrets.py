"""Database passwords never leak: not into MLflow params/tags, stdout/stderr, files, or worker argv."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from src import tune
from src.core.config import params_from_dict, with_values
from src.core.errors import BoneHealthError
from src.core.redact import redact_params, redact_url
from src.model.cross_validation import run_cv
from src.tuning import study as tuning_study
from tests.servers import free_port, postgres_server
from tests.train_helpers import make_tiny_store, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cr3t-PW-9876"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store"), n_per_class=8, size=32, folds=2)


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under `root` whose bytes contain `secret` (SQLite pages, WAL, artifacts, YAML ...)."""
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# ------------------------------------------------------------------------- redact_url
@pytest.mark.parametrize("url, masked", [
    (f"postgresql+psycopg://tuner:{PASSWORD}@db.lab:5432/optuna",
     "postgresql+psycopg://tuner:***@db.lab:5432/optuna"),
    (f"mysql://:{PASSWORD}@127.0.0.1/db", "mysql://:***@127.0.0.1/db"),
    ("postgresql://tuner:p%40ss%2Fw%3Ard@host/db", "postgresql://tuner:***@host/db"),  # percent-encoded
    ("postgresql://tuner:p@ss/w@host/db", "postgresql://tuner:***@host/db"),  # unencoded '@' and '/'
    (f"postgresql://host/db?user=tuner&password={PASSWORD}&sslmode=require",
     "postgresql://host/db?user=tuner&password=***&sslmode=require"),
    (f"postgresql://host/db?sslpassword={PASSWORD}", "postgresql://host/db?sslpassword=***"),
    (f"https://alice:{PASSWORD}@mlflow.lab", "https://alice:***@mlflow.lab"),
    (f"error: cannot open 'postgresql://u:{PASSWORD}@h/db': refused; see https://x.org",
     "error: cannot open 'postgresql://u:***@h/db': refused; see https://x.org"),
    (f"a=sqlite:///x.db b=postgresql://u:{PASSWORD}@h/db c=http://v:{PASSWORD}@h2",
     "a=sqlite:///x.db b=postgresql://u:***@h/db c=http://v:***@h2"),
])
def test_redact_url_masks_every_password_shape(url, masked):
    assert redact_url(url) == masked


@pytest.mark.parametrize("text", [
    "sqlite:///mlruns/mlflow.db", "journal:///tmp/tune/bone-health.journal", "tune/x.journal",
    "http://127.0.0.1:5000", "postgresql+psycopg://postgres@127.0.0.1:5432/bonehealth",
    "file:///data/a@b.png", "s3://bucket/runs@v2/x", "http://[::1]:5000/api", "user@example.org", "",
    "postgresql://host/db?user=tuner&sslmode=require",
])
def test_redact_url_leaves_urls_without_credentials_alone(text):
    assert redact_url(text) == text


def test_redact_params_masks_values_and_keeps_types():
    flat = {"train.lr": 0.01, "tune.storage": f"postgresql://u:{PASSWORD}@h/db", "tune.timeout": None,
            "mlflow.tracking_uri": "sqlite:///mlruns/mlflow.db", "x.urls": [f"http://u:{PASSWORD}@h"], "x.n": [1, 2]}
    out = redact_params(flat)
    assert out == {"train.lr": 0.01, "tune.storage": "postgresql://u:***@h/db", "tune.timeout": None,
                   "mlflow.tracking_uri": "sqlite:///mlruns/mlflow.db", "x.urls": "['http://u:***@h']", "x.n": [1, 2]}


# ------------------------------------------------------------------ messages, argv
def test_open_storage_error_shows_no_password():
    url = f"postgresql+psycopg://tuner:{PASSWORD}@127.0.0.1:{free_port()}/db"  # nothing listens there
    with pytest.raises(BoneHealthError) as err:
        tuning_study.open_storage(url)
    assert "cannot open" in str(err.value) and "tuner:***@127.0.0.1" in str(err.value)
    assert PASSWORD not in str(err.value)


def test_summary_and_dashboard_hint_print_the_masked_url(capsys):
    study = optuna.create_study()
    url = f"postgresql+psycopg://tuner:{PASSWORD}@db.lab/optuna"
    tune.summary(study, 1.0, url, params_from_dict({}))
    out = capsys.readouterr().out
    assert PASSWORD not in out
    assert out.count("tuner:***@db.lab/optuna") == 2  # the summary line and the optuna-dashboard hint


def test_workers_get_credentials_by_environment_not_argv(tmp_path, monkeypatch):
    storage = f"postgresql+psycopg://tuner:{PASSWORD}@db.lab/optuna"
    tracking = f"postgresql://ml:{PASSWORD}@db.lab/mlflow"
    path = write_params(params_from_dict({}), tmp_path / "params.yaml")
    args = tune.parse_args(["--params", path, "--storage", storage, "--set", f"mlflow.tracking_uri={tracking}",
                            "--set", "train.lr=0.02"])
    params = tune.resolve(args)
    cmd, env = tune.worker_command(args, params, 5, "parent123", None)
    assert not any(PASSWORD in part for part in cmd), cmd
    assert env[tune.STORAGE_ENV] == storage
    # the worker rebuilds the same settings from its argv and environment
    for key in (tune.STORAGE_ENV, tune.SETS_ENV):
        monkeypatch.setenv(key, env[key])
    child = tune.resolve(tune.parse_args(cmd[3:]))
    assert child.tune.storage == storage and child.mlflow.tracking_uri == tracking and child.train.lr == 0.02
    assert child.tune.study_name == params.tune.study_name


def test_workers_keep_plain_overrides_on_argv(tmp_path):
    path = write_params(params_from_dict({}), tmp_path / "params.yaml")
    args = tune.parse_args(["--params", path, "--set", "train.lr=0.02"])
    cmd, env = tune.worker_command(args, tune.resolve(args), 5, "parent123", 123.0)
    assert cmd[cmd.index("--set") + 1] == "train.lr=0.02" and tune.SETS_ENV not in env
    assert "--storage" not in cmd and env[tune.STORAGE_ENV].startswith("journal:///")


# -------------------------------------------------------------------- end to end
def test_train_logs_only_the_masked_storage_url(tmp_path, store):
    storage = f"postgresql+psycopg://tuner:{PASSWORD}@db.lab:5432/optuna"
    params = with_values(tiny_params(tmp_path, store, epochs=1), {"tune.storage": storage})
    cv = run_cv(params)
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    logged = client.get_run(cv.parent_run_id).data.params
    assert logged["tune.storage"] == "postgresql+psycopg://tuner:***@db.lab:5432/optuna"
    assert files_holding(tmp_path / "mlruns", PASSWORD) == []
    assert files_holding(tmp_path / "models", PASSWORD) == []


def _create_user_db(admin_url: str) -> str:
    """A login role with a known password owning its own database; returns the role's URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    with psycopg.connect(host=admin.host, port=admin.port, user=admin.username, dbname=admin.database,
                         autocommit=True) as conn:
        conn.execute(f"CREATE ROLE tuner LOGIN PASSWORD '{PASSWORD}'")
        conn.execute("CREATE DATABASE tunedb OWNER tuner")
    return f"postgresql+psycopg://tuner:{PASSWORD}@{admin.host}:{admin.port}/tunedb"


def _watch_argv(proc: subprocess.Popen, timeout: float) -> list[list[str]]:
    """Every command line `proc`'s descendants showed, one entry per (process, command line), sampled until it exits.

    A child between fork and exec (or forked without exec) still shows the command line of the process
    that forked it. That copy discloses nothing its parent's own /proc entry does not, so it is left out:
    the test judges what each program was started with. Each process is sampled again after its exec.
    """
    seen: set[tuple[int, tuple[str, ...]]] = set()
    deadline = time.time() + timeout
    root = psutil.Process(proc.pid)
    while proc.poll() is None and time.time() < deadline:
        try:
            cmdlines = {root.pid: root.cmdline()}
            children = root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            break
        for child in children:  # parents come before their children in psutil's walk
            try:
                cmdline, ppid = child.cmdline(), child.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            cmdlines[child.pid] = cmdline
            if cmdline and cmdline != cmdlines.get(ppid):
                seen.add((child.pid, tuple(cmdline)))
        time.sleep(0.1)
    return [list(cmdline) for _, cmdline in seen]


@pytest.mark.slow
def test_tune_on_postgresql_leaks_the_password_nowhere(tmp_path, store):
    with postgres_server() as admin_url:
        url = _create_user_db(admin_url)
        params = with_values(tiny_params(tmp_path, store, epochs=1), {
            "tune.out": str(tmp_path / "tune"), "tune.pruner": "none", "tune.n_startup_trials": 1, "tune.epochs": 1,
            "tune.space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}}})
        path = write_params(params, tmp_path / "params.yaml")
        logs = tmp_path / "logs"
        logs.mkdir()
        with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "src.tune", "--params", path, "--storage", url,
                                     "--n-trials", "1", "--n-workers", "2"],
                                    cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
            argvs = _watch_argv(proc, timeout=600)
            proc.wait(timeout=60)
        stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
        assert proc.returncode == 0, stdout + stderr
        workers = [a for a in argvs if "--worker-target" in a]
        assert len(workers) == 2, argvs  # both seen while running, so the check below covers them
        assert not [a for a in argvs if any(PASSWORD in part for part in a)]
        for line in (stdout + stderr).splitlines():
            assert PASSWORD not in line, line
        assert "tuner:***@127.0.0.1" in stdout  # the summary still says where the study lives
        assert (tmp_path / "mlruns" / "mlflow.db").is_file()
        leaked = [p for p in files_holding(tmp_path, PASSWORD) if not p.startswith(str(logs))]
        assert leaked == []
        # the study really is in that database, under that user
        assert len(tuning_study.open_study(params, url).get_trials()) == 1
        client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id],
                                  filter_string="tags.`bone_health.kind` = 'tune-study'")
        assert runs[0].data.params["tune.storage"] == redact_url(url)
        assert runs[0].data.tags["optuna.storage"] == redact_url(url)
