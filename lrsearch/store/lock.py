"""The store lock every lrsearch process on one store shares, for short critical sections
(claiming trials, creating tables, a study's parent run): a PostgreSQL advisory lock on a
connection kept for it, or a lock file beside an SQLite file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lrsearch.store.folders import make_folder
from lrsearch.store.postgres import LOCK_KEY, pg_connect_args
from lrsearch.store.urls import is_postgres, pg_parts, redact, sqlite_path

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from lrsearch.store.retry import Retry


class StoreLock:
    """A held store lock: ``held()`` tells whether it still is (a PostgreSQL session lock
    ends with its connection, which a database restart or ``pg_terminate_backend`` drops).
    On PostgreSQL, ``connection`` is the lock's own, for work done under it."""

    def __init__(self, connection: Connection | None = None, key: int = 0) -> None:
        self.connection = connection
        self._key = key

    def held(self) -> bool:
        if self.connection is None:
            return True  # a file lock lasts as long as this process holds the file
        import sqlalchemy as sa

        try:
            return bool(
                self.connection.execute(
                    sa.text(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND pid = pg_backend_pid() AND classid = 0 AND objid = :key)"
                    ),
                    {"key": self._key},
                ).scalar()
            )
        except Exception:  # the connection is gone, and the lock with it
            return False


@contextlib.contextmanager
def store_lock(url: str, retry: Retry | None = None) -> Iterator[StoreLock]:
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

    key = LOCK_KEY + 1
    conn = (retry or Retry(f"the database {redact(url)}")).call(_lock_connection, _lock_url(url), key)
    try:
        yield StoreLock(conn, key)
    finally:
        _unlock(conn, key)


def _lock_url(url: str) -> str:
    """The database's URL without a search path: one lock connection per database."""

    parsed = pg_parts(url)
    return parsed.set(query={k: v for k, v in parsed.query.items() if k != "options"}).render_as_string(
        hide_password=False
    )


def _lock_connection(url: str, key: int) -> Connection:
    import sqlalchemy as sa

    conn = _lock_engine(url).connect()
    try:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()  # the lock is the session's: it outlives the transaction
    except BaseException:
        conn.close()
        raise
    return conn


def _unlock(conn: Connection, key: int) -> None:
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


_LOCK_ENGINES: dict[str, Engine] = {}


def _lock_engine(url: str) -> Engine:
    """One connection per store for its lock, kept open: a worker takes the lock once per
    trial, and connecting each time cost more than the claim itself."""
    import sqlalchemy as sa

    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sa.create_engine(
            url, pool_size=1, max_overflow=0, pool_pre_ping=True, connect_args=pg_connect_args(url)
        )
    return _LOCK_ENGINES[url]
