"""PostgreSQL: one database for everything, a schema per owner (Optuna's, MLflow's,
lrsearch's views), created when missing and the role may; lrsearch's connection settings."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from lrsearch.core.errors import LrsearchError
from lrsearch.store.heartbeat import grace_period
from lrsearch.store.urls import pg_parts, pg_url, redact

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

SCHEMAS = ("optuna", "mlflow", "lrsearch")
LOCK_KEY = 0x6C7273  # "lrs": advisory-lock keys of this project


def prepare_database(url: str, extra_schemas: tuple[str, ...] = ()) -> None:
    """Create the database if it is missing and its role may (see :func:`create_database`),
    then the ``optuna``, ``mlflow`` and ``lrsearch`` schemas (and ``extra_schemas``) if
    missing; once per process and database."""
    import sqlalchemy as sa

    if (url, extra_schemas) in _PREPARED:
        return

    engine = sa.create_engine(
        pg_url(url), pool_pre_ping=True, poolclass=sa.pool.NullPool, connect_args=pg_connect_args(url)
    )
    try:
        for attempt in (1, 2):
            try:
                with engine.begin() as conn:
                    # Serialize with other workers: concurrent CREATE SCHEMA IF NOT EXISTS can collide.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
                    for schema in (*SCHEMAS, *extra_schemas):
                        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                break
            except sa.exc.OperationalError as e:
                missing = _missing(url, e)
                if missing == "database" and attempt == 1:
                    create_database(url)  # then connect again
                    continue
                if missing:
                    raise LrsearchError(
                        _setup_hint(url, f'{missing} "{_names(url)[missing]}" does not exist on {_server(url)}')
                    ) from e
                raise LrsearchError(f"cannot connect to {redact(url)}: {reason(e)}") from e
    finally:
        engine.dispose()
    _PREPARED.add((url, extra_schemas))


def create_database(url: str) -> None:
    """Create the database ``url`` names, owned by its role, connecting as that role (same
    host, port and credentials) to the ``postgres`` maintenance database. A role without
    CREATEDB gets one line naming the two commands that set up the role and the database."""
    import sqlalchemy as sa

    parsed = pg_parts(url)
    names = _names(url)
    maintenance = parsed.set(database="postgres").render_as_string(hide_password=False)
    engine = sa.create_engine(
        maintenance, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT", connect_args=pg_connect_args(maintenance)
    )
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": names["database"]}
            ).scalar()
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote_identifier(names["database"])
                # The new database's owner is the role that creates it: the role of ``url``.
                conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
    except sa.exc.DBAPIError as e:
        state = getattr(e.orig, "sqlstate", None)
        if state in ("42P04", "23505"):  # another worker created it a moment ago: it is there
            return
        why = "may not create it" if state == "42501" else f"could not create it ({reason(e)})"
        raise LrsearchError(
            _setup_hint(
                url, f'database "{names["database"]}" does not exist on {_server(url)} and role "{names["role"]}" {why}'
            )
        ) from e
    finally:
        engine.dispose()


def _names(url: str) -> dict[str, str]:
    """The database and role ``url`` names (libpq's defaults when it names none)."""
    import getpass

    parsed = pg_parts(url)
    role = parsed.username or os.environ.get("PGUSER") or getpass.getuser()
    return {"database": parsed.database or os.environ.get("PGDATABASE") or role, "role": role}


def _missing(url: str, error: BaseException) -> str | None:
    """``"database"`` or ``"role"`` when connecting failed because the server has no such
    database or role. A failed connection carries no SQLSTATE, only the server's message: these are
    PostgreSQL's English words (a server with another ``lc_messages`` gets its own message
    shown instead)."""
    text = str(getattr(error, "orig", None) or error)
    names = _names(url)
    for kind in ("database", "role"):
        if f'{kind} "{names[kind]}" does not exist' in text:
            return kind
    return None


def _server(url: str) -> str:
    """``host:port`` of a PostgreSQL URL, for messages."""

    parsed = pg_parts(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


def _setup_hint(url: str, problem: str) -> str:
    """One line: what is missing, and the two commands (run as PostgreSQL's superuser) that
    create the role and its database. No password in it: ``--pwprompt`` asks for the role's."""
    import shlex

    names = {k: shlex.quote(v) for k, v in _names(url).items()}
    return (
        f"{problem}; as PostgreSQL's superuser, create the role and its database: "
        f"sudo -u postgres createuser --pwprompt {names['role']} (skip it if the role exists), then "
        f"sudo -u postgres createdb --owner {names['role']} {names['database']}"
    )


_PREPARED: set[tuple[str, tuple[str, ...]]] = set()


def pg_connect_args(url: str) -> dict[str, Any]:
    """libpq options for lrsearch's own PostgreSQL connections, unless the URL sets them: a
    name that tells an operator whose connection it is (``pg_stat_activity``), and bounds
    on connecting and on a peer that vanished, so an outage is noticed and retried."""
    from urllib.parse import parse_qsl, urlsplit  # not SQLAlchemy's parser: the queue's commands skip its import

    given = dict(parse_qsl(urlsplit(url).query))
    options = {
        "application_name": f"lrsearch {socket.gethostname()}:{os.getpid()}",
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    return {k: v for k, v in options.items() if k not in given}


def reason(e: BaseException) -> str:
    """Why a connection failed, in one line (``retry.reason``, imported when needed)."""
    from lrsearch.store.retry import reason as why

    return why(e)


def bound_idle_transactions(engine: Engine) -> None:
    """PostgreSQL ends a session of this worker that idles inside a transaction for longer
    than the grace period: a worker paused mid-transaction (a suspended machine) would
    otherwise hold its trial's row lock for good, and every other worker would wait on it
    while failing that trial. Its own transactions are short; once it runs again, the lost
    session is a lost connection, retried."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "connect")  # (its arguments: the driver's connection, untyped)
    def bound(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"SET idle_in_transaction_session_timeout = {grace_period() * 1000}")
        dbapi_connection.commit()

    engine.dispose()  # the connections opened before the listener
