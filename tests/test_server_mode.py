"""Server mode on a real PostgreSQL and a real `lrsearch server`: parallel workers, crashes,
signals, a tracking server that goes away, and the compose file's commands run natively."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from conftest import (
    FAST_HEARTBEAT,
    compose_service,
    compose_variables,
    server_study,
    start_server,
    stop_process_group,
)
from mlflow import MlflowClient

from lrsearch.store.urls import schema_url

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow


def _study_file(tmp_path: Path, name: str, trials: int, epochs: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(server_study(name, trials, epochs, extra="\n[tracking]\ntrial_plots = true\n"))
    return path


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    """Each test's embedded folder (reports land there) is its own, not the working directory's."""
    monkeypatch.setenv("LRSEARCH_DATA", str(tmp_path / "data"))


def _lrsearch(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def _study(pg_url: str, name: str) -> optuna.Study:
    # One storage (one connection pool) per database: the tests poll, and PostgreSQL's
    # connection slots are few.
    if pg_url not in _STORAGES:
        _STORAGES[pg_url] = optuna.storages.RDBStorage(
            schema_url(pg_url, "optuna"), engine_kwargs={"poolclass": sa.pool.NullPool}
        )
    return optuna.load_study(study_name=name, storage=_STORAGES[pg_url])


def _trials_or_none(pg_url: str, name: str) -> list:
    try:
        return _study(pg_url, name).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _wait_for_running_trial(pg_url: str, name: str, proc: subprocess.Popen, timeout: float = 120):
    """The first RUNNING trial that already has its MLflow run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            running = _study(pg_url, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        for trial in running:
            if "mlflow_run_id" in trial.user_attrs:
                return trial
        time.sleep(0.1)
    raise TimeoutError("no trial started")


def _runs(tracking: str, experiment_name: str):
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(experiment_name)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def _assert_nothing_running(pg_url: str, name: str, tracking: str) -> None:
    assert "RUNNING" not in _states(_study(pg_url, name))
    _, runs = _runs(tracking, name)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []


def test_two_workers_share_one_study(pg_url, tracking_server, tmp_path):
    path = _study_file(tmp_path, "two-workers", trials=6, epochs=3)
    proc = _lrsearch("run", str(path), "--storage", pg_url, "--tracking-uri", tracking_server, "--workers", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "study 'two-workers': 6 trials (6 COMPLETE), target 6" in out
    # The report goes under a folder of its own store: never over an embedded study's of the same name.
    database = sa.engine.make_url(pg_url).database
    assert f"report: {tmp_path / 'data' / 'reports' / f'127.0.0.1-5432-{database}'}/two-workers/report.html" in out

    study = _study(pg_url, "two-workers")
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # no duplicates

    client, runs = _runs(tracking_server, "two-workers")  # through the server's REST API
    parents = [r for r in runs if r.data.tags.get("lrsearch.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"trial-{i}" for i in range(6)]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert artifacts == {"learning_curves.png", "network.pt", "trial_config.json"}  # served by the server

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        tables = set(
            conn.execute(
                sa.text(
                    "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                    "WHERE table_schema IN ('optuna', 'mlflow', 'public')"
                )
            ).scalars()
        )
    engine.dispose()
    assert {"optuna.trials", "optuna.studies", "optuna.alembic_version"} <= tables
    assert {"mlflow.runs", "mlflow.metrics", "mlflow.alembic_version"} <= tables
    assert not [t for t in tables if t.startswith("public.")]


def test_a_killed_worker_loses_no_trial(pg_url, tracking_server, tmp_path):
    path = _study_file(tmp_path, "kill-9", trials=4, epochs=400)
    args = ("worker", str(path), "--storage", pg_url, "--tracking-uri", tracking_server)
    doomed = _lrsearch(*args, "--worker-index", "0", env=FAST_HEARTBEAT)
    victim = _wait_for_running_trial(pg_url, "kill-9", doomed)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()

    survivor = _lrsearch(*args, "--worker-index", "1", env=FAST_HEARTBEAT)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err

    study = _study(pg_url, "kill-9")
    states = _states(study)
    assert states["COMPLETE"] == 4 and states["FAIL"] == 1 and "RUNNING" not in states
    dead = study.trials[victim.number]
    assert dead.state.name == "FAIL"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == victim.params
    client, _ = _runs(tracking_server, "kill-9")
    killed = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["state"] == "FAIL"
    assert killed.data.tags["reason"] == "worker lost: no heartbeat for 4 s"
    _assert_nothing_running(pg_url, "kill-9", tracking_server)


def test_a_worker_paused_past_the_grace_period_loses_its_trials_and_carries_on(pg_url, tracking_server, tmp_path):
    """A worker frozen (SIGSTOP, as a suspended machine) with an array of two trials: another
    worker ends them FAIL and queues them again. Thawed, the first finds its trials ended
    (its pruning check's write and each trial's end are refused), says so, leaves them as
    they are, and ends with the study; their runs keep what it trained, KILLED."""
    path = tmp_path / "paused.toml"
    path.write_text(server_study("paused", 4, 500).replace('pruner = "none"', 'pruner = "median"\nprune_every = 20'))
    args = ("worker", str(path), "--storage", pg_url, "--tracking-uri", tracking_server, "--array", "2")
    frozen = _lrsearch(*args, "--worker-index", "1", env=FAST_HEARTBEAT)
    deadline = time.monotonic() + 120
    while True:
        assert frozen.poll() is None and time.monotonic() < deadline, frozen.communicate()
        running = [t for t in _study_or_none(pg_url, "paused") if t.state.name == "RUNNING"]
        if len(running) == 2 and all("mlflow_run_id" in t.user_attrs for t in running):
            break
        time.sleep(0.1)
    os.killpg(frozen.pid, signal.SIGSTOP)
    other = _lrsearch(*args, "--worker-index", "0", env=FAST_HEARTBEAT)
    taken = False
    try:
        while {t.state.name for t in _study(pg_url, "paused").trials if t.number in {r.number for r in running}} != {
            "FAIL"
        }:
            assert other.poll() is None and time.monotonic() < deadline + 60, "its trials were never taken"
            time.sleep(0.2)
        taken = True
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
        if not taken:  # no worker left behind, waiting on a study that cannot end
            for proc in (other, frozen):
                os.killpg(proc.pid, signal.SIGKILL)
    _, other_err = other.communicate(timeout=300)
    assert other.returncode == 0, other_err
    _, err = frozen.communicate(timeout=300)
    assert frozen.returncode == 0, err
    for t in running:
        assert (
            f"lrsearch: warning: trial {t.number} was marked FAIL by another worker while it ran here "
            "(worker lost: no heartbeat for 4 s)"
        ) in err.splitlines()

    study = _study(pg_url, "paused")
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4 and states["FAIL"] == 2, states
    client, runs = _runs(tracking_server, "paused")
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("lrsearch.role") == "trial") == sorted(
        f"trial-{t.number}" for t in study.trials
    )  # one run each, none made twice
    for t in running:
        dead = study.trials[t.number]
        assert dead.user_attrs["reason"] == "worker lost: no heartbeat for 4 s"
        retry = [r for r in study.trials if r.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and retry[0].state.name in ("COMPLETE", "PRUNED") and retry[0].params == t.params
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["state"] == "FAIL"
        assert run.data.tags["reason"] == "ended by another worker: worker lost: no heartbeat for 4 s"
        assert len(client.get_metric_history(run.info.run_id, "val/loss")) >= 20  # what the frozen worker trained
    _assert_nothing_running(pg_url, "paused", tracking_server)


def _study_or_none(pg_url: str, name: str) -> list:
    try:
        return _study(pg_url, name).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


@pytest.mark.parametrize("moment", ["claimed", "run-created", "epoch", "told"])
def test_a_worker_killed_at_any_moment_of_a_trial_leaves_nothing_running(pg_url, tracking_server, tmp_path, moment):
    """`run --workers 2` whose second worker is SIGKILLed at one moment of its first trial
    (lrsearch/core/faults.py): before the trial's MLflow run exists, as the run is made, while it
    trains, and once Optuna is told but the run's last records are still on their way. The
    first worker finishes the study: its exact total, the killed trial queued again (or, told
    COMPLETE, kept), and nothing RUNNING in Optuna or MLflow."""
    name = f"kill-at-{moment}"
    env = {**FAST_HEARTBEAT, "LRSEARCH_KILL_AT": f"{moment}:1"}
    if moment == "told":
        env["LRSEARCH_SLOW_AT"] = "record:1"  # its records still on their way when it dies
    proc = _lrsearch(
        "run",
        str(_study_file(tmp_path, name, trials=4, epochs=300)),
        "--workers",
        "2",
        "--no-report",
        "--storage",
        pg_url,
        "--tracking-uri",
        tracking_server,
        env=env,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        "lrsearch: error: 1 of 1 other worker failed (worker 1: exit code -9); run the same command again to resume"
    )
    study = _study(pg_url, name)
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4 and set(states) <= {"COMPLETE", "PRUNED", "FAIL"}
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == (0 if moment == "told" else 1), [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    for dead in failed:
        assert dead.user_attrs["reason"] == "worker lost: no heartbeat for 4 s"
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
        assert retry[0].params == dead.params or not dead.params  # killed before sampling: sampled afresh
    _assert_nothing_running(pg_url, name, tracking_server)
    client, runs = _runs(tracking_server, name)
    trial_runs = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert len(trial_runs) == len(study.trials)  # one run per trial, made once
    if moment == "told":  # its run was closed for it, as its trial ended
        lost = [r for r in trial_runs if "tracking_error" in r.data.tags]
        assert [(r.info.status, r.data.tags["state"]) for r in lost] == [("FINISHED", "COMPLETE")]


def test_sigterm_stops_cleanly_and_the_same_command_resumes(pg_url, tracking_server, tmp_path):
    path = _study_file(tmp_path, "sigterm", trials=3, epochs=400)
    args = ("run", str(path), "--no-report", "--storage", pg_url, "--tracking-uri", tracking_server)
    proc = _lrsearch(*args)
    trial = _wait_for_running_trial(pg_url, "sigterm", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (
        "lrsearch: error: interrupted by SIGTERM; run the same command again to resume the study"
    )
    assert "Traceback" not in err
    stopped = _study(pg_url, "sigterm").trials[trial.number]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["reason"].startswith("interrupted at epoch")
    client, runs = _runs(tracking_server, "sigterm")
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in runs}
    parent = [r for r in runs if r.data.tags.get("lrsearch.role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"

    again = _lrsearch(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert _states(_study(pg_url, "sigterm"))["COMPLETE"] == 3
    _assert_nothing_running(pg_url, "sigterm", tracking_server)
    parent = [r for r in _runs(tracking_server, "sigterm")[1] if r.data.tags.get("lrsearch.role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"


def test_study_completes_when_the_tracking_server_goes_away(pg_url, tmp_path):
    server, uri = start_server(pg_url, tmp_path / "artifacts")
    try:
        path = _study_file(tmp_path, "lost-tracking", trials=6, epochs=150)
        # Gone for good: longer than the outage window (2 s here), so trials go on without it.
        proc = _lrsearch(
            "run", str(path), "--no-report", "--storage", pg_url, "--tracking-uri", uri, env={"LRSEARCH_OUTAGE_S": "2"}
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if _states(_study(pg_url, "lost-tracking")).get("COMPLETE", 0) >= 2:
                    break
            except KeyError:
                pass
            time.sleep(0.1)
        stop_process_group(server, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        stop_process_group(server, signal.SIGKILL)
    assert proc.returncode == 0, err
    study = _study(pg_url, "lost-tracking")
    assert _states(study) == {"COMPLETE": 6}
    lost = [t for t in study.trials if "tracking_error" in t.user_attrs]
    assert lost and all(t.user_attrs["tracking_error"].startswith("MLflow tracking lost: ") for t in lost)
    assert "lrsearch: warning: MLflow tracking was lost for" in err
    assert "Traceback" not in err


def test_sqlite_with_four_workers(tmp_path, cli_process):
    path = _study_file(tmp_path, "sqlite-4", trials=40, epochs=2)
    result = cli_process("run", str(path), "--workers", "4", "--no-report", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "database is locked" not in result.stderr
    assert "study 'sqlite-4': 40 trials (40 COMPLETE), target 40" in result.stdout


def test_the_dashboard_command_reads_the_optuna_schema(pg_url, tracking_server, tmp_path):
    pytest.importorskip("optuna_dashboard")
    from conftest import free_port, wait_for_http

    port = free_port()
    url = sa.engine.make_url(pg_url)
    command, environment = compose_service(
        "dashboard",
        compose_variables(pg_url),
        {"postgres:5432": f"{url.host}:{url.port or 5432}", "0.0.0.0": "127.0.0.1", "8080": str(port)},
    )
    assert command[0] == "python"
    from lrsearch.config import load_config
    from lrsearch.service.queue import submit

    submit(load_config(_study_file(tmp_path, "dash", trials=1, epochs=1)), storage=pg_url, tracking=tracking_server)
    dashboard = subprocess.Popen(
        [sys.executable, *command[1:]],
        env={**os.environ, **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", dashboard, timeout=60)
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as response:
            names = {s["study_name"] for s in json.loads(response.read())["study_summaries"]}
        assert "dash" in names
    finally:
        stop_process_group(dashboard)


def test_the_compose_worker_runs_from_its_environment(pg_url, tracking_server, tmp_path):
    """The worker service as compose runs it (no study, no URL on its command line, a login
    from the environment) serves a study submitted from the host."""
    from lrsearch.config import load_config
    from lrsearch.service.queue import submit

    url = sa.engine.make_url(pg_url)
    port = tracking_server.rsplit(":", 1)[1]
    command, environment = compose_service(
        "worker",
        compose_variables(pg_url),
        {"postgres:5432": f"{url.host}:{url.port or 5432}", "mlflow:5000": f"127.0.0.1:{port}"},
    )
    assert command == ["lrsearch", "worker"] and environment["MLFLOW_TRACKING_USERNAME"] == "admin"
    submit(
        load_config(_study_file(tmp_path, "compose-worker", trials=1, epochs=2)),
        storage=pg_url,
        tracking=tracking_server,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lrsearch.cli", *command[1:], "--max-idle", "2"],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert _states(_study(pg_url, "compose-worker")) == {"COMPLETE": 1}


def test_no_password_on_any_command_line(pg_url, tmp_path):
    """`ps` shows every local user each process's command line: the workers `run --workers`
    starts and the MLflow server `lrsearch server` execs must not carry the password."""
    secret = "cmdline-s3cret-pw"
    url = sa.engine.make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    server, uri = start_server(url, tmp_path / "artifacts")
    try:
        path = _study_file(tmp_path, "no-secrets", trials=2, epochs=20000)
        proc = _lrsearch(
            "run", str(path), "--workers", "2", "--no-report", "--tracking-uri", uri, env={"LRSEARCH_STORAGE": url}
        )
        deadline = time.monotonic() + 120
        while sum(t.state.name == "RUNNING" for t in _trials_or_none(pg_url, "no-secrets")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        assert [line for line in lines if "lrsearch.cli worker" in line]  # the child worker is there
        assert [line for line in lines if "mlflow server" in line or "mlflow.server" in line]
        assert [line for line in lines if secret in line] == []
        written = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]  # the server's login config
        assert any(p.name == "auth.ini" for p in written) and not any(secret in p.read_text() for p in written)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert secret not in out + err
    finally:
        stop_process_group(server)


def test_the_server_asks_for_a_login(tracking_server, write_study, tmp_path, cli, monkeypatch):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{tracking_server}/api/2.0/mlflow/experiments/search?max_results=1")
    assert info.value.code == 401
    for name in [k for k in os.environ if k.startswith("MLFLOW_TRACKING_")]:
        monkeypatch.delenv(name)
    result = cli("run", str(write_study()), "--tracking-uri", tracking_server)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"lrsearch: error: MLflow tracking at {tracking_server} refused the login: "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert not (tmp_path / "lrsearch-data" / "optuna.db").exists()


def test_serving_beyond_loopback_without_logins_warns(tmp_path):
    from conftest import free_port, wait_for_http

    store = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()
    port = free_port()
    log = open(tmp_path / "server.log", "w+b")
    server = subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "server", "--host", "0.0.0.0", "--port", str(port)],
        env={**os.environ, "LRSEARCH_DB": f"sqlite:///{store}"},
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    server.stderr = log
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
    finally:
        stop_process_group(server)
    first = (tmp_path / "server.log").read_text().splitlines()[0]
    assert first == (
        "lrsearch: warning: serving on 0.0.0.0 without authentication: anyone who reaches this port "
        "can read and change every study (add --auth)"
    )
