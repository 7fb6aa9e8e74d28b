"""SQL over a study's results: the ``trials``, ``best_trials`` and ``studies`` views.

On PostgreSQL the views live in schema ``lrsearch`` beside ``optuna`` and ``mlflow``; on
the embedded SQLite files they are TEMP views in a connection that attaches both files (a
SQLite view can reference another attached file only when it is TEMP). Either way the view
names work unqualified, so one query text runs on both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

from lrsearch.errors import LrsearchError, UsageError, first_line
from lrsearch.storage import (
    is_postgres, pg_url, prepare_database, redact, sqlite_path, storage_url, store_lock, tracking_uri,
)

VIEWS = ("trials", "best_trials", "studies")
JSON_COLUMNS = {"params", "best_params"}
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
        "scalar": "(({0})::jsonb #>> ARRAY[]::text[])",
        "choice_json": "(({0})::jsonb -> 'attributes' -> 'choices' -> CAST({1} AS INTEGER))",
        "choice_text": "(({0})::jsonb -> 'attributes' -> 'choices' ->> CAST({1} AS INTEGER))",
        "to_json": "to_jsonb({0})",
        "object_agg": "COALESCE(jsonb_object_agg({0}, {1}), jsonb_build_object())",
        "seconds": "EXTRACT(EPOCH FROM ({1} - {0}))::" + _NUM,
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
        "scalar": "json_extract({0}, '$')",
        "choice_json": "json_extract({0}, '$.attributes.choices[' || CAST({1} AS INTEGER) || ']')",
        "choice_text": "json_extract({0}, '$.attributes.choices[' || CAST({1} AS INTEGER) || ']')",
        "to_json": "{0}",
        "object_agg": "json_group_object({0}, {1})",
        "seconds": "(julianday({1}) - julianday({0})) * 86400.0",
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
_WRITE_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                  sqlite3.SQLITE_RECURSIVE}


def view_sql(dialect: str) -> str:
    """The views' definitions in ``dialect`` ("postgresql" or "sqlite")."""
    text = resources.files("lrsearch").joinpath("sql/views.sql").read_text()
    templates = {**_SHARED, **_MACROS[dialect]}

    def expand(match: re.Match[str]) -> str:
        args = [a.strip() for a in (match.group(2) or "").split(";;")]
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
    return (f"ATTACH DATABASE '{optuna_file.resolve()}' AS optuna;\n"
            f"ATTACH DATABASE '{mlflow_file.resolve()}' AS mlflow;\n" + view_sql("sqlite"))


