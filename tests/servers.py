"""Real servers for tests, on 127.0.0.1, each in its own process group and stopped by group.

PostgreSQL refuses to run as root, so as root the cluster is initialised and started as the
`postgres` system user (Debian's package creates it).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left; assert nothing survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"process group {proc.pid} still alive after stop")


# ------------------------------------------------------------------------ PostgreSQL
def postgres_bin(name: str) -> str | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return shutil.which(name)


def postgres_missing_reason() -> str | None:
    if not (postgres_bin("initdb") and postgres_bin("pg_ctl")):
        return "PostgreSQL server binaries not found (make installs Debian's postgresql when apt-get works)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "running as root and there is no 'postgres' user to run the server as"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster; yields a SQLAlchemy URL for database `bonehealth`."""
    reason = postgres_missing_reason()
    if reason:
        import pytest

        pytest.skip(reason)
    # pytest's tmp dirs are private to root; the server user needs a folder of its own.
    tmp = Path(tempfile.mkdtemp(prefix="bone-health-pg-"))
    data, sock = tmp / "pgdata", tmp / "pgsock"
    for d in (data, sock):
        d.mkdir(parents=True, exist_ok=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        for d in (data, sock):
            shutil.chown(d, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(as_user + [postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                              "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    log = tmp / "pg.log"
    if as_user:
        log.touch()
        shutil.chown(log, "postgres")
    proc = subprocess.Popen(
        as_user + [postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                   "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/bonehealth"
        deadline = time.time() + 60
        import psycopg

        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                                     autocommit=True) as conn:
                    conn.execute("CREATE DATABASE bonehealth")
                break
            except psycopg.OperationalError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- MLflow server
@contextlib.contextmanager
def http_server(argv: list[str], log: Path, timeout: float, **popen) -> Iterator[str]:
    """Start `argv` (its port already in it, as `{port}`) in its own process group; yield its
    URL once /health answers; stop the group."""
    port = free_port()
    proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=timeout, proc=proc)
        yield url
    finally:
        stop_group(proc)


def mlflow_server(backend_uri: str, artifacts: Path, env: dict | None = None):
    """`mlflow server` on 127.0.0.1 with one worker and no job runner (see DESIGN.md)."""
    mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
    full_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return http_server([mlflow_exe, "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
                        str(artifacts), "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"],
                       artifacts.parent / f"mlflow-server-{os.getpid()}-{time.time_ns()}.log", 120, env=full_env)


def fault_proxy(upstream: str, rules: Path):
    """tests/fault_proxy.py in front of `upstream`; the test steers it with write_rules(rules, ...)."""
    return http_server([sys.executable, "-m", "tests.fault_proxy", "--port", "{port}", "--upstream", upstream,
                        "--rules", str(rules)], rules.with_suffix(".log"), 60, cwd=Path(__file__).resolve().parents[1])
