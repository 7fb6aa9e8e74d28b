"""Shared fixtures: tiny study files and throwaway SQLite stores in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Tests that ask() for trials as another Optuna client would, on a store with heartbeats:
# Optuna warns that heartbeats are meant for Study.optimize (lrsearch itself never asks).
ASKS_AS_ANOTHER_CLIENT = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize:UserWarning"
)

# In CI (CI=true) a part the tests need and cannot find is a failure, not a skip: a green CI
# must not hide a missing PostgreSQL or browser. On a developer's machine they skip, saying why.
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(part: str, why: str) -> None:
    """Skip for want of ``part`` (fail, saying which, under CI=true)."""
    if IN_CI:
        pytest.fail(f"CI: {part} is missing: {why}", pytrace=False)
    pytest.skip(f"{part} is missing: {why}")


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


# A study for server-mode tests: format with name, trials, epochs (and seed, extra tables).
# One trial at a time: these tests follow single trials through workers and faults (a
# worker's --array overrides it; tests/test_arrays.py has the arrays').
SERVER_STUDY = """\
[study]
name = "{name}"
trials = {trials}
seed = {seed}
pruner = "none"

[train]
epochs = {epochs}
batch_size = 64
array = 1

[params]
optimizer = {{ choices = ["sgd", "adam"] }}
lr = {{ low = 1e-3, high = 0.1, log = true }}
{extra}"""
# Short heartbeats so a dead worker's trial is detected within seconds in these tests.
FAST_HEARTBEAT = {"LRSEARCH_HEARTBEAT_INTERVAL": "1", "LRSEARCH_HEARTBEAT_GRACE": "4"}


def server_study(name: str, trials: int, epochs: int, *, seed: int = 11, extra: str = "") -> str:
    return SERVER_STUDY.format(name=name, trials=trials, epochs=epochs, seed=seed, extra=extra)


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded() -> None:
    import torch

    from lrsearch.fit.training import quiet_lightning

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


_STORE_VARIABLES = ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``lrsearch ARGS`` as the console script does (its ``main``, exit code, stdout and
    stderr) in this process, in ``tmp_path`` with the embedded default there: the command
    without a new process's start-up (importing torch, Lightning and MLflow: ~5 s each).
    Whatever a command sets process-wide (signal handlers, environment) is put back after.
    Processes, signals and the installed script are tested through ``cli_process``."""
    import contextlib
    import io
    import signal

    from lrsearch.cli import main
    from lrsearch.core import stopping

    def run(*args: str) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        hook, installed, environ = sys.unraisablehook, stopping._installed, dict(os.environ)
        with monkeypatch.context() as m:
            for name in _STORE_VARIABLES:
                m.delenv(name, raising=False)
            m.chdir(tmp_path)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                sys.unraisablehook, stopping._installed = hook, installed
                os.environ.clear()
                os.environ.update(environ)
        return subprocess.CompletedProcess(["lrsearch", *args], code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def cli_process(tmp_path: Path):
    """Run ``lrsearch ARGS`` in a subprocess in ``tmp_path`` with the embedded default there."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in _STORE_VARIABLES}
        return subprocess.run(
            [sys.executable, "-m", "lrsearch.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

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
        missing(
            "PostgreSQL",
            f"nothing answers at {PG_ADMIN_URL} ({str(e).splitlines()[0]}); start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        )
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
                if proc.stderr is not None and proc.stderr.seekable():  # a log file
                    proc.stderr.seek(0)
                log = proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"server exited with {proc.returncode}: {log.decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout} s") from None
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


# The tracking servers the tests start require a login, as docker-compose.yml's does; every
# client (this process, the workers it starts) logs in with MLflow's standard variables.
COMPOSE_ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "lrsearch-test-admin"}
os.environ.update(COMPOSE_ADMIN)


def compose_interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``${VAR}``, ``${VAR:-default}`` and
    ``${VAR:?message}`` (an error, as ``docker compose`` stops, when VAR is unset or empty)."""
    import re

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = variables.get(name, "")
        if op == ":?" and not current:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op == ":-" and not current:
            return arg
        return current

    return re.sub(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}", value, text)


def compose_service(service: str, variables: dict[str, str], hosts: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A service's command and environment from docker-compose.yml, interpolated with
    ``variables`` (as from .env) and with ``hosts`` (``postgres:5432``, ``mlflow:5000``, a
    bind address, a port) replaced by what this machine has, to run it natively."""
    import yaml

    spec = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())["services"][service]

    def local(text: str) -> str:
        text = compose_interpolate(str(text), variables)
        for old in sorted(hosts, key=len, reverse=True):
            text = text.replace(old, hosts[old])
        return text

    return [local(part) for part in spec["command"]], {k: local(v) for k, v in spec.get("environment", {}).items()}


def compose_variables(pg: str) -> dict[str, str]:
    """.env's variables for a database URL (trust auth ignores the password, but compose
    requires one)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(pg)
    return {
        "POSTGRES_USER": url.username,
        "POSTGRES_PASSWORD": url.password or "unused-with-trust",
        "POSTGRES_DB": url.database,
        **COMPOSE_ADMIN,
    }


def start_server(pg: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    """`lrsearch server` as docker-compose.yml runs it (with logins), natively, on a free
    loopback port, its database URL in its environment as compose passes it."""
    import sqlalchemy as sa

    port = free_port()
    url = sa.engine.make_url(pg)
    command, environment = compose_service(
        "mlflow",
        compose_variables(pg),
        {
            "postgres:5432": f"{url.host}:{url.port or 5432}",
            "/artifacts": str(artifacts),
            "0.0.0.0": "127.0.0.1",
            "5000": str(port),
        },
    )
    assert command[:2] == ["lrsearch", "server"]
    # Its log goes to a file: an unread pipe fills up (64 KB) and every thread that logs blocks.
    log = open(artifacts.parent / f"server-{port}.log", "w+b")
    data = os.environ.get("LRSEARCH_DATA") or str(artifacts.parent / "data")  # its login config goes there
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", *command[1:]],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
        env={**os.environ, "LRSEARCH_DATA": data, **environment},
    )
    proc.stderr = log
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


# -- a results scenario for the SQL views: every state, infinities, NaN metrics, two directions


def _trial(state, value=None, params=None, user_attrs=None, values=None):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    dists = {
        "optimizer": CategoricalDistribution(["sgd", "adam"]),
        "lr": FloatDistribution(1e-4, 1.0, log=True),
        "momentum": FloatDistribution(0.0, 0.99),
        "patience": IntDistribution(2, 15),
    }
    params = params or {}
    return create_trial(
        state=state,
        value=value,
        values=values,
        params=params,
        distributions={k: dists[k] for k in params},
        user_attrs=user_attrs or {},
        intermediate_values={0: 0.5} if state == TrialState.PRUNED else None,
    )


def fill_results(storage_url: str, client) -> None:
    """Studies ``acc`` (7 trials: COMPLETE, +inf, PRUNED, FAIL, RUNNING, no MLflow run, -inf;
    the first three with their epochs trained and array, the PRUNED and FAIL ones with why they ended),
    ``loss`` (minimize, 3 trials) and ``multi`` (two objectives), with one MLflow run (its
    ``lr`` curve: 0.01, 0.005, 0.0025)."""
    import math
    import warnings

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from lrsearch.core import attrs
    from lrsearch.store.storage import open_storage

    store = open_storage(storage_url)
    acc = optuna.create_study(storage=store, study_name="acc", direction="maximize")
    experiment = client.create_experiment("acc")
    run = client.create_run(experiment, run_name="trial-0")
    for key, value in (("val/acc", 0.9), ("val/loss", math.nan), ("train/loss", math.inf)):
        client.log_metric(run.info.run_id, key, value, step=0)
    for step, lr in enumerate((0.01, 0.005, 0.0025)):  # a learning-rate curve, as LearningRateMonitor logs it
        client.log_metric(run.info.run_id, "lr", lr, step=step)
    client.set_terminated(run.info.run_id, "FINISHED")
    hp = {"optimizer": "adam", "lr": 0.01, "schedule": "constant"}
    acc.add_trial(
        _trial(
            TrialState.COMPLETE,
            0.9,
            {"optimizer": "adam", "lr": 0.01},
            {
                attrs.MLFLOW_RUN: run.info.run_id,
                attrs.HYPERPARAMETERS: hp,
                attrs.EPOCHS_TRAINED: 4,
                attrs.ARRAY_ID: "a0",
            },
        )
    )
    acc.add_trial(_trial(TrialState.COMPLETE, math.inf, {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5}))
    pruned = {attrs.REASON: "pruned at epoch 1: below the median", attrs.EPOCHS_TRAINED: 2, attrs.ARRAY_ID: "a1"}
    acc.add_trial(_trial(TrialState.PRUNED, None, {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9}, pruned))
    failed = {attrs.REASON: "RuntimeError: out of memory", attrs.EPOCHS_TRAINED: 0, attrs.ARRAY_ID: "a1"}
    acc.add_trial(_trial(TrialState.FAIL, None, {"optimizer": "adam", "lr": 0.2}, failed))
    with warnings.catch_warnings():  # "heartbeats are meant for optimize": this trial is left RUNNING
        warnings.simplefilter("ignore", UserWarning)
        acc.ask({"optimizer": CategoricalDistribution(["sgd", "adam"])})
    acc.add_trial(
        _trial(TrialState.COMPLETE, 0.7, {"optimizer": "sgd", "lr": 0.001, "momentum": 0.0, "patience": 5})
    )  # no MLflow run
    acc.add_trial(_trial(TrialState.COMPLETE, -math.inf, {"optimizer": "adam", "lr": 0.3}))
    acc.set_user_attr(attrs.PARENT_RUN, "parent123")

    loss = optuna.create_study(storage=store, study_name="loss", direction="minimize")
    for value, lr in ((0.3, 0.01), (0.1, 0.02), (0.2, 0.03)):
        loss.add_trial(_trial(TrialState.COMPLETE, value, {"optimizer": "adam", "lr": lr}))

    multi = optuna.create_study(storage=store, study_name="multi", directions=["maximize", "minimize"])
    for values in ((0.9, 0.5), (0.8, 0.1)):
        multi.add_trial(_trial(TrialState.COMPLETE, values=values, params={"lr": 0.01}))


class TcpProxy:
    """A TCP relay to PostgreSQL that a test can cut, as a network or a restart would:
    ``down()`` drops every connection and refuses new ones until ``up()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        import threading

        self.target = (host, port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list = []
        self._listener = None
        self.up()

    def url(self, url: str) -> str:
        """``url`` (a PostgreSQL URL on the real server) pointed at this proxy."""
        import sqlalchemy as sa

        return sa.engine.make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def up(self) -> None:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        import socket

        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for s in [listener, *sockets]:
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        import socket

        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):  # shutdown wakes the other direction's recv; close alone would not
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
