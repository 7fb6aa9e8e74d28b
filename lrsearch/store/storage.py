"""Where results live: the embedded SQLite defaults, storage URLs and how to open them."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

from lrsearch.core.errors import LrsearchError, UsageError, first_line
from lrsearch.store.urls import data_dir, is_postgres, pg_parts, pg_url, redact, schema_url, sqlite_path

# How long an SQLite writer waits for a lock before "database is locked".
SQLITE_TIMEOUT_S = 60
SCHEMAS = ("optuna", "mlflow", "lrsearch")
_LOCK_KEY = 0x6C7273  # "lrs": advisory-lock keys of this project
# Each worker's PostgreSQL connections: Optuna's pool (the main thread, and one of the
# heartbeat, pruning and tracking threads at a time) and the store lock's one. Each use is
# a short transaction, so a thread that finds both of Optuna's busy waits a moment.
OPTUNA_POOL_SIZE = 2
# Tables an Optuna RDB storage has (any one marks a file as an Optuna store), and MLflow's.
OPTUNA_MARKERS = ("studies", "version_info")
MLFLOW_MARKERS = ("experiments", "runs")


def make_folder(folder: Path) -> None:
    """``mkdir -p``, failing in one line that names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LrsearchError(f"cannot create the folder {folder}: {e.strerror}") from e


def open_storage(url: str, *, create: bool = True, hint: str = "") -> Any:
    """An Optuna storage for ``url``, with heartbeats on, whose calls wait out a lost
    connection (see ``retry.py``; ``hint`` ends the message when the wait runs out).

    A PostgreSQL URL gets its ``optuna`` schema (created if missing), ``pool_pre_ping`` and
    a small pool. An SQLite file that holds another application's tables is refused, and
    with ``create=False`` a missing file is an error instead of a new empty store.
    Trials whose worker stopped beating are the worker loop's to fail (``service/worker.py``).
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from lrsearch.store.retry import Retry
    from lrsearch.store.retrying_storage import RetryingStorage

    given = url
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise UsageError(f"no lrsearch store at {path} (run a study first, or pass --storage)")
        check_sqlite_owner(path, OPTUNA_MARKERS, "Optuna storage", "--storage")
        make_folder(path.parent)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # Optuna sets it only for MySQL; idle PG links drop
    try:
        if is_postgres(url):
            prepare_database(url)
            url = schema_url(url, "optuna")
            engine_kwargs.update(pool_size=OPTUNA_POOL_SIZE, max_overflow=0,
                                 connect_args=pg_connect_args(url))
        with store_lock(url), warnings.catch_warnings():  # workers must not race to create tables
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            if path is not None:
                new_sqlite_file(path)
            warm = _schema_is_current(url, engine_kwargs, optuna.__version__)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval(),
                grace_period=grace_period(), skip_table_creation=warm, skip_compatibility_check=warm)
            if path is not None:
                _relax_sync(storage.engine)
            else:
                _bound_idle_transactions(storage.engine)
    except (ArgumentError, NoSuchModuleError, ValueError) as e:  # not a database URL
        raise UsageError(f"bad storage URL {redact(url)}: {first_line(e)}") from e
    except LrsearchError:
        raise
    except Exception as e:  # server down, wrong credentials, unreadable file
        raise LrsearchError(f"cannot open storage {redact(url)}: {_reason(e)}") from e
    from lrsearch.core.stopping import check_stop

    retry = Retry(f"the database {redact(given)}", hint=hint, check_stop=check_stop)
    # Optuna's cache of finished trials (what optuna.create_study would wrap it in), then retries.
    return RetryingStorage(optuna.storages.get_storage(storage), retry, storage.engine)


def _schema_is_current(url: str, engine_kwargs: dict[str, Any], version: str) -> bool:
    """Whether the store's tables were created (or last upgraded) by this very Optuna
    release, so its table creation and schema check can be skipped: they import Alembic and
    read every migration script (about half of a ``submit``). Optuna stamps ``version_info``
    when it creates or upgrades the tables; any other answer (no tables yet, another
    release, an error) means the full check."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, **{k: v for k, v in engine_kwargs.items()
                                                                  if k == "connect_args"})
    try:
        with engine.connect() as conn:
            stamped = conn.execute(sa.text("SELECT library_version FROM version_info")).scalar()
    except sa.exc.SQLAlchemyError:  # no such table: a new store
        return False
    finally:
        engine.dispose()
    return stamped == version


