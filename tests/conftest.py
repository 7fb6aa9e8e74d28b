"""Shared fixtures: tiny study files and throwaway SQLite stores in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINY_STUDY = """\
[study]
name = "tiny"
direction = "maximize"
metric = "val/acc"
trials = 3
sampler = "tpe"
seed = 7
pruner = "none"

[train]
epochs = 3
batch_size = 64

[params]
optimizer = { choices = ["sgd", "adam"] }
lr = { low = 1e-3, high = 0.1, log = true }
momentum = { low = 0.0, high = 0.9 }
schedule = "time_decay"
decay = 0.01
"""


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded() -> None:
    import torch

    from lrsearch.training import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()


@pytest.fixture
def write_study(tmp_path: Path):
    """Write a study file from TOML text; returns its path."""

    def write(text: str = TINY_STUDY, name: str = "study.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def stores(tmp_path: Path) -> tuple[str, str]:
    """Optuna storage URL and MLflow tracking URI on fresh SQLite files."""
    return f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def cli(tmp_path: Path):
    """Run ``lrsearch ARGS`` in a subprocess in ``tmp_path`` with the embedded default there."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA")}
        return subprocess.run([sys.executable, "-m", "lrsearch.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


# -- server mode: a real PostgreSQL and real `lrsearch server` subprocesses -----------------

PG_ADMIN_URL = os.environ.get("LRSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def pg_url():
    """A fresh PostgreSQL database for this test module, dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"lrsearch_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL} ({str(e).splitlines()[0]}); "
                    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout} s")
            time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, sig: int = 15) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compose_command(service: str, substitutions: dict[str, str]) -> list[str]:
    """A service's command from docker-compose.yml, with ``${VAR}``-style and host names
    replaced by ``substitutions`` (longest first), to run it natively."""
    import yaml

    compose = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
    command = []
    for part in compose["services"][service]["command"]:
        for old in sorted(substitutions, key=len, reverse=True):
            part = part.replace(old, substitutions[old])
        command.append(part)
    return command


def start_server(pg: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    """`lrsearch server` as docker-compose.yml runs it, natively, on a free loopback port."""
    port = free_port()
    command = compose_command("mlflow", {
        "postgresql+psycopg://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/${POSTGRES_DB}": pg,
        "/artifacts": str(artifacts), "0.0.0.0": "127.0.0.1", "5000": str(port)})
    assert command[:2] == ["lrsearch", "server"]
    proc = subprocess.Popen([sys.executable, "-m", "lrsearch.cli", *command[1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, uri


@pytest.fixture(scope="module")
def tracking_server(pg_url, tmp_path_factory):
    """One `lrsearch server` on the module's database; yields its URI."""
    proc, uri = start_server(pg_url, tmp_path_factory.mktemp("artifacts"))
    yield uri
    stop_process_group(proc)
