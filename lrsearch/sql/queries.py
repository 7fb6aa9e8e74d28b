"""SQL over a study's results: the ``trials``, ``best_trials`` and ``studies`` views.

On PostgreSQL the views live in schema ``lrsearch`` beside ``optuna`` and ``mlflow``; on
the embedded SQLite files they are TEMP views in a connection that attaches both files (a
SQLite view can reference another attached file only when it is TEMP). Either way the view
names work unqualified, so one query text runs on both.

A query a user wrote (``lrsearch sql``) runs as exactly one statement, in a transaction
that stays read-only and is always rolled back, under a statement timeout; on PostgreSQL
only as a role that can neither write lrsearch's tables nor reach the server's files and
programs (``grant_reader`` creates one), because a superuser's session has ways around
any read-only setting. On SQLite an authorizer allows reading only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lrsearch.choices.space import in_sampling_order
from lrsearch.core import attrs
from lrsearch.core.errors import LrsearchError, UsageError, first_line, unknown_study
from lrsearch.core.text import shown_params
from lrsearch.store.lock import store_lock
from lrsearch.store.postgres import prepare_database
from lrsearch.store.retry import reason
from lrsearch.store.urls import is_postgres, libpq_url, redact, sqlite_path, storage_url, tracking_uri, with_user

VIEWS = ("trials", "best_trials", "studies")
DEFAULT_TIMEOUT_S = 30.0
# What a reader role may read besides the views: the tables they read, and MLflow's metric
# history (for whole curves, as in the last example of docs/sql.md). Nothing else.
READER_TABLES = (
    "optuna.studies",
    "optuna.study_directions",
    "optuna.study_user_attributes",
    "optuna.trials",
    "optuna.trial_values",
    "optuna.trial_params",
    "optuna.trial_user_attributes",
    "mlflow.runs",
    "mlflow.latest_metrics",
    "mlflow.metrics",
)
READER_PASSWORD_ENV = "LRSEARCH_READER_PASSWORD"
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
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
# Indexes the views' plans need on Optuna's tables (named lrsearch_*, created idempotently).
INDEXES = (
    "CREATE INDEX IF NOT EXISTS lrsearch_trials_study_state ON {optuna}trials (study_id, state, number, trial_id)",
    "CREATE INDEX IF NOT EXISTS lrsearch_trial_values_value ON {optuna}trial_values "
    "(trial_id, objective, value_type, value)",
)

_NUM = "DOUBLE PRECISION"
_MACROS: dict[str, dict[str, str]] = {
    "postgresql": {
        "create_view": "CREATE VIEW lrsearch.{0} AS",
        "view": "lrsearch.{0}",
        "text": "(({0})::jsonb ->> '{1}')",
        "number": "CAST(({0})::jsonb ->> '{1}' AS " + _NUM + ")",
        "final_text": "(({0})::jsonb -> 'final' ->> '{1}')",
        "final_number": "CAST(({0})::jsonb -> 'final' ->> '{1}' AS " + _NUM + ")",
        "json": "(({0})::jsonb)",
        "scalar": "(({0})::jsonb #>> ARRAY[]::text[])",
        "choice_json": "(({0})::jsonb -> 'attributes' -> 'choices' -> CAST({1} AS INTEGER))",
        "choice_text": "(({0})::jsonb -> 'attributes' -> 'choices' ->> CAST({1} AS INTEGER))",
        "to_json": "to_jsonb({0})",
        "object_agg": "COALESCE(jsonb_object_agg({0}, {1}), jsonb_build_object())",
        # A trial's duration (results.duration_s's rule): whole milliseconds, half away from zero.
        "seconds": "CAST(round(CAST(EXTRACT(EPOCH FROM ({1} - {0})) AS NUMERIC), 3) AS " + _NUM + ")",
        # The ranked trials' details, looked up one by one by a function the planner cannot
        # inline (it has a SET clause) and costs as one cheap row: it guesses the ranking's
        # output from all of the study's trials, and would otherwise plan (and JIT-compile)
        # the details of every one of them.
        "trial_lookup": "CREATE FUNCTION lrsearch.trial_row(wanted INTEGER) RETURNS SETOF lrsearch.trials "
        "LANGUAGE sql STABLE ROWS 1 SET jit = off "
        "AS 'SELECT * FROM lrsearch.trials WHERE trial_id = wanted';",
        "join_trial": "CROSS JOIN LATERAL lrsearch.trial_row({1}) {0}",
    },
    "sqlite": {
        "create_view": "CREATE TEMP VIEW {0} AS",
        "view": "{0}",
        "text": "json_extract({0}, '$.{1}')",
        "number": "CAST(json_extract({0}, '$.{1}') AS " + _NUM + ")",
        "final_text": "json_extract({0}, '$.final.{1}')",
        "final_number": "CAST(json_extract({0}, '$.final.{1}') AS " + _NUM + ")",
        "json": "json({0})",
        "scalar": "json_extract({0}, '$')",
        # As JSON: json_extract alone turns a boolean choice into 1 or 0 (SQLite has no booleans).
        "choice_json": "json(CASE json_type({0}, '$.attributes.choices[' || CAST({1} AS INTEGER) || ']') "
        "WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE json_quote(json_extract({0}, "
        "'$.attributes.choices[' || CAST({1} AS INTEGER) || ']')) END)",
        "choice_text": "json_extract({0}, '$.attributes.choices[' || CAST({1} AS INTEGER) || ']')",
        "to_json": "{0}",
        "object_agg": "json_group_object({0}, {1})",
        # As on PostgreSQL, from the exact microseconds of the stored text ('YYYY-MM-DD
        # HH:MM:SS.ffffff', as SQLAlchemy writes it): SQLite's date functions read a time to the
        # millisecond only, so julianday's difference could end a millisecond off.
        "seconds": "(round(((CAST(strftime('%s', substr({1}, 1, 19)) AS INTEGER) "
        "- CAST(strftime('%s', substr({0}, 1, 19)) AS INTEGER)) * 1000000 "
        "+ CAST(substr({1} || '000000', 21, 6) AS INTEGER) "
        "- CAST(substr({0} || '000000', 21, 6) AS INTEGER)) / 1000.0) / 1000.0)",
        "trial_lookup": "",
        "join_trial": "JOIN trials {0} ON {0}.trial_id = {1}",
    },
}
# Macros written the same way in both dialects, in terms of the ones above.
_SHARED = {
    # A param decoded to its label (categoricals) or value, as text / as a number.
    "param_text": "(SELECT CASE WHEN {{text: p.distribution_json ;; name}} = 'CategoricalDistribution' "
    "THEN {{choice_text: p.distribution_json ;; p.param_value}} ELSE CAST(p.param_value AS TEXT) END "
    "FROM optuna.trial_params p WHERE p.trial_id = t.trial_id AND p.param_name = '{0}')",
    "param_number": "(SELECT CASE WHEN {{text: p.distribution_json ;; name}} = 'CategoricalDistribution' "
    "THEN CAST({{choice_text: p.distribution_json ;; p.param_value}} AS " + _NUM + ") "
    "ELSE p.param_value END "
    "FROM optuna.trial_params p WHERE p.trial_id = t.trial_id AND p.param_name = '{0}')",
    # MLflow's last value of a metric: NULL for NaN (stored as 0 with is_nan) and for +-inf
    # (stored as +-1.797e308).
    "final_metric": "(SELECT CASE WHEN lm.is_nan OR abs(lm.value) >= 1.7976931348623157e308 THEN NULL "
    "ELSE lm.value END FROM mlflow.latest_metrics lm "
    "WHERE lm.run_uuid = r.run_uuid AND lm.key = '{0}')",
}
_MACRO = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
# What a reader's query may do on SQLite (the authorizer allows these and denies the rest).
_READER_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def view_sql(dialect: str) -> str:
    """The views' definitions in ``dialect`` ("postgresql" or "sqlite")."""
    text = resources.files("lrsearch").joinpath("sql/views.sql").read_text()
    templates = {**_SHARED, **_MACROS[dialect]}

    def expand(match: re.Match[str]) -> str:
        args = [a.strip() for a in (match.group(2) or "").split(";;")]
        if match.group(1) == "attr":  # an attribute key, as a string literal: see attrs.py
            return f"'{attrs.SQL_NAMES[args[0]]}'"
        return templates[match.group(1)].format(*args)

    previous = None
    while previous != text:  # innermost macros first, until none is left
        previous, text = text, _MACRO.sub(expand, text)
    return text


