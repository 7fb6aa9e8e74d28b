"""SQL over a study's results: the ``trials``, ``best_trials`` and ``studies`` views.

On PostgreSQL the views live in schema ``lrsearch`` beside ``optuna`` and ``mlflow``; on
the embedded SQLite files they are TEMP views in a connection that attaches both files (a
SQLite view can reference another attached file only when it is TEMP). Either way the view
names work unqualified, so one query text runs on both.

A query a user wrote (``lrsearch sql``) runs as exactly one statement, in a transaction
that stays read-only and is always rolled back, under a statement timeout; on PostgreSQL
only as a role that can neither write lrsearch's tables nor reach the server's files and
programs (readers.py's ``grant_reader`` creates one), because a superuser's session has
ways around any read-only setting. On SQLite an authorizer allows reading only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrsearch.choices.space import in_sampling_order
from lrsearch.core.errors import LrsearchError, UsageError, first_line, unknown_study
from lrsearch.core.text import shown_params
from lrsearch.sql.schema import _pg_view_version, ensure_views, view_sql, views_version
from lrsearch.store.retry import reason
from lrsearch.store.urls import is_postgres, libpq_url, redact, sqlite_path, storage_url, tracking_uri, with_user

if TYPE_CHECKING:
    import psycopg

DEFAULT_TIMEOUT_S = 30.0
# A role that can do more than read: write lrsearch's tables or views, create in their
# schemas, or act as the server's OS user or on other sessions.
_PRIVILEGED_SQL = """
SELECT r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls
       OR pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER')
       OR pg_has_role(current_user, 'pg_read_server_files', 'MEMBER')
       OR pg_has_role(current_user, 'pg_write_server_files', 'MEMBER')
       OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')
       OR EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname IN ('optuna', 'mlflow', 'lrsearch')
                  AND has_schema_privilege(n.oid, 'CREATE'))
       OR EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname IN ('optuna', 'mlflow', 'lrsearch') AND c.relkind IN ('r', 'p', 'v')
                  AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER'))
