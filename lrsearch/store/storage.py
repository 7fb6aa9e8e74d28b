"""Opening Optuna's store: an SQLite file (WAL, its owner checked) or a PostgreSQL schema,
its tables created once, its calls retried (``retrying_storage.py``)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core.errors import LrsearchError, UsageError, first_line
from lrsearch.store.folders import make_folder
from lrsearch.store.heartbeat import grace_period, heartbeat_interval
from lrsearch.store.lock import store_lock
from lrsearch.store.postgres import bound_idle_transactions, pg_connect_args, prepare_database, reason
from lrsearch.store.urls import is_postgres, redact, schema_url, sqlite_path

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from lrsearch.store.retrying_storage import RetryingStorage

# How long an SQLite writer waits for a lock before "database is locked".
SQLITE_TIMEOUT_S = 60
# Each worker's PostgreSQL connections: Optuna's pool (the main thread, and one of the
# heartbeat, pruning and tracking threads at a time) and the store lock's one. Each use is
# a short transaction, so a thread that finds both of Optuna's busy waits a moment.
OPTUNA_POOL_SIZE = 2
# Tables an Optuna RDB storage has (any one marks a file as an Optuna store), and MLflow's.
OPTUNA_MARKERS = ("studies", "version_info")
MLFLOW_MARKERS = ("experiments", "runs")


def open_storage(url: str, *, create: bool = True, hint: str = "") -> RetryingStorage:
    """An Optuna storage for ``url``, with heartbeats on, whose calls wait out a lost
    connection (see ``retry.py``; ``hint`` ends the message when the wait runs out).

    A PostgreSQL URL gets its ``optuna`` schema (created if missing), ``pool_pre_ping`` and
    a small pool. An SQLite file that holds another application's tables is refused, and
    with ``create=False`` a missing file is an error instead of a new empty store.
    Trials whose worker stopped beating are the worker loop's to fail (``service/claims.py``).
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError

    from lrsearch.store.retry import Retry
    from lrsearch.store.retrying_storage import RetryingStorage

    given = url
    beats = {"heartbeat_interval": heartbeat_interval(), "grace_period": grace_period()}  # checked before any file
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
            engine_kwargs.update(pool_size=OPTUNA_POOL_SIZE, max_overflow=0, connect_args=pg_connect_args(url))
        with store_lock(url), warnings.catch_warnings():  # workers must not race to create tables
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            if path is not None:
                new_sqlite_file(path)
            for attempt in (1, 2):
                warm = _schema_is_current(url, engine_kwargs, optuna.__version__)
                try:
                    storage = optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=beats["heartbeat_interval"],
                        grace_period=beats["grace_period"],
                        skip_table_creation=warm,
                        skip_compatibility_check=warm,
                    )
                    break
                except IntegrityError:
                    # Another Optuna client (not an lrsearch process: those hold the lock)
                    # created the tables at the same moment and stamped their version first:
                    # they are there now, so a second look finds them.
                    if attempt == 2:
                        raise
            if path is not None:
                _relax_sync(storage.engine)
            else:
                bound_idle_transactions(storage.engine)
    except (ArgumentError, NoSuchModuleError, ValueError) as e:  # not a database URL
        raise UsageError(f"bad storage URL {redact(url)}: {first_line(e)}") from e
    except LrsearchError:
        raise
    except Exception as e:  # server down, wrong credentials, unreadable file
        raise LrsearchError(f"cannot open storage {redact(url)}: {reason(e)}") from e
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

    engine = sa.create_engine(
        url, poolclass=sa.pool.NullPool, **{k: v for k, v in engine_kwargs.items() if k == "connect_args"}
    )
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
    for url, markers, kind, option in (
        (storage, OPTUNA_MARKERS, "Optuna storage", "--storage"),
        (tracking, MLFLOW_MARKERS, "MLflow tracking store", "--tracking-uri"),
    ):
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
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not an SQLite database ({e}); pass another {option}") from None
    if tables and not set(markers) & set(tables):
        shown = ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")
        raise UsageError(
            f"{path} holds another application's tables ({shown}) and no {kind}; "
            f"it was left unchanged: pass another {option}"
        )


def _relax_sync(engine: Engine) -> None:
    """``synchronous=NORMAL`` on this engine's SQLite connections: in WAL mode a commit then
    waits for no fsync (a dozen per trial); a power cut may lose the last commits, never the
    file (a crash of the process loses nothing)."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "connect")  # (its arguments: the driver's connection, untyped)
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
