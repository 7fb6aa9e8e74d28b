"""A throwaway PostgreSQL database for the benchmarks."""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

import sqlalchemy as sa


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str | None]:
    """Create a database next to ``admin_url``'s, yield its URL, drop it afterwards; yield
    None (after saying why) when no PostgreSQL answers."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"lrsearch_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        print(f"PostgreSQL skipped: {str(e).splitlines()[0]}")
        yield None
        return
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
