"""The study service: how soon warm idle workers pick a submitted study up, how much five
studies gain from two warm workers over five `lrsearch run` commands one after another,
and what an idle worker costs the database.

1. Pickup: two `lrsearch worker` processes on a fresh embedded store, warmed by one small
   study; then, ``--repeats`` times, a study is submitted (in this process) and the time
   from ``submit`` returning to its first trial's start is taken (median, max).
2. Throughput: five quickstart-sized studies (studies/quickstart.toml under five names)
   submitted at once to two fresh workers, against `lrsearch run` of the same five, one
   after another (each also writes its report, as `run` does): wall time and ratio.
3. PostgreSQL (when one answers), with `lrsearch server` on the same database as server
   mode runs it: connections one idle worker holds, and the transactions per second its
   polling costs (pg_stat_database.xact_commit over 10 s, the server's few included).
4. Commands: `lrsearch submit`, `status` and `cancel` as whole processes (start to exit),
   on the embedded SQLite store and through server mode (PostgreSQL + `lrsearch server`),
   against `lrsearch --help` in the same run: median and max of ``--repeats`` runs each,
   after one warm-up run. Submits alternate between a new study and a resubmission.

    python bench/service.py [--repeats 5] [--trials 20] [--epochs 100] [--parts commands]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from scratch import lrsearch_server, scratch_database

STUDY = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"


def worker(storage: str, tracking: str, max_idle: float) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrsearch.cli",
            "worker",
            "--storage",
            storage,
            "--tracking-uri",
            tracking,
            "--max-idle",
            str(max_idle),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_done(names: list[str], storage: str, tracking: str, timeout: float = 1800) -> None:
    from lrsearch.service.queue import status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {r["name"]: r["state"] for r in status(storage=storage, tracking=tracking)}
        if all(rows.get(n) == "done" for n in names):
            return
        time.sleep(0.2)
    raise TimeoutError(names)


def first_start(name: str, storage: str, timeout: float = 120) -> datetime.datetime:
    import optuna

    from lrsearch.store.storage import open_storage

    store = open_storage(storage)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False)
        if trials:
            return min(t.datetime_start for t in trials)
        time.sleep(0.01)
    raise TimeoutError(name)


def pickup(folder: Path, repeats: int) -> None:
    from lrsearch.config import load_config
    from lrsearch.service.queue import submit

    storage, tracking = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    small = load_config(STUDY).with_overrides(trials=2, epochs=5)
    submit(small.with_overrides(name="warm-up"), storage=storage, tracking=tracking)
    procs = [worker(storage, tracking, max_idle=120) for _ in range(2)]
    wait_done(["warm-up"], storage, tracking)
    time.sleep(3)  # idle: polling at its slowest
    delays = []
    for i in range(repeats):
        submit(small.with_overrides(name=f"pickup-{i}"), storage=storage, tracking=tracking)
        returned = datetime.datetime.now()  # Optuna stamps trials with local naive times
        delays.append((first_start(f"pickup-{i}", storage) - returned).total_seconds())
        wait_done([f"pickup-{i}"], storage, tracking)
        time.sleep(3)
    for p in procs:
        p.terminate()
        p.wait()
    print(
        f"pickup, submit returned -> first trial started, warm idle workers ({repeats} studies): "
        f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s"
    )


def throughput(folder: Path, trials: int, epochs: int) -> None:
    from lrsearch.config import load_config
    from lrsearch.service.queue import submit

    names = [f"svc-{i}" for i in range(5)]
    cfg = load_config(STUDY).with_overrides(trials=trials, epochs=epochs)
    seq = folder / "seq"
    seq.mkdir()
    started = time.perf_counter()
    for name in names:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lrsearch.cli",
                "run",
                str(STUDY),
                "--name",
                name,
                "--trials",
                str(trials),
                "--epochs",
                str(epochs),
            ],
            cwd=seq,
            env={**os.environ, "LRSEARCH_DATA": str(seq)},
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    sequential = time.perf_counter() - started

    svc = folder / "svc"
    svc.mkdir()
    storage, tracking = f"sqlite:///{svc / 'optuna.db'}", f"sqlite:///{svc / 'mlflow.db'}"
    started = time.perf_counter()
    for name in names:
        submit(cfg.with_overrides(name=name), storage=storage, tracking=tracking)
    procs = [worker(storage, tracking, max_idle=1) for _ in range(2)]
    wait_done(names, storage, tracking)
    for p in procs:
        p.wait()
    served = time.perf_counter() - started
    print(
        f"five studies of {trials} trials x {epochs} epochs: five `lrsearch run` one after another "
        f"{sequential:.1f} s; submitted to two workers started with them {served:.1f} s "
        f"({sequential / served:.2f}x)"
    )


def postgres(folder: Path, admin: str) -> None:
    with scratch_database(admin) as url:
        if url is None:
            return
        with lrsearch_server(url, folder) as tracking:
            idle_worker(url, tracking)


def idle_worker(url: str, tracking: str) -> None:
    """Connections and polling of one idle worker, as in server mode (MLflow through the server)."""
    from lrsearch.config import load_config
    from lrsearch.service.queue import submit

    submit(load_config(STUDY).with_overrides(trials=1, epochs=2, name="warm-up"), storage=url, tracking=tracking)
    proc = worker(url, tracking, max_idle=60)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    wait_done(["warm-up"], url, tracking)
    time.sleep(3)

    def commits(conn) -> int:
        return conn.execute(
            sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        ).scalar()

    with engine.connect() as conn:
        held = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE :worker"
            ),
            {"worker": f"lrsearch %:{proc.pid}"},
        ).scalar()
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        before = commits(conn)
        conn.rollback()
        time.sleep(10)
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        after = commits(conn)
    proc.terminate()
    proc.wait()
    engine.dispose()
    # this sampling connection's own two transactions are included: negligible
    print(
        f"PostgreSQL, one idle worker: {held} connections held, {(after - before) / 10:.1f} transactions/s of polling"
    )


def commands(folder: Path, repeats: int, admin: str) -> None:
    """Whole `lrsearch` processes, timed from start to exit (medians, max)."""
    env = {**os.environ, "LRSEARCH_DATA": str(folder / "data")}
    env.pop("LRSEARCH_STORAGE", None), env.pop("MLFLOW_TRACKING_URI", None)

    def timed(*args: str, env: dict) -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lrsearch.cli", *args],
            env=env,
            check=True,
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - started

    def row(label: str, seconds: list[float], reference: list[float]) -> None:
        print(
            f"  {label:<28} median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s "
            f"({statistics.median(seconds) / statistics.median(reference):.1f}x --help)"
        )

    def measure(store: str, env: dict) -> None:
        times: dict[str, list[float]] = {
            k: [] for k in ("--help", "submit (new study)", "submit (again)", "status", "cancel")
        }
        for i in range(repeats + 1):  # the first round warms caches and the store; not counted
            got = {
                "--help": timed("--help", env=env),
                "submit (new study)": timed("submit", str(STUDY), "--name", f"cmd-{i}", env=env),
                "submit (again)": timed("submit", str(STUDY), "--name", f"cmd-{i}", env=env),
                "status": timed("status", env=env),
                "cancel": timed("cancel", f"cmd-{i}", env=env),
            }
            if i:
                for key, value in got.items():
                    times[key].append(value)
        print(f"{store}, whole processes ({repeats} runs each after a warm-up):")
        for key in times:
            row(key, times[key], times["--help"])

    measure("embedded SQLite", env)
    with scratch_database(admin) as url:
        if url is None:
            return
        with lrsearch_server(url, folder / "server") as tracking:
            measure(
                "server mode (PostgreSQL + lrsearch server)",
                {**env, "LRSEARCH_STORAGE": url, "MLFLOW_TRACKING_URI": tracking},
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["commands", "pickup", "throughput", "postgres"],
        choices=["commands", "pickup", "throughput", "postgres"],
    )
    parser.add_argument(
        "--pg", default=os.environ.get("LRSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    )
    args = parser.parse_args()
    import optuna

    from lrsearch.track.quiet import quiet_mlflow

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    quiet_mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "pickup").mkdir()
        if "commands" in args.parts:
            commands(folder, args.repeats, args.pg)
        if "pickup" in args.parts:
            pickup(folder / "pickup", args.repeats)
        if "throughput" in args.parts:
            throughput(folder, args.trials, args.epochs)
        if "postgres" in args.parts:
            postgres(folder, args.pg)


if __name__ == "__main__":
    main()