def schema_script(storage: str | None = None, tracking: str | None = None) -> str:
    """The SQL behind the views for this store: on SQLite, a script for the ``sqlite3`` shell
    (ATTACH both files, then the TEMP views); on PostgreSQL, the ``lrsearch`` views."""
    url = storage_url(storage)
    if is_postgres(url):
        return "SET search_path TO lrsearch, optuna, mlflow, public;\n" + view_sql("postgresql")
    optuna_file, mlflow_file = sqlite_path(url), sqlite_path(tracking_uri(tracking))
    if optuna_file is None or mlflow_file is None:
        raise UsageError("--schema needs SQLite files or a PostgreSQL database for both stores")
    return (
        f"ATTACH DATABASE '{optuna_file.resolve()}' AS optuna;\n"
        f"ATTACH DATABASE '{mlflow_file.resolve()}' AS mlflow;\n" + view_sql("sqlite")
    )


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
            self._conn: Any = None
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
    ``mlflow``: its run's page on a tracking server, else its run's id; and ``model``: the
    registered model's URI on the row of the trial it was made from (else None)."""
    from lrsearch.track.tracking import trial_link

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
        row["mlflow"] = trial_link(uri, experiment_id, row["mlflow_run_id"]) if experiment_id else row["mlflow_run_id"]
        # The registered model, on the row of the trial it was made from.
        row["model"] = model["uri"] if model and model.get("run_id") == row["mlflow_run_id"] else None
    return rows


