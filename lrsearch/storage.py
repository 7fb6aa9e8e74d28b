"""Where results live: the embedded SQLite defaults, storage URLs and how to open them."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from lrsearch.errors import LrsearchError, UsageError, first_line

DATA_DIR_ENV = "LRSEARCH_DATA"
STORAGE_ENV = "LRSEARCH_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DATA_DIR = "lrsearch-data"
# How long an SQLite writer waits for a lock before "database is locked".
SQLITE_TIMEOUT_S = 60
SCHEMAS = ("optuna", "mlflow", "lrsearch")
_LOCK_KEY = 0x6C7273  # "lrs": advisory-lock keys of this project


def data_dir() -> Path:
    """The embedded store's folder: ``$LRSEARCH_DATA`` or ``./lrsearch-data``, absolute."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).resolve()


def storage_url(url: str | None = None) -> str:
    """The Optuna storage URL as given: ``url``, ``$LRSEARCH_STORAGE`` or the embedded
    SQLite file. A plain PostgreSQL URL is fine: ``open_storage`` adds the schema."""
    return url or os.environ.get(STORAGE_ENV) or f"sqlite:///{data_dir() / 'optuna.db'}"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri``, ``$MLFLOW_TRACKING_URI`` or the embedded SQLite file."""
    return uri or os.environ.get(TRACKING_ENV) or f"sqlite:///{data_dir() / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for tags and messages."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # an http URI with credentials
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def open_storage(url: str, *, create: bool = True,
                 stale_trial_callback: Callable[[Any, Any], None] | None = None) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url``, with heartbeats on.

    A PostgreSQL URL gets its ``optuna`` schema (created if missing) and ``pool_pre_ping``.
    With ``create=False`` a missing SQLite file is an error instead of a new empty store.
    ``stale_trial_callback`` runs for each trial whose worker stopped beating.
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise UsageError(f"no lrsearch store at {path} (run a study first, or pass --storage)")
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # Optuna sets it only for MySQL; idle PG links drop
    try:
        if is_postgres(url):
            prepare_database(url)
            url = schema_url(url, "optuna")
        with store_lock(url), warnings.catch_warnings():  # workers must not race to create tables
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            if path is not None:
                new_sqlite_file(path)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval(),
                grace_period=grace_period(), heartbeat_stale_trial_callback=stale_trial_callback)
            if path is not None:
                _relax_sync(storage.engine)
            return storage
    except (ArgumentError, NoSuchModuleError, ValueError) as e:  # not a database URL
        raise UsageError(f"bad storage URL {redact(url)}: {first_line(e)}") from e
    except LrsearchError:
        raise
    except Exception as e:  # server down, wrong credentials, unreadable file
        raise LrsearchError(f"cannot open storage {redact(url)}: {first_line(e)}") from e


# -- heartbeats ---------------------------------------------------------------------------

def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats (``$LRSEARCH_HEARTBEAT_INTERVAL``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_INTERVAL", "5"))


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial counts as dead
    (``$LRSEARCH_HEARTBEAT_GRACE``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_GRACE", "20"))


# -- PostgreSQL: one database, one schema per owner ----------------------------------------

def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres://"))


def pg_url(url: str) -> str:
    """``url`` with the psycopg 3 driver spelled out (``postgresql://`` maps to it anyway)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def schema_url(url: str, schema: str) -> str:
    """The URL whose connections put ``schema`` first on the search path, so Optuna's and
    MLflow's tables (both have an ``alembic_version``) live apart in one database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(pg_url(url))
    if "options" in parsed.query:
        return parsed.render_as_string(hide_password=False)  # the user chose the search path
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)


def prepare_database(url: str) -> None:
    """Create the ``optuna``, ``mlflow`` and ``lrsearch`` schemas if missing."""
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url(url), pool_pre_ping=True, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            # Serialize with other workers: concurrent CREATE SCHEMA IF NOT EXISTS can collide.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            for schema in SCHEMAS:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    except sa.exc.OperationalError as e:
        raise LrsearchError(f"cannot connect to {redact(url)}: {first_line(e)}") from e
    finally:
        engine.dispose()


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

    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Hold a lock shared by every lrsearch process on this store: a PostgreSQL advisory
    lock, or a lock file beside an SQLite file. For short critical sections only."""
    path = sqlite_path(url)
    if path is not None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if not is_postgres(url):
        yield
        return
    import sqlalchemy as sa

    with _lock_engine(pg_url(url)).connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY + 1})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY + 1})


@functools.lru_cache(maxsize=None)
def _lock_engine(url: str) -> Any:
    """One small pool per store for its lock: a worker takes the lock once per trial, and a
    new connection each time cost ~4 ms. The lock is the session's, released on the same
    connection (or by PostgreSQL when the connection drops)."""
    import sqlalchemy as sa

    return sa.create_engine(url, pool_size=1, max_overflow=4, pool_pre_ping=True)


def artifact_root(tracking: str) -> str | None:
    """Where an embedded (SQLite) tracking store keeps artifacts: beside its file.

    None for a tracking server, which decides (``mlflow-artifacts:/`` when it serves them).
    """
    path = sqlite_path(tracking)
    return (path.parent / "artifacts").resolve().as_uri() if path is not None else None
