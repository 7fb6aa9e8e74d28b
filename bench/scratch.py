"""A throwaway PostgreSQL database, and an `lrsearch server` on it, for the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def lrsearch_server(db_url: str, folder: Path, *, auth: bool = False, env: dict | None = None) -> Iterator[str]:
    """`lrsearch server` on ``db_url`` (given through ``LRSEARCH_DB``), artifacts in ``folder``,
    on a free loopback port; yields its URI once it answers, stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "lrsearch.cli",
        "server",
        "--port",
        str(port),
        "--artifacts",
        str(folder / "artifacts"),
    ]
    server = subprocess.Popen(
        command + (["--auth"] if auth else []),
        env={**os.environ, **(env or {}), "LRSEARCH_DB": db_url, "LRSEARCH_DATA": str(folder)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
