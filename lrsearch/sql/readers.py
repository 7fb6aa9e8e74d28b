"""The PostgreSQL reader role (``lrsearch sql --grant-reader``): a LOGIN role that may only
read the views and the tables they read, in read-only sessions, which ``lrsearch sql``
needs to run a query a user wrote."""

from __future__ import annotations

import os
import re

from lrsearch.core.errors import LrsearchError, UsageError
from lrsearch.sql.queries import DEFAULT_TIMEOUT_S, _conninfo, _first
from lrsearch.sql.schema import VIEWS, ensure_views
from lrsearch.store.retry import reason
from lrsearch.store.urls import is_postgres, redact, storage_url, with_user

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
                # libpq's SCRAM verifier, made here as psql's \password makes it: no clear text is sent.
                verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
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
