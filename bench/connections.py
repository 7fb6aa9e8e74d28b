"""PostgreSQL connections held by each worker, and by all of them, during a study.

Starts an `lrsearch server` (with logins, as docker-compose runs it) on a scratch database,
runs `lrsearch run studies/quickstart.toml --workers N` on the same database for each N,
and samples `pg_stat_activity` every 20 ms: each lrsearch process names its connections
`lrsearch <host>:<pid>` (application_name), the MLflow server's are unnamed.

    python bench/connections.py [--workers 1 2 4] [--trials 40] [--epochs 50]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from scratch import lrsearch_server, scratch_database

STUDY = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"
ADMIN = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "bench-admin-password",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "bench-admin-password",
}


def sample(url: str, stop: threading.Event, peaks: dict) -> None:
    """Until ``stop``: the most connections seen at once per lrsearch process, and in all."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        while not stop.is_set():
            rows = conn.execute(
                sa.text(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
            names = collections.Counter(rows)
            for name, n in names.items():
                if name.startswith("lrsearch "):
                    peaks["per worker"] = max(peaks.get("per worker", 0), n)
            peaks["workers"] = max(
                peaks.get("workers", 0), sum(n for k, n in names.items() if k.startswith("lrsearch "))
            )
            peaks["server"] = max(
                peaks.get("server", 0), sum(n for k, n in names.items() if not k.startswith("lrsearch "))
            )
            peaks["all"] = max(peaks.get("all", 0), sum(names.values()))
            conn.rollback()
            time.sleep(0.02)
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--pg", default=os.environ.get("LRSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    )
    args = parser.parse_args()
    with scratch_database(args.pg) as url, tempfile.TemporaryDirectory() as tmp:
        if url is None:
            return
        env = {**os.environ, **ADMIN, "LRSEARCH_DATA": tmp}
        with lrsearch_server(url, Path(tmp), auth=True, env=ADMIN) as uri:
            print(
                f"studies/quickstart.toml, {args.trials} trials x {args.epochs} epochs per run; PostgreSQL "
                "connections at the busiest moment (sampled every 20 ms)"
            )
            print(f"{'workers':>7} {'per worker':>10} {'all workers':>11} {'MLflow server':>13} {'in all':>6}")
            for n in args.workers:
                peaks: dict = {}
                stop = threading.Event()
                sampler = threading.Thread(target=sample, args=(url, stop, peaks))
                sampler.start()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "lrsearch.cli",
                        "run",
                        str(STUDY),
                        "--name",
                        f"conn{n}",
                        "--trials",
                        str(args.trials),
                        "--epochs",
                        str(args.epochs),
                        "--workers",
                        str(n),
                    ],
                    env={**env, "LRSEARCH_STORAGE": url, "MLFLOW_TRACKING_URI": uri},
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                stop.set()
                sampler.join()
                print(
                    f"{n:>7} {peaks.get('per worker', 0):>10} {peaks.get('workers', 0):>11} "
                    f"{peaks.get('server', 0):>13} {peaks.get('all', 0):>6}"
                )


if __name__ == "__main__":
    main()
