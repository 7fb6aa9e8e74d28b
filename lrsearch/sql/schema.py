"""The views' SQL and its installation: sql/views.sql with its macros expanded for
PostgreSQL or SQLite, the ``lrsearch`` views (and the indexes their plans need) created or
replaced on a PostgreSQL database when their version changes, the indexes on an SQLite
store, and the script behind ``lrsearch sql --schema``."""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
from importlib import resources
from typing import TYPE_CHECKING, Any

from lrsearch.core import attrs
from lrsearch.core.errors import UsageError
from lrsearch.store.lock import store_lock
from lrsearch.store.postgres import prepare_database
from lrsearch.store.urls import is_postgres, sqlite_path, storage_url, tracking_uri

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

VIEWS = ("trials", "best_trials", "studies")
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
        "float_json": "to_jsonb({0})",  # the shortest text that reads back the same number
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
        # SQLite's JSON writes a REAL with 15 digits, which can read back as another number
        # (its last digits off Optuna's); 17 always read back the same.
        "float_json": "json(printf('%!.17g', {0}))",
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
        assert conn is not None  # a PostgreSQL store lock holds a connection of its own
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


def _view_readers(conn: Connection) -> list[str]:
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


def _statements(sql: str) -> list[str]:
    """The statements of a script whose comments are whole lines (as in sql/views.sql)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]