def ensure_views(url: str) -> bool:
    """Create or replace the ``lrsearch`` views (and their indexes) on a PostgreSQL database,
    unless they are already current. Safe while workers run: one transaction under the
    store's lock, on the lock's own connection (a worker holds no more connections for it).
    Returns False when MLflow's tables are not (yet) in the database."""
    import sqlalchemy as sa

    prepare_database(url)
    sql = view_sql("postgresql")
    version = views_version()
    with store_lock(url) as lock:
        conn = lock.connection
        try:
            if _pg_view_version(conn) == version:
                return True
            if conn.execute(
                sa.text("SELECT to_regclass('mlflow.latest_metrics') IS NULL OR to_regclass('optuna.trials') IS NULL")
            ).scalar():
                return False
            readers = _view_readers(conn)  # a new view has no grants: give the readers theirs back
            for view in reversed(VIEWS):
                conn.execute(sa.text(f"DROP VIEW IF EXISTS lrsearch.{view} CASCADE"))
            for statement in _statements(sql):
                conn.exec_driver_sql(statement)
            for index in INDEXES:
                conn.exec_driver_sql(index.format(optuna="optuna."))
            for reader in readers:
                conn.exec_driver_sql(f"GRANT SELECT ON {', '.join('lrsearch.' + v for v in VIEWS)} TO {reader}")
            conn.exec_driver_sql(f"COMMENT ON VIEW lrsearch.trials IS '{version}'")
            conn.commit()
        finally:
            conn.rollback()  # nothing left open on the lock's connection
        return True


def ensure_indexes(url: str) -> None:
    """Create the views' indexes on an SQLite Optuna store (``lrsearch sql`` opens it read-only)."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn, conn:
        for index in INDEXES:
            conn.execute(index.format(optuna=""))


def views_version() -> str:
    """The views' version: a digest of their SQL, stored as a comment on ``lrsearch.trials``."""
    return "lrsearch views " + hashlib.sha256(view_sql("postgresql").encode()).hexdigest()[:16]


