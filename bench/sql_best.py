"""How fast `best_trials` answers on a study of 100,000 trials, on PostgreSQL and SQLite.

Fills one study through Optuna's and MLflow's own tables (bulk SQL in their layout: a study
made by Optuna's API, then trials with values, two params, user attributes, an MLflow run
and three final metrics each), then times

    SELECT * FROM best_trials WHERE study_name = 'bench' AND rank <= 10

through the same connection `lrsearch sql` uses (median of 7, after a warm-up).

    python bench/sql_best.py [--trials 100000] [--pg postgresql+psycopg://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy as sa
from mlflow import MlflowClient
from scratch import scratch_database

from lrsearch.core.attrs import HYPERPARAMETERS, MLFLOW_RUN
from lrsearch.sql.queries import ResultsDatabase
from lrsearch.sql.schema import ensure_indexes, ensure_views
from lrsearch.store.postgres import prepare_database
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import schema_url

QUERY = "SELECT * FROM best_trials WHERE study_name = 'bench' AND rank <= 10"
OPTIMIZER = json.dumps({"name": "CategoricalDistribution", "attributes": {"choices": ["sgd", "adam", "rmsprop"]}})
LR = json.dumps({"name": "FloatDistribution", "attributes": {"step": None, "low": 1e-5, "high": 1.0, "log": True}})


def fill(storage: str, optuna_engine: sa.Engine, mlflow_engine: sa.Engine, tracking: str, n: int) -> None:
    """A study of ``n`` COMPLETE trials (plus a few PRUNED and FAIL ones) in both stores."""
    store = open_storage(storage)
    study = optuna.create_study(storage=store, study_name="bench", direction="maximize")
    study_id = study._study_id
    experiment_id = int(MlflowClient(tracking_uri=tracking).create_experiment(f"bench-{uuid.uuid4().hex[:6]}"))
    rng = random.Random(0)
    o, m = sa.MetaData(), sa.MetaData()
    tables = {
        name: sa.Table(name, o, autoload_with=optuna_engine)
        for name in ("trials", "trial_values", "trial_params", "trial_user_attributes")
    }
    runs, latest = (sa.Table(name, m, autoload_with=mlflow_engine) for name in ("runs", "latest_metrics"))
    with optuna_engine.begin() as conn:
        first = conn.execute(sa.text("SELECT COALESCE(MAX(trial_id), 0) + 1 FROM trials")).scalar()
    ids = range(first, first + n)
    trials, values, params, attrs, run_rows, metric_rows = [], [], [], [], [], []
    for number, trial_id in enumerate(ids):
        state = "COMPLETE" if number % 20 else rng.choice(["PRUNED", "FAIL"])
        acc = rng.random()
        run_id = uuid.uuid4().hex
        trials.append({"trial_id": trial_id, "number": number, "study_id": study_id, "state": state})
        if state == "COMPLETE":
            values.append({"trial_id": trial_id, "objective": 0, "value": acc, "value_type": "FINITE"})
        params += [
            {
                "trial_id": trial_id,
                "param_name": "optimizer",
                "param_value": float(number % 3),
                "distribution_json": OPTIMIZER,
            },
            {
                "trial_id": trial_id,
                "param_name": "lr",
                "param_value": 10 ** rng.uniform(-5, 0),
                "distribution_json": LR,
            },
        ]
        attrs += [
            {"trial_id": trial_id, "key": MLFLOW_RUN, "value_json": json.dumps(run_id)},
            {
                "trial_id": trial_id,
                "key": HYPERPARAMETERS,
                "value_json": json.dumps({"optimizer": ["sgd", "adam", "rmsprop"][number % 3]}),
            },
        ]
        run_rows.append(
            {
                "run_uuid": run_id,
                "name": f"trial-{number}",
                "status": "FINISHED",
                "lifecycle_stage": "active",
                "experiment_id": experiment_id,
                "source_type": "LOCAL",
            }
        )
        metric_rows += [
            {"run_uuid": run_id, "key": key, "value": v, "step": 199, "is_nan": False, "timestamp": 0}
            for key, v in (("val/acc", acc), ("val/loss", 1 - acc), ("train/loss", 1 - acc))
        ]
    with optuna_engine.begin() as conn:
        for name, rows in (
            ("trials", trials),
            ("trial_values", values),
            ("trial_params", params),
            ("trial_user_attributes", attrs),
        ):
            conn.execute(tables[name].insert(), rows)
    with mlflow_engine.begin() as conn:
        conn.execute(runs.insert(), run_rows)
        conn.execute(latest.insert(), metric_rows)


def time_query(storage: str, tracking: str | None) -> tuple[float, list]:
    with ResultsDatabase(storage, tracking) as db:
        db.query(QUERY)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            rows = db.query(QUERY).rows
            times.append(time.perf_counter() - start)
    return statistics.median(times), rows


def bench_sqlite(n: int, folder: Path) -> tuple[float, list]:
    storage, tracking = f"sqlite:///{folder}/optuna.db", f"sqlite:///{folder}/mlflow.db"
    MlflowClient(tracking_uri=tracking).search_experiments()
    fill(storage, sa.create_engine(storage), sa.create_engine(tracking), tracking, n)
    ensure_indexes(storage)  # as `lrsearch run` does
    return time_query(storage, tracking)


def bench_postgres(n: int, admin_url: str) -> tuple[float, list] | None:
    with scratch_database(admin_url) as url:
        if url is None:
            return None
        prepare_database(url)
        tracking = schema_url(url, "mlflow")
        MlflowClient(tracking_uri=tracking).search_experiments()
        fill(url, sa.create_engine(schema_url(url, "optuna")), sa.create_engine(tracking), tracking, n)
        ensure_views(url)
        with sa.create_engine(url).begin() as conn:
            conn.execute(sa.text("ANALYZE"))
        return time_query(url, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{args.trials:,} trials in one study; {QUERY}")
    print(f"{'database':<12} {'median ms':>10}  top value")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, rows = bench_sqlite(args.trials, Path(tmp))
    print(f"{'SQLite':<12} {seconds * 1000:>10.1f}  {rows[0][4]:.6f} ({len(rows)} rows)")
    result = bench_postgres(args.trials, args.pg)
    if result is not None:
        seconds, rows = result
        print(f"{'PostgreSQL':<12} {seconds * 1000:>10.1f}  {rows[0][4]:.6f} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
