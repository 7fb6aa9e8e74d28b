"""The SQL views on both dialects, on real Optuna and MLflow tables (one suite, two stores)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import fill_results as _fill
from mlflow import MlflowClient

from lrsearch.core.errors import UsageError
from lrsearch.sql.queries import ResultsDatabase, best_trials_sql
from lrsearch.sql.schema import schema_script
from lrsearch.store.postgres import prepare_database
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import schema_url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stores(request, tmp_path_factory):
    """(storage URL, tracking URI) for each dialect, filled once with the scenario below."""
    if request.param == "sqlite":
        tmp_path = tmp_path_factory.mktemp("sqlite")
        storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
        client = MlflowClient(tracking_uri=tracking)
    else:
        storage = request.getfixturevalue("pg_url")
        prepare_database(storage)
        tracking = None
        client = MlflowClient(tracking_uri=schema_url(storage, "mlflow"))
    _fill(storage, client)
    return storage, tracking


def _query(stores, sql, params=()):
    storage, tracking = stores
    with ResultsDatabase(storage, tracking) as db:
        return db.query(sql, params).records()


def test_trials_view_decodes_both_stores(stores):
    rows = {(r["study_name"], r["trial_number"]): r for r in _query(stores, "SELECT * FROM trials")}
    assert len(rows) == 7 + 3 + 2
    first = rows[("acc", 0)]
    assert (first["state"], first["value"], first["direction"]) == ("COMPLETE", 0.9, "maximize")
    assert first["params"] == {"optimizer": "adam", "lr": 0.01}  # categorical decoded
    assert (first["optimizer"], first["lr"], first["momentum"], first["schedule"]) == ("adam", 0.01, None, "constant")
    assert first["mlflow_status"] == "FINISHED" and len(first["mlflow_run_id"]) == 32
    assert first["val_acc"] == 0.9 and first["val_loss"] is None and first["train_loss"] is None  # NaN, inf
    assert first["duration_s"] is not None and first["duration_s"] >= 0
    assert rows[("acc", 1)]["value"] is None and rows[("acc", 6)]["value"] is None  # +inf, -inf
    assert (rows[("acc", 1)]["optimizer"], rows[("acc", 1)]["momentum"]) == ("sgd", 0.5)  # from params
    assert rows[("acc", 5)]["params"] == {"optimizer": "sgd", "lr": 0.001, "momentum": 0.0, "patience": 5}
    assert rows[("acc", 5)]["mlflow_run_id"] is None and rows[("acc", 5)]["val_acc"] is None
    assert [rows[("acc", n)]["state"] for n in (2, 3, 4)] == ["PRUNED", "FAIL", "RUNNING"]
    assert [(rows[("acc", n)]["reason"], rows[("acc", n)]["epochs_trained"]) for n in (0, 2, 3, 4)] == [
        (None, 4),
        ("pruned at epoch 1: below the median", 2),
        ("RuntimeError: out of memory", 0),
        (None, None),  # still running
    ]
    assert [rows[("acc", n)]["array_id"] for n in (0, 2, 3, 4)] == ["a0", "a1", "a1", None]
    assert rows[("loss", 0)]["direction"] == "minimize"


def test_best_trials_rank_in_each_study_direction(stores):
    rows = _query(stores, "SELECT study_name, trial_number, rank, value FROM best_trials ORDER BY study_name, rank")
    assert [(r["study_name"], r["trial_number"], r["rank"]) for r in rows] == [
        ("acc", 0, 1),
        ("acc", 5, 2),  # only COMPLETE trials with a finite value
        ("loss", 1, 1),
        ("loss", 2, 2),
        ("loss", 0, 3),  # minimize: smallest first
    ]  # the multi-objective study has no single ranking
    multi = _query(
        stores, "SELECT trial_number, value, direction FROM trials WHERE study_name = 'multi' ORDER BY trial_number"
    )
    assert [(r["trial_number"], r["value"], r["direction"]) for r in multi] == [
        (0, 0.9, "maximize"),
        (1, 0.8, "maximize"),
    ]  # objective 0


def test_studies_view(stores):
    rows = {r["study_name"]: r for r in _query(stores, "SELECT * FROM studies")}
    acc = rows["acc"]
    assert (acc["n_trials"], acc["n_complete"], acc["n_pruned"], acc["n_fail"], acc["n_running"]) == (7, 4, 1, 1, 1)
    assert (acc["best_value"], acc["best_trial_number"]) == (0.9, 0)
    assert acc["best_params"] == {"optimizer": "adam", "lr": 0.01}
    assert acc["mlflow_parent_run_id"] == "parent123" and acc["direction"] == "maximize"
    assert (rows["loss"]["best_value"], rows["loss"]["direction"]) == (0.1, "minimize")
    assert rows["multi"]["n_objectives"] == 2 and rows["multi"]["best_value"] is None


def test_one_query_text_for_both_dialects(stores):
    text = "SELECT optimizer, max(value) AS best FROM best_trials GROUP BY optimizer ORDER BY optimizer"
    assert _query(stores, text) == [{"optimizer": "adam", "best": 0.9}, {"optimizer": "sgd", "best": 0.7}]


def test_best_command_reads_best_trials(stores):
    storage, tracking = stores
    rows = best_trials_sql(storage, tracking, "loss", 2)
    assert [(r["trial_number"], r["rank"]) for r in rows] == [(1, 1), (2, 2)]
    with pytest.raises(UsageError, match=r"no study named 'nope' in .* \(studies: acc, loss, multi\)"):
        best_trials_sql(storage, tracking, "nope", 2)


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM optuna.trials",
        "UPDATE optuna.studies SET study_name = 'x'",
        "CREATE TABLE evil (a INTEGER)",
        "DROP VIEW best_trials",
    ],
)
def test_writes_are_refused(stores, statement):
    with pytest.raises(UsageError, match="^lrsearch sql runs read-only queries: "):
        _query(stores, statement)
    assert len(_query(stores, "SELECT * FROM trials")) == 12


def test_a_bad_query_gets_the_database_message(stores):
    with pytest.raises(UsageError, match="^query failed: .*nonsense"):
        _query(stores, "SELECT nonsense FROM trials")


def test_sqlite_schema_script_runs_in_a_plain_sqlite_connection(tmp_path):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    _fill(storage, MlflowClient(tracking_uri=tracking))
    conn = sqlite3.connect(":memory:")  # as the sqlite3 shell would
    conn.executescript(schema_script(storage, tracking))
    rows = conn.execute(
        "SELECT study_name, trial_number, params FROM best_trials WHERE rank = 1 ORDER BY study_name"
    ).fetchall()
    assert [(s, n, json.loads(p)) for s, n, p in rows] == [
        ("acc", 0, {"optimizer": "adam", "lr": 0.01}),
        ("loss", 1, {"optimizer": "adam", "lr": 0.02}),
    ]


def test_postgres_views_are_idempotent_and_in_their_schema(pg_url):
    import sqlalchemy as sa

    from lrsearch.sql.schema import ensure_views

    prepare_database(pg_url)
    MlflowClient(tracking_uri=schema_url(pg_url, "mlflow")).search_experiments()  # MLflow's tables
    open_storage(pg_url)  # Optuna's tables
    assert ensure_views(pg_url) and ensure_views(pg_url)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        views = set(
            conn.execute(
                sa.text("SELECT table_name FROM information_schema.views WHERE table_schema = 'lrsearch'")
            ).scalars()
        )
        indexes = set(
            conn.execute(
                sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = 'optuna' AND indexname LIKE 'lrsearch_%'")
            ).scalars()
        )
    engine.dispose()
    assert views == {"trials", "best_trials", "studies"}
    assert indexes == {"lrsearch_trials_study_state", "lrsearch_trial_values_value"}


def test_the_docs_queries_give_the_same_answers_on_both_dialects(stores):
    from decimal import Decimal
    from pathlib import Path

    from lrsearch.sql.schema import _statements

    page = (Path(__file__).parent.parent / "docs" / "sql.md").read_text()
    block = page.split("```sql\n", 1)[1].split("```", 1)[0]
    statements = [s.replace("'quickstart'", "'acc'") for s in _statements(block)]
    assert len(statements) == 7

    def rows(sql):  # PostgreSQL's ROUND gives NUMERIC: compare numbers as floats
        return [tuple(float(v) if isinstance(v, Decimal) else v for v in r.values()) for r in _query(stores, sql)]

    # Study acc: COMPLETE 0.9 (adam, lr 0.01, schedule constant), +inf (sgd, lr 0.1), 0.7 (sgd, lr
    # 0.001), -inf (adam, lr 0.3); PRUNED (sgd, lr 0.5); FAIL; RUNNING. Infinities are NULL values.
    assert rows(statements[0]) == [("adam", 0, 0.9, 0.01), ("sgd", 5, 0.7, 0.001)]
    assert rows(statements[1]) == [(-3, 1, 0.7, 0.7), (-2, 1, 0.9, 0.9), (-1, 2, None, None)]
    assert rows(statements[2]) == [(None, 4, 25.0), ("constant", 1, 0.0)]
    assert [r[:2] for r in rows(statements[3])] == [("COMPLETE", 4), ("FAIL", 1), ("PRUNED", 1), ("RUNNING", 1)]
    assert rows(statements[4]) == [
        ("PRUNED", "pruned at epoch 1: below the median", 2),
        ("FAIL", "RuntimeError: out of memory", 0),
    ]
    assert rows(statements[5]) == [("a0", 1, 0), ("a1", 2, 1)]
    assert rows(statements[6]) == [(0, 0.01), (1, 0.005), (2, 0.0025)]


def test_postgres_views_come_from_server_and_sql_and_are_replaced_when_they_change(tmp_path):
    # A database of its own: this test drops and changes the views.
    import uuid

    import sqlalchemy as sa
    from conftest import PG_ADMIN_URL, missing

    from lrsearch.service.server import backend_uri
    from lrsearch.sql.schema import ensure_views

    name = f"lrsearch_views_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        missing("PostgreSQL", str(e).splitlines()[0])
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

    def views() -> set[str]:
        with engine.connect() as conn:
            return set(
                conn.execute(
                    sa.text("SELECT table_name FROM information_schema.views WHERE table_schema = 'lrsearch'")
                ).scalars()
            )

    def version() -> str | None:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT obj_description(to_regclass('lrsearch.trials'), 'pg_class')")).scalar()

    try:
        backend_uri(url)  # what `lrsearch server` does before it starts MLflow's
        assert views() == {"trials", "best_trials", "studies"}
        current = version()
        assert current.startswith("lrsearch views ")
        # An older definition (another version's comment, a view gone): replaced, not trusted.
        with engine.begin() as conn:
            conn.execute(sa.text("DROP VIEW lrsearch.studies"))
            conn.execute(sa.text("COMMENT ON VIEW lrsearch.trials IS 'lrsearch views 0123456789abcdef'"))
        assert ensure_views(url)
        assert views() == {"trials", "best_trials", "studies"} and version() == current
        # `lrsearch sql` on a database without them creates them.
        with engine.begin() as conn:
            conn.execute(sa.text("DROP VIEW lrsearch.studies, lrsearch.best_trials, lrsearch.trials CASCADE"))
        assert views() == set()
        with ResultsDatabase(url, None) as db:
            assert db.query("SELECT COUNT(*) AS n FROM trials").records() == [{"n": 0}]
        assert views() == {"trials", "best_trials", "studies"} and version() == current
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_run_on_sqlite_indexes_what_the_views_read(write_study, tmp_path):
    from conftest import TINY_STUDY

    from lrsearch.config import load_config
    from lrsearch.service.launch import run_study

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(
        load_config(write_study(TINY_STUDY)).with_overrides(trials=1, epochs=1),
        storage=storage,
        tracking=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    with sqlite3.connect(tmp_path / "optuna.db") as conn:
        indexes = {
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'lrsearch_%'")
        }
    assert indexes == {"lrsearch_trials_study_state", "lrsearch_trial_values_value"}