@dataclass
class Result:
    """A query's column names and rows."""

    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class ResultsDatabase:
    """A read-only connection where the views answer unqualified, on PostgreSQL or SQLite."""

    def __init__(self, storage: str | None = None, tracking: str | None = None) -> None:
        self.url = storage_url(storage)
        if is_postgres(self.url):
            ensure_views(self.url)
            self._conn: Any = _connect_pg(self.url)
            self.dialect = "postgresql"
        else:
            self._conn = _connect_sqlite(self.url, tracking_uri(tracking))
            self.dialect = "sqlite"

    def query(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Run one read-only statement; writes and bad SQL raise :class:`UsageError`."""
        try:
            if params and self.dialect == "postgresql":
                sql = sql.replace("?", "%s")  # lrsearch's own queries use qmark placeholders
            cursor = self._conn.execute(sql, tuple(params))
            columns = [d[0] for d in cursor.description or ()]
            rows = cursor.fetchall() if cursor.description else []
        except Exception as e:
            self._rollback()
            raise UsageError(_query_error(e)) from None
        if self.dialect == "sqlite":  # JSON columns come back as text: decode them like psycopg
            json_at = [i for i, c in enumerate(columns) if c in JSON_COLUMNS]
            rows = [tuple(json.loads(v) if i in json_at and isinstance(v, str) else v
                          for i, v in enumerate(row)) for row in rows]
        return Result(columns, [tuple(row) for row in rows])

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
    """``lrsearch best``: the study's rows of ``best_trials`` with ``rank <= top``."""
    with ResultsDatabase(storage, tracking) as db:
        if not db.query("SELECT 1 FROM studies WHERE study_name = ?", (name,)).rows:
            names = [r[0] for r in db.query("SELECT study_name FROM studies ORDER BY study_name").rows]
            raise UsageError(f"no study named {name!r} in {redact(db.url)} (studies: {', '.join(names) or 'none'})")
        return db.query("SELECT * FROM best_trials WHERE study_name = ? AND rank <= ? ORDER BY rank",
                        (name, top)).records()


def ensure_views(url: str) -> bool:
    """Create or replace the ``lrsearch`` views (and their indexes) on a PostgreSQL database,
    unless they are already current. Safe while workers run: one transaction under the
    store's lock. Returns False when MLflow's tables are not (yet) in the database."""
    import sqlalchemy as sa

    prepare_database(url)
    sql = view_sql("postgresql")
    version = "lrsearch views " + hashlib.sha256(sql.encode()).hexdigest()[:16]
    engine = sa.create_engine(pg_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if _pg_view_version(conn) == version:
                return True
        with store_lock(url), engine.begin() as conn:
            if _pg_view_version(conn) == version:
                return True
            if conn.execute(sa.text("SELECT to_regclass('mlflow.latest_metrics') IS NULL "
                                    "OR to_regclass('optuna.trials') IS NULL")).scalar():
                return False
            for view in reversed(VIEWS):
                conn.execute(sa.text(f"DROP VIEW IF EXISTS lrsearch.{view} CASCADE"))
            for statement in _statements(sql):
                conn.exec_driver_sql(statement)
            for index in INDEXES:
                conn.exec_driver_sql(index.format(optuna="optuna."))
            conn.exec_driver_sql(f"COMMENT ON VIEW lrsearch.trials IS '{version}'")
        return True
    finally:
        engine.dispose()


def ensure_indexes(url: str) -> None:
    """Create the views' indexes on an SQLite Optuna store (``lrsearch sql`` opens it read-only)."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn, conn:
        for index in INDEXES:
            conn.execute(index.format(optuna=""))


def _pg_view_version(conn: Any) -> str | None:
    import sqlalchemy as sa

    return conn.execute(sa.text("SELECT obj_description(to_regclass('lrsearch.trials'), 'pg_class')")).scalar()


def _connect_pg(url: str) -> Any:
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(pg_url(url))
    # libpq takes the URL's query (sslmode, …) as is; the search path is set below instead.
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    conninfo = parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)
    try:
        conn = psycopg.connect(conninfo, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise LrsearchError(f"cannot connect to {redact(url)}: {first_line(e)}") from None
    if conn.execute("SELECT to_regclass('lrsearch.trials') IS NULL").fetchone()[0]:
        conn.close()
        raise LrsearchError(f"no lrsearch views in {redact(url)}: MLflow's tables are not in its schema "
                            "'mlflow' (start `lrsearch server --db` on this database first)")
    conn.execute("SET search_path TO lrsearch, optuna, mlflow, public")
    conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    conn.commit()
    return conn


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
    else:
        # No MLflow file here (tracking on a server): empty tables keep the views' shape.
        conn.execute("ATTACH DATABASE ':memory:' AS mlflow")
        conn.executescript("CREATE TABLE mlflow.runs (run_uuid TEXT PRIMARY KEY, status TEXT);"
                           "CREATE TABLE mlflow.latest_metrics (run_uuid TEXT, key TEXT, value REAL, is_nan INTEGER);")
    conn.executescript(view_sql("sqlite"))
    conn.set_authorizer(_read_only)
    return conn


def _read_only(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _WRITE_ACTIONS else sqlite3.SQLITE_DENY


def _statements(sql: str) -> list[str]:
    """The statements of a script whose comments are whole lines (as in sql/views.sql)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


def _query_error(e: Exception) -> str:
    message = first_line(e)
    if isinstance(e, sqlite3.DatabaseError) and "not authorized" in message or "read-only" in message:
        return f"lrsearch sql runs read-only queries: {message}"
    return f"query failed: {message}"
