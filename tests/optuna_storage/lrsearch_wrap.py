"""A pytest plugin for Optuna's own test suite: every RDB storage its fixtures build
(``optuna.testing.storages.StorageSupplier``: the "sqlite" and "cached_sqlite" modes) is
wrapped as lrsearch opens a store (``store/storage.py``: ``RetryingStorage`` over Optuna's
storage), so Optuna's tests of a storage's behaviour run through lrsearch's.

    LRSEARCH_OPTUNA_STORE=sqlite|postgresql    where the storages live (PostgreSQL: a schema
                                               each, in $LRSEARCH_OPTUNA_PG's database)
    LRSEARCH_OPTUNA_WRAP=1|0                    wrapped (1), or Optuna's own storage (0): the baseline

The storage modes lrsearch cannot stand in for (in-memory, journal, gRPC) are deselected.
``tests/test_optuna_storage.py`` runs the suite both ways and compares them.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

RDB_MODES = ("sqlite", "cached_sqlite")
STORE = os.environ.get("LRSEARCH_OPTUNA_STORE", "sqlite")
WRAP = os.environ.get("LRSEARCH_OPTUNA_WRAP", "1") == "1"


def pytest_configure(config: pytest.Config) -> None:
    import optuna
    from optuna.testing import storages as testing

    original_enter, original_exit = testing.StorageSupplier.__enter__, testing.StorageSupplier.__exit__

    def enter(self: Any) -> Any:
        if self.storage_specifier not in RDB_MODES:
            return original_enter(self)
        if STORE == "postgresql":
            rdb = _postgresql_storage(self)
            self.storage = optuna.storages._CachedStorage(rdb) if "cached" in self.storage_specifier else rdb
        else:
            original_enter(self)
            rdb = getattr(self.storage, "_backend", self.storage)
        self.lrsearch_rdb = rdb
        if WRAP:
            self.storage = _wrapped(self.storage, rdb)
        return self.storage

    def exit(self: Any, *exc: Any) -> None:
        rdb = getattr(self, "lrsearch_rdb", None)
        if rdb is None:
            return original_exit(self, *exc)
        rdb.engine.dispose()
        schema = getattr(self, "lrsearch_schema", None)
        if schema is not None:
            _drop_schema(schema)
        self.storage = None  # (the original exit disposes of an RDB storage it finds, and closes the file)
        return original_exit(self, *exc)

    testing.StorageSupplier.__enter__, testing.StorageSupplier.__exit__ = enter, exit


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Only the storage modes lrsearch wraps: its storage is an RDB storage."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        modes = [v for v in params.values() if isinstance(v, str) and v in _ALL_MODES]
        (dropped if any(m not in RDB_MODES for m in modes) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


_ALL_MODES = (
    "inmemory",
    "sqlite",
    "cached_sqlite",
    "journal",
    "journal_redis",
    "grpc_rdb",
    "grpc_journal_file",
    "grpc_proxy",
)


def _wrapped(storage: Any, rdb: Any) -> Any:
    """``storage`` as ``store.storage.open_storage`` returns it: its calls through lrsearch's
    retries and array statements."""
    from lrsearch.store.retry import Retry
    from lrsearch.store.retrying_storage import RetryingStorage

    return RetryingStorage(storage, Retry("the test database"), rdb.engine)


def _postgresql_storage(supplier: Any) -> Any:
    """An RDB storage with the supplier's arguments in a new schema of the PostgreSQL database
    ``$LRSEARCH_OPTUNA_PG`` (dropped at the supplier's exit)."""
    import optuna

    from lrsearch.store.urls import schema_url

    schema = f"optuna_{uuid.uuid4().hex[:12]}"
    _run(f'CREATE SCHEMA "{schema}"')
    supplier.lrsearch_schema = schema
    return optuna.storages.RDBStorage(schema_url(os.environ["LRSEARCH_OPTUNA_PG"], schema), **supplier.extra_args)


def _drop_schema(schema: str) -> None:
    _run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _run(sql: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(os.environ["LRSEARCH_OPTUNA_PG"], poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()
