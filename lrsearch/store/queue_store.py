"""The study queue's reads and writes for ``submit`` and ``cancel``, in SQL over Optuna's own
tables (``studies``, ``study_directions``, ``study_user_attributes``, ``trials``), on a
plain ``sqlite3`` or ``psycopg`` connection.

Why not Optuna's API: opening an ``RDBStorage`` imports Optuna, SQLAlchemy's ORM and Alembic
(about 0.5 s), which a command that writes a few rows and returns should not pay (issue 23:
``submit`` under a second). The rows are the ones Optuna's ``create_new_study`` and
``set_study_user_attr`` write (values as JSON, directions and states by their enum names),
and only on tables this very Optuna release made (its ``version_info``): a new store, or one
another release made, is opened through Optuna first (``storage.open_storage``), which
creates or checks its tables. Workers read and write the same rows through Optuna.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lrsearch.core.errors import UsageError
from lrsearch.store.lock import store_lock
from lrsearch.store.postgres import LOCK_KEY, pg_connect_args, prepare_database
from lrsearch.store.storage import new_sqlite_file
from lrsearch.store.urls import is_postgres, libpq_url, redact, sqlite_path


def optuna_version() -> str:
    """The installed Optuna's version, without importing it."""
    from importlib.metadata import version

    return version("optuna")


class QueueStore:
    """One connection to an Optuna store, for the queue's few statements."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = is_postgres(url)
        self._conn = self._connect()

    def _connect(self) -> Any:  # sqlite3's or psycopg's connection: the statements branch on self.postgres
        if not self.postgres:
            path = sqlite_path(self.url)
            if path is None:  # lrsearch keeps studies in SQLite files or PostgreSQL
                raise UsageError(
                    f"bad storage URL {redact(self.url)}: expected sqlite:///FILE or postgresql://USER@HOST/DATABASE"
                )
            new_sqlite_file(path)  # a new store starts in WAL mode, as Optuna's storage makes it
            return sqlite3.connect(path, timeout=60, isolation_level=None)  # transactions: BEGIN below
        import psycopg

        conninfo, options = libpq_url(self.url), pg_connect_args(self.url)
        try:
            conn = psycopg.connect(conninfo, autocommit=True, **options)
        except psycopg.OperationalError:
            prepare_database(self.url)  # a missing database (created if the role may) or schema: one line
            conn = psycopg.connect(conninfo, autocommit=True, **options)
        conn.execute("SET search_path TO optuna")
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- statements --------------------------------------------------------------------------

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            sql = sql.replace("?", "%s")
        return list(self._conn.execute(sql, tuple(params)).fetchall())

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._all(sql, params)
        return rows[0][0] if rows else None

    def made_by_this_optuna(self) -> bool:
        """Whether the store's tables exist and were made (or last upgraded) by the installed
        Optuna release, whose rows this module writes."""
        try:
            return self._one("SELECT library_version FROM version_info") == optuna_version()
        except Exception:  # no such table: a new store
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The store lock every lrsearch process takes for a claim or a submission (see
        ``lock.store_lock``), held around one transaction on this connection."""
        if self.postgres:  # the same session advisory lock as store_lock's, on this connection
            self._conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY + 1,))
            try:
                with self._conn.transaction():
                    yield
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY + 1,))
        else:
            with store_lock(self.url):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")

    def study_id(self, name: str) -> int | None:
        return self._one("SELECT study_id FROM studies WHERE study_name = ?", (name,))

    def directions(self, study_id: int) -> list[str]:
        """``["maximize"]``: the study's directions, as a study file names them."""
        return [
            r[0].lower()
            for r in self._all(
                "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective", (study_id,)
            )
        ]

    def user_attrs(self, study_id: int) -> dict[str, Any]:
        return {
            key: json.loads(value)
            for key, value in self._all(
                "SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", (study_id,)
            )
        }

    def create_study(self, name: str, direction: str) -> int:
        """A new study of one objective, as Optuna's ``create_new_study`` writes it."""
        study_id = self._one("INSERT INTO studies (study_name) VALUES (?) RETURNING study_id", (name,))
        self._all(
            "INSERT INTO study_directions (direction, study_id, objective) VALUES (?, ?, 0) RETURNING study_id",
            (direction.upper(), study_id),
        )
        return study_id

    def set_user_attrs(self, study_id: int, values: Mapping[str, Any]) -> None:
        """Set (insert or replace) study user attributes, values as Optuna stores them (JSON)."""
        for key, value in values.items():
            updated = self._all(
                "UPDATE study_user_attributes SET value_json = ? WHERE study_id = ? AND key = ? RETURNING study_id",
                (json.dumps(value), study_id, key),
            )
            if not updated:
                self._all(
                    "INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (?, ?, ?) RETURNING study_id",
                    (study_id, key, json.dumps(value)),
                )

    def count_trials(self, study_id: int, states: Sequence[str]) -> int:
        marks = ", ".join("?" for _ in states)
        return int(
            self._one(f"SELECT COUNT(*) FROM trials WHERE study_id = ? AND state IN ({marks})", (study_id, *states))
        )