def check_stores(storage: str, tracking: str) -> None:
    """Refuse SQLite files that belong to another application, before anything is written
    beside them (see :func:`check_sqlite_owner`)."""
    for url, markers, kind, option in ((storage, OPTUNA_MARKERS, "Optuna storage", "--storage"),
                                       (tracking, MLFLOW_MARKERS, "MLflow tracking store", "--tracking-uri")):
        path = sqlite_path(url)
        if path is not None:
            check_sqlite_owner(path, markers, kind, option)


def check_sqlite_owner(path: Path, markers: tuple[str, ...], kind: str, option: str) -> None:
    """Refuse an SQLite file that holds tables but none of ``markers`` (another application's
    database), before anything is written to it: it is opened read-only."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                 "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not an SQLite database ({e}); pass another {option}") from None
    if tables and not set(markers) & set(tables):
        shown = ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")
        raise UsageError(f"{path} holds another application's tables ({shown}) and no {kind}; "
                         f"it was left unchanged: pass another {option}")


# -- heartbeats ---------------------------------------------------------------------------

def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats (``$LRSEARCH_HEARTBEAT_INTERVAL``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_INTERVAL", "5"))


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial counts as dead
    (``$LRSEARCH_HEARTBEAT_GRACE``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_GRACE", "20"))


class Heartbeat:
    """A trial's heartbeat, recorded now and every ``heartbeat_interval()`` seconds on a
    thread until :meth:`stop` (nothing for a storage without heartbeats). It outlives the
    trial's training: the worker keeps beating until the trial's MLflow record is sent, so a
    study's last worker can tell a record on its way (a live worker beats) from one lost
    with its worker (no beat for the grace period). A beat that fails (an outage longer than
    the store's window) is tried again at the next interval; the trial meets the same outage."""

    def __init__(self, store: Any, trial_id: int) -> None:
        self.store = store
        self.trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        if self.store.get_heartbeat_interval() is not None:
            self._thread = threading.Thread(target=self._beat, name="lrsearch-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (from any thread; idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _beat(self) -> None:
        while True:
            try:
                self.store.record_heartbeat(self.trial_id)
            except Exception:
                pass
            if self._stop.wait(heartbeat_interval()):
                return


# -- PostgreSQL: one database, one schema per owner ----------------------------------------


def prepare_database(url: str, extra_schemas: tuple[str, ...] = ()) -> None:
    """Create the database if it is missing and its role may (see :func:`create_database`),
    then the ``optuna``, ``mlflow`` and ``lrsearch`` schemas (and ``extra_schemas``) if
    missing; once per process and database."""
    import sqlalchemy as sa

    if (url, extra_schemas) in _PREPARED:
        return

    engine = sa.create_engine(pg_url(url), pool_pre_ping=True, poolclass=sa.pool.NullPool,
                              connect_args=pg_connect_args(url))
    try:
        for attempt in (1, 2):
            try:
                with engine.begin() as conn:
                    # Serialize with other workers: concurrent CREATE SCHEMA IF NOT EXISTS can collide.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                    for schema in (*SCHEMAS, *extra_schemas):
                        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                break
            except sa.exc.OperationalError as e:
                missing = _missing(url, e)
                if missing == "database" and attempt == 1:
                    create_database(url)  # then connect again
                    continue
                if missing:
                    raise LrsearchError(_setup_hint(
                        url, f'{missing} "{_names(url)[missing]}" does not exist on {_server(url)}')) from e
                raise LrsearchError(f"cannot connect to {redact(url)}: {_reason(e)}") from e
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
    engine = sa.create_engine(maintenance, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT",
                              connect_args=pg_connect_args(maintenance))
    try:
        with engine.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                  {"name": names["database"]}).scalar()
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote_identifier(names["database"])
                # The new database's owner is the role that creates it: the role of ``url``.
                conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
    except sa.exc.DBAPIError as e:
        state = getattr(e.orig, "sqlstate", None)
        if state in ("42P04", "23505"):  # another worker created it a moment ago: it is there
            return
        why = "may not create it" if state == "42501" else f"could not create it ({_reason(e)})"
        raise LrsearchError(_setup_hint(url, f'database "{names["database"]}" does not exist on {_server(url)} '
                                             f'and role "{names["role"]}" {why}')) from e
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
    return (f"{problem}; as PostgreSQL's superuser, create the role and its database: "
            f"sudo -u postgres createuser --pwprompt {names['role']} (skip it if the role exists), then "
            f"sudo -u postgres createdb --owner {names['role']} {names['database']}")


_PREPARED: set[tuple[str, tuple[str, ...]]] = set()


def pg_connect_args(url: str) -> dict[str, Any]:
    """libpq options for lrsearch's own PostgreSQL connections, unless the URL sets them: a
    name that tells an operator whose connection it is (``pg_stat_activity``), and bounds
    on connecting and on a peer that vanished, so an outage is noticed and retried."""
    from urllib.parse import parse_qsl, urlsplit  # not SQLAlchemy's parser: the queue's commands skip its import

    given = dict(parse_qsl(urlsplit(url).query))
    options = {"application_name": f"lrsearch {socket.gethostname()}:{os.getpid()}", "connect_timeout": 10,
               "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "tcp_user_timeout": 30_000}
    return {k: v for k, v in options.items() if k not in given}


def _reason(e: BaseException) -> str:
    from lrsearch.store.retry import reason

    return reason(e)


def _bound_idle_transactions(engine: Any) -> None:
    """PostgreSQL ends a session of this worker that idles inside a transaction for longer
    than the grace period: a worker paused mid-transaction (a suspended machine) would
    otherwise hold its trial's row lock for good, and every other worker would wait on it
    while failing that trial. Its own transactions are short; once it runs again, the lost
    session is a lost connection, retried."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "connect")
    def bound(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"SET idle_in_transaction_session_timeout = {grace_period() * 1000}")
        dbapi_connection.commit()

    engine.dispose()  # the connections opened before the listener


def _relax_sync(engine: Any) -> None:
    """``synchronous=NORMAL`` on this engine's SQLite connections: in WAL mode a commit then
    waits for no fsync (a dozen per trial); a power cut may lose the last commits, never the
    file (a crash of the process loses nothing)."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "connect")
    def _normal_sync(connection: Any, record: Any) -> None:
        if connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":  # stores made before WAL: as they were
            connection.execute("PRAGMA synchronous=NORMAL")

    engine.dispose()  # connections opened before the listener get it when reopened


def checkpoint(url: str) -> None:
    """Fold an SQLite store's WAL back into its file (a copy of the ``.db`` alone is then
    complete); a no-op for other URLs, and skipped while another process is busy with it."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=0)) as conn:
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:  # locked by a worker still running: it checkpoints later
            pass


def new_sqlite_file(path: Path) -> None:
    """Create an empty SQLite database at ``path`` in WAL mode, unless one exists.

    WAL (kept by the file): readers never wait for a writer, so workers on one host read
    the study (the median pruner reads every trial) while another commits, and a commit is
    one fsync instead of several.
    """
    if path.exists():
        return
    import sqlite3

    make_folder(path.parent)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


class StoreLock:
    """A held store lock: ``held()`` tells whether it still is (a PostgreSQL session lock
    ends with its connection, which a database restart or ``pg_terminate_backend`` drops).
    On PostgreSQL, ``connection`` is the lock's own, for work done under it."""

    def __init__(self, connection: Any = None, key: int = 0) -> None:
        self.connection = connection
        self._key = key

    def held(self) -> bool:
        if self.connection is None:
            return True  # a file lock lasts as long as this process holds the file
        import sqlalchemy as sa

        try:
            return bool(self.connection.execute(sa.text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = 0 AND objid = :key)"), {"key": self._key}).scalar())
        except Exception:  # the connection is gone, and the lock with it
            return False


@contextlib.contextmanager
def store_lock(url: str, retry: Any = None) -> Iterator[StoreLock]:
    """Hold a lock shared by every lrsearch process on this store: a PostgreSQL advisory
    lock, or a lock file beside an SQLite file. For short critical sections only, never
    nested (each process has one connection for it). On PostgreSQL, taking the lock waits
    out a lost connection through ``retry`` (a :class:`lrsearch.store.retry.Retry`)."""
    path = sqlite_path(url)
    if path is not None:
        import fcntl

        make_folder(path.parent)
        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield StoreLock()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if not is_postgres(url):
        yield StoreLock()
        return
    from lrsearch.store.retry import Retry

    key = _LOCK_KEY + 1
    conn = (retry or Retry(f"the database {redact(url)}")).call(_lock_connection, _lock_url(url), key)
    try:
        yield StoreLock(conn, key)
    finally:
        _unlock(conn, key)


def _lock_url(url: str) -> str:
    """The database's URL without a search path: one lock connection per database."""

    parsed = pg_parts(url)
    return parsed.set(query={k: v for k, v in parsed.query.items() if k != "options"}).render_as_string(
        hide_password=False)


def _lock_connection(url: str, key: int) -> Any:
    import sqlalchemy as sa

    conn = _lock_engine(url).connect()
    try:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()  # the lock is the session's: it outlives the transaction
    except BaseException:
        conn.close()
        raise
    return conn


def _unlock(conn: Any, key: int) -> None:
    import sqlalchemy as sa

    try:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    except Exception:
        pass  # the connection dropped: PostgreSQL released the lock with it
    finally:
        conn.close()


def close_connections() -> None:
    """Close the store locks' connections (before this process execs another)."""
    for engine in _LOCK_ENGINES.values():
        engine.dispose()


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    """One connection per store for its lock, kept open: a worker takes the lock once per
    trial, and connecting each time cost more than the claim itself."""
    import sqlalchemy as sa

    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sa.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                                              connect_args=pg_connect_args(url))
    return _LOCK_ENGINES[url]


def folder_name(name: str) -> str:
    """A study name as one safe path component (names lrsearch creates already are one;
    studies made by other tools may be called anything)."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")[:100]
    return slug or "_"


def report_dir(url: str, name: str) -> Path:
    """Where ``lrsearch report`` writes a study's files: beside an SQLite store, in
    ``reports/NAME``; for a PostgreSQL study, in ``LRSEARCH_DATA/reports/<host>-<port>-<db>/NAME``,
    so studies of the same name in two stores never share a folder."""
    path = sqlite_path(url)
    if path is not None:
        return path.resolve().parent / "reports" / folder_name(name)

    parsed = pg_parts(url)
    store = folder_name(f"{parsed.host or 'localhost'}-{parsed.port or 5432}-{parsed.database or ''}")
    return data_dir() / "reports" / store / folder_name(name)


def artifact_root(tracking: str) -> str | None:
    """Where an embedded (SQLite) tracking store keeps artifacts: beside its file.

    None for a tracking server, which decides (``mlflow-artifacts:/`` when it serves them).
    """
    path = sqlite_path(tracking)
    return (path.parent / "artifacts").resolve().as_uri() if path is not None else None
