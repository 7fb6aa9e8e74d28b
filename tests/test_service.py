"""The study service on SQLite and on the real PostgreSQL: studies submitted to warm
workers, served round robin, watched with status, cancelled, and a worker killed mid-way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import FAST_HEARTBEAT, server_study
from mlflow import MlflowClient

from lrsearch.config import parse_config
from lrsearch.core.errors import UsageError
from lrsearch.service.queue import STATUS_COLUMNS, cancel, status, submit
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import schema_url

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow


def _cfg(name: str, trials: int, epochs: int, **study):
    import tomllib

    raw = tomllib.loads(server_study(name, trials, epochs))
    raw["study"].update(study)
    return parse_config(raw, f"{name}.toml")


def _worker(
    storage: str,
    tracking: str,
    max_idle: float,
    env: dict | None = None,
    *,
    array: int | None = None,
    quiet: bool = False,
) -> subprocess.Popen:
    """A file-less ``lrsearch worker`` on the stores (``--array``, ``--quiet`` if given)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrsearch.cli",
            "worker",
            "--storage",
            storage,
            "--tracking-uri",
            tracking,
            "--max-idle",
            str(max_idle),
            *(["--array", str(array)] if array is not None else []),
            *(["--quiet"] if quiet else []),
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _submitted(cfg, store: str, tmp_path, request) -> tuple[str, str]:
    """``cfg`` submitted to new stores of ``store``'s kind ("sqlite": files in ``tmp_path``;
    "postgresql": the module's database), MLflow's tables made as its server makes them
    first: the storage URL and tracking URI."""
    from lrsearch.service.queue import submit
    from lrsearch.store.urls import schema_url

    if store == "sqlite":
        stores = (f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    else:
        pg = request.getfixturevalue("pg_url")
        stores = (pg, schema_url(pg, "mlflow"))
    submit(cfg, storage=stores[0], tracking=stores[1])  # (on PostgreSQL: the schemas)
    MlflowClient(stores[1]).search_experiments()
    return stores


def _row(stores: tuple[str, str], name: str) -> dict:
    return status(name, storage=stores[0], tracking=stores[1])[0]


def _wait(stores: tuple[str, str], name: str, test, procs=(), timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _row(stores, name)
        if test(row):
            return row
        for p in procs:
            assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    raise TimeoutError(f"{name}: {row}")


def _trials(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)


def _experiment(tracking: str, name: str) -> bool:
    """Whether MLflow has an experiment for the study (without creating an embedded store)."""
    path = tracking.removeprefix("sqlite:///")
    if path != tracking and not os.path.exists(path):
        return False
    return MlflowClient(tracking_uri=tracking).get_experiment_by_name(name) is not None


def _parent(tracking: str, name: str):
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, next(r for r in runs if r.data.tags.get("lrsearch.role") == "study"), runs


def _scenario(stores: tuple[str, str]) -> None:
    """Three studies through two workers, one picked up while they idle, one cancelled with
    --now while it trains, one cancelled while queued; then a resubmission."""
    storage, tracking = stores
    for name in ("a", "b", "c"):
        sub = submit(_cfg(name, 3, 2), storage=storage, tracking=tracking)
        assert not sub.resumed and sub.target == 3 and sub.mlflow_url is None
    # submit writes to Optuna only: MLflow's records are the first worker's to make.
    assert not _experiment(tracking, "a")
    rows = status(storage=storage, tracking=tracking)
    assert {r["state"] for r in rows} == {"queued"} and {r["mlflow_url"] for r in rows} == {None}
    # Idle long enough to outlast the other worker's end of a study (its parent run closed, its
    # model registered: seconds on a loaded machine), so both are there for the next one.
    workers = [_worker(storage, tracking, max_idle=15) for _ in range(2)]
    for name in ("a", "b", "c"):
        row = _wait(stores, name, lambda r: r["state"] == "done", workers)
        assert (row["complete"] + row["pruned"], row["fail"], row["running"]) == (3, 0, 0)
    # Round robin: every study started before any other finished.
    trials = {name: _trials(storage, name) for name in ("a", "b", "c")}
    first_starts = [min(t.datetime_start for t in ts) for ts in trials.values()]
    last_ends = [max(t.datetime_complete for t in ts) for ts in trials.values()]
    assert max(first_starts) < min(last_ends)

    sub = submit(_cfg("d", 2, 2), storage=storage, tracking=tracking)  # the workers idle now
    _wait(stores, "d", lambda r: r["state"] == "done", workers)

    submit(_cfg("long", 20, 20000), storage=storage, tracking=tracking)
    row = _wait(stores, "long", lambda r: r["state"] == "running" and r["workers"] >= 1, workers)
    assert set(row) == set(STATUS_COLUMNS) and row["mlflow_url"].startswith("http")
    assert "cancelled" in cancel("long", now=True, storage=storage, tracking=tracking)
    row = _wait(stores, "long", lambda r: r["running"] == 0, workers)
    assert row["state"] == "cancelled" and row["complete"] == 0 and row["fail"] >= 1
    failed = [t for t in _trials(storage, "long") if t.state.name == "FAIL"]
    assert {t.user_attrs["reason"] for t in failed} == {"cancelled"}
    # Each worker closes its trial's run, and the last one the parent, right after telling
    # Optuna (the other worker's record may still be on its way then).
    deadline = time.monotonic() + 60
    while {r.info.status for r in _parent(tracking, "long")[2]} != {"KILLED"}:
        assert time.monotonic() < deadline, [(r.info.run_name, r.info.status) for r in _parent(tracking, "long")[2]]
        time.sleep(0.2)

    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "error" not in err
    for name in ("a", "b", "c", "d"):
        client, parent, runs = _parent(tracking, name)
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and parent.info.status == "FINISHED"

    submit(_cfg("queued", 2, 2), storage=storage, tracking=tracking)
    assert "none running" in cancel("queued", storage=storage, tracking=tracking)
    assert _row(stores, "queued")["state"] == "cancelled"
    assert not _experiment(tracking, "queued")  # no worker started it: no MLflow record to close
    assert submit(_cfg("queued", 2, 2), storage=storage, tracking=tracking).resumed  # resumes it
    assert _row(stores, "queued")["state"] == "queued"


def test_the_service_on_sqlite(stores):
    _scenario(stores)


def test_the_service_on_postgres(pg_url):
    _scenario((pg_url, schema_url(pg_url, "mlflow")))


def test_a_changed_configuration_is_refused_but_more_trials_are_taken(stores):
    submit(_cfg("drift", 3, 2), storage=stores[0], tracking=stores[1])
    with pytest.raises(UsageError, match=r"\[train\]\.epochs differs \(only trials may rise\)"):
        submit(_cfg("drift", 3, 5), storage=stores[0], tracking=stores[1])
    with pytest.raises(UsageError, match=r"\[study\]\.trials differs"):
        submit(_cfg("drift", 2, 2), storage=stores[0], tracking=stores[1])
    assert submit(_cfg("drift", 5, 2), storage=stores[0], tracking=stores[1]).target == 5
    assert _row(stores, "drift")["target"] == 5


def test_priority_then_the_oldest_submission_first(stores):
    from lrsearch.service.queue import queue

    for name, priority in (("old", 0), ("new", 0), ("urgent", 5)):
        submit(_cfg(name, 1, 2, priority=priority), storage=stores[0], tracking=stores[1])
    assert queue(open_storage(stores[0])) == ["urgent", "old", "new"]


def test_a_worker_killed_while_two_studies_run(tmp_path):
    """SIGKILL of one of two workers: its trial ends FAIL (retried) with its run KILLED, and
    both studies still reach their exact totals."""
    stores = (f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("x", "y"):
        submit(_cfg(name, 3, 400), storage=stores[0], tracking=stores[1])
    doomed = _worker(*stores, max_idle=30, env=FAST_HEARTBEAT)
    row = _wait(stores, "x", lambda r: r["running"] >= 1, [doomed])
    deadline = time.monotonic() + 60  # killed while it trains: its params sampled, its run made
    while not [
        t for t in _trials(stores[0], "x") if t.state.name == "RUNNING" and t.params and "mlflow_run_id" in t.user_attrs
    ]:
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.1)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    survivor = _worker(*stores, max_idle=3, env=FAST_HEARTBEAT)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    for name in ("x", "y"):
        trials = _trials(stores[0], name)
        assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 3
        assert not [t for t in trials if t.state.name == "RUNNING"]
    dead = [t for t in _trials(stores[0], "x") if t.state.name == "FAIL"]
    assert len(dead) == 1 and dead[0].user_attrs["reason"].startswith("worker lost")
    retry = [t for t in _trials(stores[0], "x") if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(retry) == 1 and retry[0].params == dead[0].params
    client = MlflowClient(tracking_uri=stores[1])
    assert client.get_run(dead[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert row["running"] >= 1


def test_submit_prints_the_study_and_how_to_watch_it(cli, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(server_study("printed", 2, 2))
    done = cli("submit", str(study))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("study 'printed' submitted: 2 trials")
    assert lines[1] == (
        "MLflow: the study's run and trials appear once a worker starts it (`lrsearch status` then shows the link)"
    )
    assert lines[2] == "watch it: lrsearch status printed --watch"
    probe = (
        "import sys\nfrom lrsearch.cli import main\ncode = main(['submit', sys.argv[1]])\n"
        "assert 'torch' not in sys.modules, 'submit imported torch'\n"
        "assert 'mlflow' not in sys.modules, 'submit imported MLflow'\nsys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA")}
    again = subprocess.run(
        [sys.executable, "-c", probe, str(study)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("study 'printed' resubmitted")
    shown = cli("status", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert '"state": "queued"' in shown.stdout
    assert cli("status", "nothing").returncode == 2
    assert cli("cancel", "nothing").returncode == 2
    worker = cli("worker", str(study), "--max-idle", "1")
    assert worker.returncode == 2 and "--max-idle: only without a study file" in worker.stderr


def test_a_study_no_worker_can_run_says_why_and_a_corrected_submit_queues_it(stores, tmp_path):
    """A stored configuration this version cannot run (an optimizer from a newer release):
    the worker skips it with one warning and serves the others; status, the studies view and
    the parent run's description say unrunnable, by which version and why; submitting the
    corrected study queues it again, and a worker runs it."""
    from lrsearch.core import attrs

    storage, tracking = stores
    submit(_cfg("newer", 2, 2), storage=storage, tracking=tracking)
    submit(_cfg("fine", 1, 2), storage=storage, tracking=tracking)
    store = open_storage(storage)
    study_id = store.get_study_id_from_name("newer")
    stored = store.get_study_user_attrs(study_id)[attrs.CONFIG]
    store.set_study_user_attr(
        study_id, attrs.CONFIG, {**stored, "params": {**stored["params"], "optimizer": {"choices": ["lion"]}}}
    )
    worker = _worker(storage, tracking, max_idle=2, quiet=True)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert out == "" and err.startswith(  # --quiet: the warning only
        "lrsearch: warning: study 'newer' skipped: study 'newer' (stored configuration): [params].optimizer"
    )
    assert len(err.splitlines()) == 1, err
    assert _row(stores, "fine")["state"] == "done"
    row = _row(stores, "newer")
    assert row["state"] == "unrunnable" and row["complete"] == 0
    assert re.fullmatch(
        r"lrsearch \S+ on \S+ cannot run it: study 'newer' \(stored configuration\): "
        r"\[params\]\.optimizer\.choices: expected one of .*, got 'lion'",
        row["reason"],
    ), row
    client, parent, _ = _parent(tracking, "newer")
    assert parent.data.tags["mlflow.note.content"].startswith("**newer** · unrunnable · lrsearch ")
    assert parent.info.status == "FAILED"

    assert submit(_cfg("newer", 2, 2), storage=storage, tracking=tracking).resumed
    row = _row(stores, "newer")
    assert (row["state"], row["reason"]) == ("queued", None)
    worker = _worker(storage, tracking, max_idle=2)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "skipped" not in err, err
    # It says what it takes up and leaves, and ends with run's summary of each study it trained.
    said = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("worker ")]
    assert said[0].startswith("serving the studies submitted to ") and said[-1] == "idle for 2 s, done"
    assert re.fullmatch(r"study 'newer' taken up: 0 of 2 trials finished; [12] trials? at a time here", said[1])
    assert re.fullmatch(
        r"study 'newer' done: 2 trials trained here \((\d COMPLETE|\d COMPLETE, \d PRUNED|\d PRUNED)\); "
        r"best val/acc \S+ \(trial [01]\)",
        said[2],
    ), said
    assert len(said) == 4 and out.startswith("study 'newer': 2 trials (")
    assert "(its trials, best first)" in out
    client, parent, runs = _parent(tracking, "newer")
    assert _row(stores, "newer")["state"] == "done" and parent.info.status == "FINISHED"
    assert parent.data.params["study.name"] == "newer"  # the params wait for a worker that can run it
    assert parent.data.tags["mlflow.note.content"].startswith("**newer** · done · 2 of 2")


def test_run_hears_its_worker_processes_through_their_results_pipes(tmp_path):
    """A worker process that run_study starts tells it its error as a JSON line on a pipe of
    its own (its stderr is not read): here, a study file gone before the workers read it."""
    from lrsearch.service.launch import _start_workers

    gone = tmp_path / "gone.toml"
    workers, alive = _start_workers(
        _cfg("piped", 2, 1), gone, 2, f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db", None
    )
    for w in workers:
        w.wait()
    os.close(alive)
    assert [w.proc.returncode for w in workers] == [2, 2]
    assert [w.error for w in workers] == [f"worker {i}: {gone}: no such file" for i in (1, 2)]
    assert [w.warnings for w in workers] == [[], []]
    assert not (tmp_path / "optuna.db").exists()