def _pg_view_version(conn: Any) -> str | None:
    """The version of the views on a connection (SQLAlchemy's or psycopg's)."""
    sql = "SELECT obj_description(to_regclass('lrsearch.trials'), 'pg_class')"
    if hasattr(conn, "exec_driver_sql"):
        return conn.exec_driver_sql(sql).scalar()
    return conn.execute(sql).fetchone()[0]


def _view_readers(conn: Any) -> list[str]:
    """The roles (quoted) granted SELECT on ``lrsearch.trials``, but for its owner."""
    import sqlalchemy as sa

    return list(
        conn.execute(
            sa.text(
                "SELECT DISTINCT quote_ident(a.grantee::regrole::text) FROM pg_class c, aclexplode(c.relacl) a "
                "WHERE c.oid = to_regclass('lrsearch.trials') AND a.privilege_type = 'SELECT' "
                "AND a.grantee <> c.relowner AND a.grantee <> 0"
            )
        ).scalars()
    )


def _connect_pg(url: str, user_sql: bool) -> Any:
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


def grant_reader(url: str, role: str) -> str:
    """Create (or update) the PostgreSQL role ``role`` that may only read results: LOGIN,
    SELECT on the ``lrsearch`` views and the tables in :data:`READER_TABLES`, its sessions
    read-only with the views first on their search path. Its password, if any, comes from
    ``$LRSEARCH_READER_PASSWORD`` and is sent as a SCRAM verifier, never in clear. Run it
    with a superuser's (or a CREATEROLE owner's) URL. Returns the URL to read with."""
    import psycopg
    from psycopg import sql

    if not _ROLE_NAME.fullmatch(role):
        raise UsageError(f"--grant-reader: expected a role name of lowercase letters, digits and '_', got {role!r}")
    if not is_postgres(storage_url(url)):
        raise UsageError(
            "--grant-reader needs a PostgreSQL --storage (the embedded files are read-only for lrsearch sql)"
        )
    url = storage_url(url)
    if not ensure_views(url):
        raise LrsearchError(f"no MLflow tables in {redact(url)} yet: start `lrsearch server` on it first")
    password = os.environ.get(READER_PASSWORD_ENV) or None
    ident = sql.Identifier(role)
    try:
        with psycopg.connect(_conninfo(url), connect_timeout=10, autocommit=False) as conn:
            found = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if found is None:
                conn.execute(
                    sql.SQL(
                        "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"
                    ).format(ident)
                )
            elif _first(
                conn.execute(
                    "SELECT rolsuper OR rolcreaterole OR rolreplication OR rolbypassrls "
                    "FROM pg_roles WHERE rolname = %s",
                    (role,),
                )
            ):
                raise UsageError(f"--grant-reader: role {role!r} exists and can do more than read; choose another name")
            if password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(_scram(password))))
            database = sql.Identifier(conn.info.dbname)
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, ident))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA lrsearch, optuna, mlflow TO {}").format(ident))
            tables = [f"lrsearch.{v}" for v in VIEWS] + list(READER_TABLES)
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.SQL(", ").join(sql.Identifier(*t.split(".")) for t in tables), ident
                )
            )
            for setting, value in (
                ("search_path", sql.SQL("lrsearch, optuna, mlflow")),
                ("default_transaction_read_only", sql.Literal("on")),
                ("statement_timeout", sql.Literal(f"{int(DEFAULT_TIMEOUT_S)}s")),
            ):
                conn.execute(
                    sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
                        ident, database, sql.Identifier(setting), value
                    )
                )
            conn.commit()
    except psycopg.errors.InsufficientPrivilege as e:
        raise UsageError(
            f"--grant-reader: {reason(e)} (use a superuser's URL, or a CREATEROLE role that owns the schemas)"
        ) from None
    except psycopg.OperationalError as e:
        raise LrsearchError(f"cannot connect to {redact(url)}: {reason(e)}") from None
    return with_user(url, role)


def _first(cursor: Any) -> Any:
    """The first column of a query's one row (None if it returned none)."""
    row = cursor.fetchone()
    return None if row is None else row[0]


def _scram(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (as psql's \\password sends it)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


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


def _statements(sql: str) -> list[str]:
    """The statements of a script whose comments are whole lines (as in sql/views.sql)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


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
