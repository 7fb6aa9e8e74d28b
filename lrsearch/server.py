"""The MLflow tracking server (and UI) on an lrsearch store."""

from __future__ import annotations

import os
import sys

from lrsearch.errors import UsageError
from lrsearch.storage import artifact_root, data_dir, is_postgres, prepare_database, schema_url, sqlite_path


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
        raise UsageError(f"expected a postgresql:// or sqlite:/// database URL, got {db!r}")
    if not path.exists():
        raise UsageError(f"no MLflow store at {path} (run a study first, or pass another URL)")
    return db


def _create_tables(backend: str, db: str) -> None:
    """Create MLflow's and Optuna's tables now (MLflow would at start-up), so the lrsearch
    views over both can be created before the server runs."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from lrsearch.queries import ensure_views
    from lrsearch.storage import close_connections, open_storage
    from lrsearch.tracking import quiet_mlflow

    quiet_mlflow()
    SqlAlchemyStore(backend, (data_dir() / "artifacts").as_uri()).engine.dispose()
    open_storage(db).close()
    ensure_views(db)
    close_connections()  # the server process execs MLflow's: it would inherit them, idle, for good


def server_command(backend: str, *, host: str = "127.0.0.1", port: int = 5000,
                   artifacts: str | None = None, allowed_hosts: str | None = None,
                   workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line for ``backend``, artifacts served by the server.

    One uvicorn worker by default: with more, uvicorn's listening socket loses TCP_NODELAY
    and every request on a kept-alive connection waits ~40 ms for the client's delayed ACK
    (Kludex/uvicorn#3149), which made each MLflow call 5-8x slower here.
    """
    destination = artifacts or artifact_root(backend) or (data_dir() / "artifacts").as_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--host", host, "--port", str(port), "--workers", str(workers),
           "--serve-artifacts", "--artifacts-destination", destination]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def serve(db: str, *, host: str = "127.0.0.1", port: int = 5000, artifacts: str | None = None,
          allowed_hosts: str | None = None, workers: int = 1) -> int:
    """Become the tracking server on ``db`` (exec, so signals reach it directly)."""
    cmd = server_command(backend_uri(db), host=host, port=port, artifacts=artifacts,
                         allowed_hosts=allowed_hosts, workers=workers)
    # MLflow 3 also starts a job runner and seven task consumers for its GenAI features; they
    # poll the database and take CPU even when idle, and lrsearch uses none of them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI: http://{host}:{port}/#/experiments?workflowType=machine_learning", file=sys.stderr)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 1  # not reached: execv replaces this process or raises
