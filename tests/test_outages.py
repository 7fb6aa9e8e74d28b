"""Server mode when the database goes away: dropped connections, an outage within the window,
an outage longer than it, and a full disk, on a real PostgreSQL (reached through a TCP relay
the test can cut) and on the embedded files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from conftest import FAST_HEARTBEAT, TcpProxy, missing, server_study, start_server, stop_process_group
from mlflow import MlflowClient

from lrsearch.store.urls import schema_url

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pw"  # trust auth ignores it; no message may show it


@pytest.fixture(scope="module")
def proxy():
    relay = TcpProxy()
    yield relay
    relay.down()


@pytest.fixture(scope="module")
def proxied(pg_url, proxy):
    """The module's database as the workers reach it: through the relay, with a password."""
    return sa.engine.make_url(proxy.url(pg_url)).set(password=PASSWORD).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def server(proxied, tmp_path_factory):
    """`lrsearch server` whose own database connections go through the relay too."""
    proc, uri = start_server(proxied, tmp_path_factory.mktemp("artifacts"))
    yield uri
    stop_process_group(proc)


def _run(path: Path, storage: str, tracking: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "run", str(path), "--workers", "2", "--no-report"],
        env={
            **os.environ,
            **FAST_HEARTBEAT,
            "LRSEARCH_DATA": str(path.parent / "data"),
            "LRSEARCH_STORAGE": storage,
            "MLFLOW_TRACKING_URI": tracking,
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _study(pg_url: str, name: str) -> optuna.Study:
    storage = optuna.storages.RDBStorage(schema_url(pg_url, "optuna"), engine_kwargs={"poolclass": sa.pool.NullPool})
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for(pg_url: str, name: str, proc: subprocess.Popen, complete: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            done = sum(t.state.name == "COMPLETE" for t in _study(pg_url, name).get_trials(deepcopy=False))
        except KeyError:
            done = 0
        if done >= complete:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {complete} trials completed")


def _assert_study_whole(pg_url: str, tracking: str, name: str, total: int) -> None:
    """The exact total, nothing RUNNING anywhere, the parent FINISHED, each trial's run its
    own, every FAIL with a reason and a closed run."""
    trials = _study(pg_url, name).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == total and "RUNNING" not in states, states
    assert "WAITING" not in states  # no retry stranded
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.data.tags.get("lrsearch.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("lrsearch.role") == "trial"}
    failed = {t.number: t.user_attrs.get("reason") for t in trials if t.state.name == "FAIL"}
    assert len(children) == len(trials), failed  # one run per trial, none twice
    for t in trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.run_name == f"trial-{t.number}"
        if t.state.name == "FAIL":
            assert t.user_attrs.get("reason") and run.info.status in ("FAILED", "KILLED")


def _terminate_backends(pg_url: str) -> int:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        killed = (
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            .scalars()
            .all()
        )
    engine.dispose()
    return sum(killed)


def test_dropped_connections_cost_nothing(pg_url, proxied, server, tmp_path):
    path = tmp_path / "dropped.toml"
    path.write_text(server_study("dropped", 10, 150, seed=3))
    proc = _run(path, proxied, server)
    _wait_for(pg_url, "dropped", proc, 3)
    # Every connection of the workers and of the tracking server, three times (the later
    # rounds find only those reopened since).
    assert _terminate_backends(pg_url) >= 4
    for _ in range(2):
        time.sleep(0.7)
        _terminate_backends(pg_url)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "study 'dropped': " in out and "target 10" in out
    assert "Traceback" not in err and PASSWORD not in out + err
    _assert_study_whole(pg_url, server, "dropped", 10)


def test_an_outage_within_the_window_costs_nothing(pg_url, proxied, proxy, server, tmp_path):
    path = tmp_path / "outage.toml"
    path.write_text(server_study("outage", 10, 150, seed=3))
    proc = _run(path, proxied, server)
    _wait_for(pg_url, "outage", proc, 3)
    proxy.down()  # the database unreachable for 3 s, for the workers and the tracking server
    time.sleep(3)
    proxy.up()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and PASSWORD not in out + err
    _assert_study_whole(pg_url, server, "outage", 10)


def test_an_outage_past_the_window_exits_1_in_one_line_and_a_rerun_completes(pg_url, proxied, proxy, server, tmp_path):
    path = tmp_path / "long.toml"
    path.write_text(server_study("long", 8, 150, seed=3))
    proc = _run(path, proxied, server, env={"LRSEARCH_OUTAGE_S": "3"})
    _wait_for(pg_url, "long", proc, 2)
    proxy.down()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proxy.up()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lrsearch: error: the database postgresql+psycopg://postgres:***@127.0.0.1:")
    assert "is unreachable (" in lines[-1] and "retried for 3 s, LRSEARCH_OUTAGE_S to wait longer)" in lines[-1]
    assert lines[-1].endswith("; run the same command again to resume the study")
    assert [line for line in lines if line.startswith("lrsearch: error:")] == [lines[-1]]
    assert "Traceback" not in err and PASSWORD not in out + err

    again = _run(path, proxied, server, env={"LRSEARCH_OUTAGE_S": "3"})  # the operator's setting, again
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    _assert_study_whole(pg_url, server, "long", 8)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB filesystem of its own (tmpfs), for a store that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        missing("a tmpfs mount", f"{result.stderr.strip()} (it needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line(tiny_disk, tmp_path):
    path = tmp_path / "full.toml"
    path.write_text(server_study("full", 200, 30, seed=3))
    storage = f"sqlite:///{tiny_disk / 'optuna.db'}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrsearch.cli",
            "run",
            str(path),
            "--no-report",
            "--storage",
            storage,
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            if len(optuna.load_study(study_name="full", storage=storage).trials) >= 3:
                break
        except Exception:
            pass
        time.sleep(0.2)
    filler = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)  # takes every byte left
    try:
        while True:
            os.write(filler, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(filler)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1] == f"lrsearch: error: the database {storage} refused a write: database or disk is full", err
    assert "Traceback" not in err and "Should not reach" not in err


def test_a_lock_whose_connection_dropped_knows_it(pg_url):
    from lrsearch.store.lock import store_lock

    with store_lock(pg_url) as lock:
        assert lock.held()
        pid = lock.connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        lock.connection.rollback()
        engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        engine.dispose()
        assert not lock.held()
    with store_lock(pg_url) as again:  # released with the connection: taken again at once
        assert again.held()


def test_a_tracking_server_that_never_answers_costs_one_bounded_call(monkeypatch):
    # A server that takes connections and never replies (hung, or behind a black-holing
    # proxy): with MLflow's defaults a call would wait for minutes through its own retries;
    # lrsearch bounds each request (MLFLOW_HTTP_REQUEST_TIMEOUT=10, no MLflow retries, unless
    # the environment says otherwise) and its check answers with one line naming the server.
    import socket
    import threading

    from lrsearch.core.errors import TrackingError
    from lrsearch.track.probe import HTTP_LIMITS
    from lrsearch.track.tracking import Tracker

    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections queue in the backlog; nothing ever reads or replies
    port = silent.getsockname()[1]
    tracker = Tracker(f"http://127.0.0.1:{port}")
    assert {k: os.environ[k] for k in HTTP_LIMITS} == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the operator's own bound wins (and the test is quick)
    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            tracker.check()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (reported below)
            outcome.append(e)

    try:
        thread = threading.Thread(target=check, daemon=True)
        thread.start()
        thread.join(timeout=30)  # MLflow's defaults: 120 s per attempt, 7 attempts
        assert not thread.is_alive(), "the call to a silent tracking server was not bounded"
    finally:
        silent.close()
    assert isinstance(outcome[0], TrackingError)
    assert str(outcome[0]) == f"cannot reach MLflow tracking at http://127.0.0.1:{port}: no answer within 1 s"
