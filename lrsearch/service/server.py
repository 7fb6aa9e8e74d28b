"""The MLflow tracking server (and UI) on an lrsearch store.

No secret goes on a command line, which every local user can read (``ps``): the backend
URL reaches ``mlflow server`` through ``MLFLOW_BACKEND_STORE_URI``, and with ``auth`` the
login database is named without its password, which libpq takes from ``PGPASSWORD``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from lrsearch.core.errors import WARNING_PREFIX, LrsearchError, UsageError
from lrsearch.core.names import UI_APP
from lrsearch.store.folders import artifact_root, make_folder
from lrsearch.store.postgres import prepare_database
from lrsearch.store.urls import data_dir, is_postgres, pg_parts, redact, schema_url, shown_host, sqlite_path, with_user

DB_ENV = "LRSEARCH_DB"
ADMIN_USER_ENV, ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_SCHEMA = "mlflow_auth"  # MLflow's login tables (they have an alembic_version too)
# MLflow checks each request's password with PBKDF2 (hundreds of ms); a worker sends
# thousands of requests, so a checked login is remembered this long (MLflow's own cache).
AUTH_CACHE_S = 300
SERVER_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "4", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "4"}
# `lrsearch ui` without --verbose: uvicorn's own log at WARNING and no access log (MLflow's
# default config logs every request at INFO); warnings and errors still reach stderr.
QUIET_LOG_CONFIG = Path(__file__).with_name("uvicorn_quiet_log.json")
# The one notice `mlflow server` prints however it is configured (click.echo, not a logger),
# whose advice (--host 0.0.0.0) is not lrsearch's: left out of a quiet `lrsearch ui`.
_BANNER = b"[MLflow] Security middleware enabled"
# Runs beside the server, between its stderr and the terminal: copies every line but the
# banner, and but the traceback uvicorn logs when Ctrl-C cancels the app's lifespan task (an
# ERROR record ending in asyncio's CancelledError: the normal end, not a failure), and ends
# when the server and its workers have all closed their stderr. It ignores Ctrl-C and
# SIGTERM (sent to the whole process group) so the server's last words still pass.
_STDERR_FILTER = f"""
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
held = []  # an ERROR record's traceback, until its last line tells what it was


def put(lines):
    out = b"".join(line + b"\\n" for line in lines if not line.startswith({_BANNER!r}))
    if out:
        os.write(1, out)


FRAMING = (b"Traceback (most recent call last):", b"During handling of the above exception",
           b"The above exception was the direct cause", b"KeyboardInterrupt")


def take(line):
    global held
    if held:
        held.append(line)
        summary = line.strip() and not line[:1].isspace() and not line.startswith(FRAMING)
        if line.strip() == b"asyncio.exceptions.CancelledError":  # Ctrl-C's, whole: dropped
            held = []
        elif line[:1].isdigit() and b"ERROR" in line:  # another record began: the held one was not Ctrl-C's
            put(held[:-1])
            held = []
            take(line)
        elif summary or len(held) > 400:  # the traceback ended in another exception: shown whole
            put(held)
            held = []
    elif b"ERROR" in line and line.rstrip().endswith(b"Traceback (most recent call last):"):
        held = [line]
    else:
        put([line])


rest = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, rest = (rest + chunk).split(b"\\n")
    for line in lines:
        take(line)
if rest:
    take(rest)
put(held)
"""


def backend_uri(db: str) -> str:
    """The MLflow backend store for ``db``: an SQLite file as is, a PostgreSQL database
    with MLflow's tables in schema ``mlflow`` (created if missing)."""
    if is_postgres(db):
        prepare_database(db)
        backend = schema_url(db, "mlflow")
        _create_tables(backend, db)
        return backend
    path = sqlite_path(db)
    if path is None:
        raise UsageError(f"expected a postgresql:// or sqlite:/// database URL, got {redact(db)}")
    if not path.exists():
        raise UsageError(f"no MLflow store at {path} (run a study first, or pass another URL)")
    return db