FROM pg_roles r WHERE r.rolname = current_user
"""
JSON_COLUMNS = {"params", "best_params", "pbt"}
# What a reader's query may do on SQLite (the authorizer allows these and denies the rest).
_READER_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


@dataclass
class Result:
    """A query's column names and rows."""

    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class ResultsDatabase:
    """A read-only connection where the views answer unqualified, on PostgreSQL or SQLite.

    With ``user_sql=True`` the connection will run text a user wrote (``lrsearch sql``):
    on PostgreSQL its role must be a reader (see the module); lrsearch's own queries
    (``lrsearch best``) run as any role. Every statement stops after ``timeout`` seconds.
    """

    def __init__(
        self,
        storage: str | None = None,
        tracking: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        user_sql: bool = False,
    ) -> None:
        self.url = storage_url(storage)
        self.timeout = timeout
        if is_postgres(self.url):
            self._conn: Any = None  # psycopg's connection here, sqlite3's below: each call branches on the dialect
            if not user_sql:  # lrsearch's own queries: the views made or replaced if they are not current
                try:
                    self._conn = _connect_pg(self.url, user_sql)
                    current = _pg_view_version(self._conn) == views_version()
                except LrsearchError:  # no views yet, or no database yet (made if the role may)
                    current = False
                if not current:
                    if self._conn is not None:
                        self._conn.close()
                    ensure_views(self.url)
                    self._conn = None
            self._conn = self._conn or _connect_pg(self.url, user_sql)
            self.dialect = "postgresql"
        else:
            self._conn = _connect_sqlite(self.url, tracking_uri(tracking))
            self.dialect = "sqlite"

    def query(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Run one read-only statement; writes and bad SQL raise :class:`UsageError`."""
        try:
            if self.dialect == "postgresql":
                columns, rows = self._query_pg(sql, params)
            else:
                columns, rows = self._query_sqlite(sql, params)
        except Exception as e:
            self._rollback()
            raise UsageError(_query_error(e, self.timeout)) from None
        if self.dialect == "sqlite":  # JSON columns come back as text: decode them like psycopg
            json_at = [i for i, c in enumerate(columns) if c in JSON_COLUMNS]
            rows = [
                tuple(json.loads(v) if i in json_at and isinstance(v, str) else v for i, v in enumerate(row))
                for row in rows
            ]
        return Result(columns, [tuple(row) for row in rows])

    def _query_pg(self, sql: str, params: Sequence[Any]) -> tuple[list[str], list[Any]]:
        # The connection is read-only (BEGIN READ ONLY); the first query below takes the
        # transaction's snapshot, after which nothing can make it read-write. prepare=True
        # sends the text through the extended protocol, which refuses a second statement.
        try:
            self._conn.execute(
                "SELECT set_config('statement_timeout', %s, true)", (str(max(1, int(self.timeout * 1000))),)
            )
            cursor = self._conn.execute(sql.replace("?", "%s") if params else sql, tuple(params) or None, prepare=True)
            columns = [d[0] for d in cursor.description or ()]
            return columns, cursor.fetchall() if cursor.description else []
        finally:
            self._rollback()

    def _query_sqlite(self, sql: str, params: Sequence[Any]) -> tuple[list[str], list[Any]]:
        deadline = time.monotonic() + self.timeout
        # Called every few thousand virtual-machine steps; a true return interrupts the query.
        self._conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        cursor = self._conn.execute(sql, tuple(params))  # sqlite3 refuses a second statement
        columns = [d[0] for d in cursor.description or ()]
        return columns, cursor.fetchall() if cursor.description else []

    def active_workers(self, grace: float) -> dict[str, int]:
        """Per study, its RUNNING trials whose heartbeat is younger than ``grace`` seconds,
        on the database's clock (one worker trains one trial at a time): Optuna's staleness
        rule, without opening Optuna. Heartbeats are stored as the database's ``now()``:
        UTC text on SQLite, the session's local time on PostgreSQL."""
        fresh = (
            "h.heartbeat > LOCALTIMESTAMP - make_interval(secs => ?)"
            if self.dialect == "postgresql"
            else "h.heartbeat > datetime('now', '-' || CAST(? AS TEXT) || ' seconds')"
        )
        rows = self.query(
            "SELECT s.study_name, COUNT(*) FROM optuna.trials t "
            "JOIN optuna.studies s ON s.study_id = t.study_id "
            "JOIN optuna.trial_heartbeats h ON h.trial_id = t.trial_id "
            f"WHERE t.state = 'RUNNING' AND {fresh} GROUP BY s.study_name",
            (float(grace),),
        ).rows
        return {name: int(n) for name, n in rows}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsDatabase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rollback(self) -> None:
        try:
            self._conn.rollback()
        except Exception:
            pass


def best_trials_sql(storage: str | None, tracking: str | None, name: str, top: int) -> list[dict[str, Any]]:
    """``lrsearch best``: the study's rows of ``best_trials`` with ``rank <= top``, each with
    ``mlflow_url``: its run's page (an embedded store's while ``lrsearch ui`` runs), ``mlflow``:
    what the table shows of it (the page on a tracking server, else the run's id), and
    ``model``: the registered model's URI on the row of the trial it was made from (else None)."""
    from lrsearch.track.links import run_url, trial_link

    with ResultsDatabase(storage, tracking) as db:
        if not db.query("SELECT 1 FROM studies WHERE study_name = ?", (name,)).rows:
            names = [r[0] for r in db.query("SELECT study_name FROM studies ORDER BY study_name").rows]
            raise unknown_study(name, redact(db.url), names)
        rows = db.query(
            "SELECT * FROM best_trials WHERE study_name = ? AND rank <= ? ORDER BY rank", (name, top)
        ).records()
        experiment_id, model = db.query(
            "SELECT mlflow_experiment_id, model FROM studies WHERE study_name = ?", (name,)
        ).rows[0]
    model = json.loads(model) if isinstance(model, str) else model
    uri = tracking_uri(tracking)
    for row in rows:  # JSON objects keep no order: shown in sampling order, as everywhere
        params = json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
        pbt = json.loads(row["pbt"]) if isinstance(row["pbt"], str) else row["pbt"]
        row.update(shown_params(in_sampling_order(params or {}), pbt))
        run_id = row["mlflow_run_id"]
        row["mlflow_url"] = run_url(uri, experiment_id, run_id) if experiment_id and run_id else None
        row["mlflow"] = trial_link(uri, experiment_id, run_id) if experiment_id else run_id
        # The registered model, on the row of the trial it was made from.
        row["model"] = model["uri"] if model and model.get("run_id") == row["mlflow_run_id"] else None
    return rows


def _connect_pg(url: str, user_sql: bool) -> psycopg.Connection[tuple[Any, ...]]:
    import psycopg

    conninfo = _conninfo(url)
    try:
        conn = psycopg.connect(conninfo, connect_timeout=10, application_name="lrsearch sql")
    except psycopg.OperationalError as e:
        raise LrsearchError(f"cannot connect to {redact(url)}: {reason(e)}") from None
    try:
        if user_sql and _first(conn.execute(_PRIVILEGED_SQL)):
            role = conn.info.user
            reader = with_user(url, "lrsearch_reader")
            raise UsageError(
                f"lrsearch sql runs queries only as a read-only role, and {role!r} can write to this database "
                f"or act as its server: create a reader once with `lrsearch sql --grant-reader lrsearch_reader "
                f"--storage {redact(url)}`, then pass --storage {reader}"
            )
        if _first(conn.execute("SELECT to_regclass('lrsearch.trials') IS NULL")):
            raise LrsearchError(
                f"no lrsearch views in {redact(url)}: MLflow's tables are not in its schema "
                "'mlflow' (start `lrsearch server` on this database first)"
            )
        conn.execute("SET search_path TO lrsearch, optuna, mlflow, public")
        conn.commit()
    except BaseException:
        conn.close()
        raise
    conn.read_only = True  # every transaction from here on: BEGIN READ ONLY
    return conn


def _conninfo(url: str) -> str:
    return libpq_url(url)


def _first(cursor: Any) -> Any:
    """The first column of a query's one row (None if it returned none)."""
    row = cursor.fetchone()
    return None if row is None else row[0]


def _connect_sqlite(storage: str, tracking: str) -> sqlite3.Connection:
    optuna_file = sqlite_path(storage)
    if optuna_file is None:
        raise UsageError(f"expected a sqlite:/// or postgresql:// storage URL, got {redact(storage)}")
    if not optuna_file.exists():
        raise UsageError(f"no lrsearch store at {optuna_file} (run a study first, or pass --storage)")
    conn = sqlite3.connect(":memory:", uri=True)
    conn.execute("ATTACH DATABASE ? AS optuna", (f"{optuna_file.resolve().as_uri()}?mode=ro",))
    mlflow_file = sqlite_path(tracking)
    if mlflow_file is not None and mlflow_file.exists():
        conn.execute("ATTACH DATABASE ? AS mlflow", (f"{mlflow_file.resolve().as_uri()}?mode=ro",))
        if (
            conn.execute(
                "SELECT COUNT(*) FROM mlflow.sqlite_master WHERE type = 'table' AND name IN ('runs', 'latest_metrics')"
            ).fetchone()[0]
            < 2
        ):
            conn.execute("DETACH DATABASE mlflow")  # a new file, MLflow's tables not (all) made yet
    if "mlflow" not in [row[1] for row in conn.execute("PRAGMA database_list")]:
        # No MLflow tables here (tracking on a server, or no worker has started a study yet):
        # empty tables keep the views' shape.
        conn.execute("ATTACH DATABASE ':memory:' AS mlflow")
        conn.executescript(
            "CREATE TABLE mlflow.runs (run_uuid TEXT PRIMARY KEY, status TEXT);"
            "CREATE TABLE mlflow.latest_metrics (run_uuid TEXT, key TEXT, value REAL, is_nan INTEGER);"
        )
    conn.executescript(view_sql("sqlite"))
    conn.set_authorizer(_read_only)
    return conn


def _read_only(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _READER_ACTIONS else sqlite3.SQLITE_DENY


def _query_error(e: Exception, timeout: float) -> str:
    message = first_line(e)
    timed_out = "statement timeout" in message or isinstance(e, sqlite3.OperationalError) and message == "interrupted"
    if timed_out:
        return f"query stopped after {timeout:g} s (statement timeout; --timeout S to allow longer)"
    if "multiple commands" in message or "one statement at a time" in message:
        return f"lrsearch sql runs one statement per call: {message}"
    refused = (
        "not authorized",
        "authorization denied",
        "read-only",
        "read-write mode",
        "permission denied",
        "must be superuser",
        "must be a superuser",
        "privilege",
    )
    if any(word in message for word in refused):
        return f"lrsearch sql runs read-only queries: {message}"
    return f"query failed: {message}"