def _create_tables(backend: str, db: str) -> None:
    """Create MLflow's and Optuna's tables now (MLflow would at start-up), so the lrsearch
    views over both can be created before the server runs."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from lrsearch.sql.schema import ensure_views
    from lrsearch.store.lock import close_connections
    from lrsearch.store.storage import open_storage
    from lrsearch.track.quiet import quiet_mlflow

    quiet_mlflow()
    store = SqlAlchemyStore(backend, (data_dir() / "artifacts").as_uri())  # type: ignore[no-untyped-call]  # MLflow's
    store.engine.dispose()
    open_storage(db).close()
    ensure_views(db)
    close_connections()  # the server process execs MLflow's: it would inherit them, idle, for good


def server_command(
    backend: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
    allowed_hosts: str | None = None,
    workers: int = 1,
    auth: bool = False,
) -> list[str]:
    """The ``mlflow server`` command line for ``backend`` (which itself goes in the
    environment), artifacts served by the server.

    One uvicorn worker by default: with more, uvicorn's listening socket loses TCP_NODELAY
    and every request on a kept-alive connection waits for the client's delayed ACK
    (Kludex/uvicorn#3149); see docs/performance.md.
    """
    destination = artifacts or artifact_root(backend) or (data_dir() / "artifacts").as_uri()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--serve-artifacts",
        "--artifacts-destination",
        destination,
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    # MLflow's login app, else MLflow's app with its UI's defaults for a tracking user (track/ui_app.py).
    cmd += ["--app-name", "basic-auth" if auth else UI_APP]
    return cmd


def auth_environment(db: str) -> dict[str, str]:
    """What MLflow's basic-auth app needs, none of it on a command line: a config file in the
    data folder (no secret in it) naming the login database, a CSRF key, and the admin's
    password from ``$MLFLOW_AUTH_ADMIN_PASSWORD`` (MLflow creates that admin on first start)."""
    password = os.environ.get(ADMIN_PASSWORD_ENV, "")
    if len(password) < 12:
        raise UsageError(
            f"--auth needs the admin's password (12 characters or more) in ${ADMIN_PASSWORD_ENV}; "
            f"workers then log in with $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD"
        )
    env = {
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
        ADMIN_USER_ENV: os.environ.get(ADMIN_USER_ENV) or "admin",
    }
    if is_postgres(db):
        prepare_database(db, extra_schemas=(AUTH_SCHEMA,))
        db_password = pg_parts(db).password  # the database's, not the admin's
        if db_password:
            env["PGPASSWORD"] = str(db_password)
        database = with_user(schema_url(db, AUTH_SCHEMA))
    else:
        path = sqlite_path(db)
        assert path is not None  # backend_uri checked it
        database = f"sqlite:///{path.resolve().parent / 'basic_auth.db'}"
    config = (
        f"[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {database.replace('%', '%%')}\n"  # configparser: % is special
        f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n"
    )
    path = data_dir() / "auth.ini"  # rewritten at each start (no secret in it: see above)
    make_folder(path.parent)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(config)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(path)
    return env


def serve(
    db: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
    allowed_hosts: str | None = None,
    workers: int = 1,
    auth: bool = False,
    quiet: bool = False,
) -> int:
    """Become the tracking server on ``db`` (or ``$LRSEARCH_DB``): exec, so signals reach it.

    ``quiet``: none of MLflow's and uvicorn's INFO lines, access log, banner or Python
    warnings on the terminal, only their warnings and errors (see :func:`quiet_server`)."""
    db = db or os.environ.get(DB_ENV)
    if not db:
        raise UsageError(f"expected the database URL in --db or ${DB_ENV}, e.g. postgresql+psycopg://user@host/db")
    env = dict(os.environ)
    env.pop(DB_ENV, None)
    env["MLFLOW_BACKEND_STORE_URI"] = backend_uri(db)
    if auth:
        env.update(auth_environment(db))
    elif not _loopback(host):
        print(
            f"{WARNING_PREFIX}serving on {host} without authentication: anyone who reaches this port can "
            "read and change every study (add --auth)",
            file=sys.stderr,
        )
    # MLflow 3 also starts a job runner and seven task consumers for its GenAI features; they
    # poll the database and take CPU even when idle, and lrsearch uses none of them.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # A bound on the server's own PostgreSQL connections (SQLAlchemy's default pool grows to
    # 15): every worker's connections come out of the same max_connections.
    for name, value in SERVER_POOL.items():
        env.setdefault(name, value)
    cmd = server_command(
        env["MLFLOW_BACKEND_STORE_URI"],
        host=host,
        port=port,
        artifacts=artifacts,
        allowed_hosts=allowed_hosts,
        workers=workers,
        auth=auth,
    )
    check_port(host, port)
    shown = shown_host(host)
    print(
        f"MLflow UI: http://{shown}:{port}/#/experiments?workflowType=machine_learning"
        + (" (log in as the admin)" if auth else ""),
        file=sys.stderr,
    )
    sys.stderr.flush()
    if quiet:
        cmd = quiet_server(cmd, env)
    os.execve(cmd[0], cmd, env)
    return 1  # not reached: execve replaces this process or raises


def quiet_server(cmd: list[str], env: dict[str, str]) -> list[str]:
    """Make ``cmd`` (``mlflow server``) quiet: MLflow's loggers at WARNING, uvicorn's log
    config without access log, no Python warnings (unless ``PYTHONWARNINGS`` says otherwise),
    the registry URI given (else MLflow says it used the backend's), and this process's stderr
    through :data:`_STDERR_FILTER`. Returns the command to exec; ``env`` is updated."""
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("MLFLOW_REGISTRY_STORE_URI", env["MLFLOW_BACKEND_STORE_URI"])  # MLflow's own default
    read, write = os.pipe()
    subprocess.Popen(
        [sys.executable, "-c", _STDERR_FILTER],
        stdin=read,
        stdout=sys.stderr.fileno(),
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    os.close(read)
    os.dup2(write, sys.stderr.fileno())
    os.close(write)
    return [*cmd, "--uvicorn-opts", f"--log-config {shlex.quote(str(QUIET_LOG_CONFIG))}"]


def check_port(host: str, port: int) -> None:
    """Fail in one line (exit 1) when something already listens on ``host:port``: MLflow
    would print uvicorn's bind error and still exit 0. Bound as uvicorn binds (SO_REUSEADDR,
    so connections in TIME_WAIT from a previous server do not count), then released."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LrsearchError(
                    f"port {port} on {host} is in use (another lrsearch ui or MLflow server?); stop it or pass --port"
                ) from None
            # Anything else (an address not on this machine, a name): MLflow reports it.


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
