"""One ranking of trials: the SQL views and Python agree, and `run`, `best` and the report
list a study's trials in the same order with the same params, in either direction."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import optuna
from conftest import TINY_STUDY
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lrsearch.results.ranking import ranking
from lrsearch.sql.queries import ResultsDatabase
from lrsearch.store.postgres import prepare_database
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import schema_url

# Ties on purpose: each value twice, out of order.
VALUES = [0.5, 0.2, 0.5, 0.2, 0.9]


def _fill(storage: str) -> None:
    store = open_storage(storage)
    for direction in ("minimize", "maximize"):
        study = optuna.create_study(storage=store, study_name=direction, direction=direction)
        for value in VALUES:
            study.add_trial(
                create_trial(value=value, params={"lr": value}, distributions={"lr": FloatDistribution(0.0, 1.0)})
            )
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                value=0.0 if direction == "minimize" else 1.0,
                params={"lr": 0.3},
                distributions={"lr": FloatDistribution(0.0, 1.0)},
            )
        )
    flags = optuna.create_study(storage=store, study_name="flags")
    flags.add_trial(
        create_trial(
            value=1.0,
            params={"nesterov": True, "optimizer": "sgd"},
            distributions={
                "nesterov": CategoricalDistribution([False, True]),
                "optimizer": CategoricalDistribution(["sgd", "adamw"]),
            },
        )
    )


def _same_ranking(storage: str, tracking: str | None = None) -> None:
    store = open_storage(storage)
    expected = {"minimize": [1, 3, 0, 2, 4], "maximize": [4, 0, 2, 1, 3]}  # ties: the earlier trial first
    with ResultsDatabase(storage, tracking) as db:
        for direction, order in expected.items():
            study = optuna.load_study(study_name=direction, storage=store)
            assert [t.number for t in ranking(study.trials, direction)] == order  # a PRUNED value never ranks
            rows = db.query(
                "SELECT trial_number FROM best_trials WHERE study_name = ? ORDER BY rank", (direction,)
            ).rows
            assert [r[0] for r in rows] == order
        params = db.query("SELECT params FROM trials WHERE study_name = 'flags'").rows[0][0]
        params = json.loads(params) if isinstance(params, str) else params
        assert params == {"nesterov": True, "optimizer": "sgd"} and params["nesterov"] is True  # not 1


def test_mlflow_orders_the_trials_view_as_the_ranking_ties_included(tmp_path):
    """The trials view sorts runs by one key (MLflow's ties go to the newer run): each
    COMPLETE trial's rank_key tag gives the ranking's order, ties to the earlier trial, in
    either direction; runs without one (a PRUNED trial) come after."""
    import json as json_

    from lrsearch.core.names import RANK_TAG
    from lrsearch.results.descriptions import trials_view
    from lrsearch.results.ranking import rank_key

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    values = [0.5, 0.2, 0.5, -0.0, 0.2, 0.0, 0.9, 1e-300, -3.0, 0.5]  # ties, signs, a tiny one
    for direction in ("minimize", "maximize"):
        experiment = client.create_experiment(direction)
        trials = []
        for number, value in enumerate([*values, None]):  # runs made in trial order: newer last
            run = client.create_run(experiment, run_name=f"trial-{number}")
            state = "COMPLETE" if value is not None else "PRUNED"
            trials.append(SimpleNamespace(number=number, state=state, value=value))
            if value is not None:
                client.set_tag(run.info.run_id, RANK_TAG, rank_key(value, number, direction))
        view = json_.loads(trials_view(direction, direction, "val/acc", ["lr"]))
        order = [f"{view['orderByKey']} {'ASC' if view['orderByAsc'] else 'DESC'}"]
        shown = [r.info.run_name for r in client.search_runs([experiment], order_by=order)]
        assert shown == [*(f"trial-{t.number}" for t in ranking(trials, direction)), f"trial-{len(values)}"]
        assert shown[:3] == (
            ["trial-8", "trial-3", "trial-5"] if direction == "minimize" else ["trial-6", "trial-0", "trial-2"]
        )


def test_sql_and_python_rank_alike_on_sqlite(stores):
    _fill(stores[0])
    _same_ranking(*stores)


def test_sql_and_python_rank_alike_on_postgres(pg_url):
    prepare_database(pg_url)
    MlflowClient(tracking_uri=schema_url(pg_url, "mlflow")).search_experiments()  # MLflow's tables
    _fill(pg_url)
    _same_ranking(pg_url)


# (start, complete) times as Optuna stores them, and the duration every view shows: whole
# milliseconds, half away from zero. Halves on purpose: a rounding that differed anywhere
# (SQLite's date functions read a time to the millisecond; Python's round() goes to even)
# would show one of them differently.
DURATIONS = [
    ("12:00:00.000000", "12:00:01.393500", 1.394),
    ("12:00:00.000400", "12:00:01.393600", 1.393),  # each time rounded alone: 1.394 - 0.000
    ("12:00:00.999500", "12:00:02.000000", 1.001),
    ("12:00:00.999501", "12:00:02.000000", 1.0),
    ("12:00:59.500000", "12:01:00.000499", 0.5),
    ("12:00:00.000000", "12:00:00.000500", 0.001),
    ("23:59:59.999999", "00:00:00.000001", 0.0),  # the next day
    ("12:00:00.000000", "12:00:00.000000", 0.0),
]


def _fill_durations(storage: str) -> optuna.Study:
    from datetime import datetime, timedelta

    study = optuna.create_study(storage=open_storage(storage), study_name="durations")
    for i, (start, complete, _) in enumerate(DURATIONS):
        day = datetime(2026, 11, 30)
        begun, ended = (datetime.combine(day, datetime.strptime(x, "%H:%M:%S.%f").time()) for x in (start, complete))
        # The first trial trained in an array: its duration is its share of the array's training.
        attrs = {"train_seconds": TRAIN_SHARE} if i == 0 else {}
        trial = create_trial(
            value=1.0, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.0, 1.0)}, user_attrs=attrs
        )
        trial.datetime_start, trial.datetime_complete = begun, ended if ended >= begun else ended + timedelta(days=1)
        study.add_trial(trial)
    return study


TRAIN_SHARE = 0.125


def _durations_agree(storage: str, tracking: str | None = None) -> None:
    from lrsearch.results.ranking import duration_s, wall_s

    study = _fill_durations(storage)
    walls = [d for _, _, d in DURATIONS]
    expected = [TRAIN_SHARE] + walls[1:]
    assert [duration_s(t) for t in study.trials] == expected  # read back from the store
    assert [wall_s(t) for t in study.trials] == walls
    with ResultsDatabase(storage, tracking) as db:
        rows = db.query(
            "SELECT trial_number, duration_s, wall_s FROM trials WHERE study_name = 'durations' ORDER BY trial_number"
        ).rows
        assert [r[1] for r in rows] == expected and [r[2] for r in rows] == walls
        mean = db.query("SELECT mean_trial_s FROM studies WHERE study_name = 'durations'").rows[0][0]
        assert abs(mean - sum(expected) / len(expected)) < 1e-12


def test_one_rounding_of_durations_on_sqlite(stores):
    _durations_agree(*stores)


def test_one_rounding_of_durations_on_postgres(pg_url):
    prepare_database(pg_url)
    MlflowClient(tracking_uri=schema_url(pg_url, "mlflow")).search_experiments()  # MLflow's tables
    _durations_agree(pg_url)


def test_run_and_best_show_the_same_durations_on_postgres(pg_url):
    # What `run` prints (Python's records of the study it ran) and what `best` prints (the
    # best_trials view), for a real study whose trials and runs are in PostgreSQL.
    import tomllib

    from lrsearch.config import parse_config
    from lrsearch.results.ranking import best_trials
    from lrsearch.service.launch import run_study
    from lrsearch.sql.queries import best_trials_sql

    prepare_database(pg_url)
    text = TINY_STUDY.replace('name = "tiny"', 'name = "timed"').replace("trials = 3", "trials = 2")
    cfg = parse_config(tomllib.loads(text.replace("epochs = 3", "epochs = 1")), "timed.toml")
    result = run_study(cfg, storage=pg_url, tracking=schema_url(pg_url, "mlflow"))
    from_run = [(r["number"], r["duration_s"]) for r in best_trials(result.study)]
    from_best = [(r["trial_number"], r["duration_s"]) for r in best_trials_sql(pg_url, None, "timed", 10)]
    assert len(from_run) == 2 and from_run == from_best
    assert all(d == round(d, 3) for _, d in from_run)


def _table(text: str) -> list[dict[str, str]]:
    """Rows of a text table as the CLI prints it (columns start where their headers do; the
    registered model's line under `best`'s table is not a row)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("model: ")]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    return [{name: line[a:b].strip() for name, a, b in zip(names, starts, [*starts[1:], None])} for line in lines[1:]]


def test_a_minimize_study_reads_the_same_in_run_best_and_the_report(cli, write_study, tmp_path):
    study = (
        TINY_STUDY.replace('direction = "maximize"', 'direction = "minimize"')
        .replace('metric = "val/acc"', 'metric = "val/loss"')
        .replace("trials = 3", "trials = 4")
    )
    run = cli("run", str(write_study(study)), "--epochs", "2")
    assert run.returncode == 0, run.stderr
    # the table between the array line and the links
    summary = run.stdout.split("\n", 2)[2].split("\nMLflow:")[0]
    assert run.stdout.splitlines()[1].startswith("trials trained together: ")
    from_run = _table(summary)
    best = cli("best", "tiny")
    assert best.returncode == 0, best.stderr
    from_best = _table(best.stdout)
    report = (tmp_path / "lrsearch-data" / "reports" / "tiny" / "report.html").read_text()
    ranked = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>COMPLETE</td>", report)
    assert [rank for rank, _ in ranked] == ["1", "2", "3", "4"]
    from_report = [number for _, number in ranked]

    numbers = [r["number"] for r in from_best]
    assert len(numbers) == 4 and [r["number"] for r in from_run] == numbers == from_report
    values = [float(r["value"]) for r in from_best]
    assert values == sorted(values)  # minimize: the smallest loss first
    assert [r["params"] for r in from_run] == [r["params"] for r in from_best]  # same meaning, same order
    # params: what Optuna sampled, in sampling order (the schedule is fixed, so sampled too)
    as_json = json.loads(cli("best", "tiny", "--format", "json").stdout)
    first = as_json[0]["params"]
    assert list(first)[:2] == ["optimizer", "lr"] and list(first)[-2:] == ["schedule", "decay"]
    # One duration per trial: run's summary, best's table and JSON, the trials view, Python's record.
    from lrsearch.core.text import fmt
    from lrsearch.results.ranking import load_study, trial_record

    storage = f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'}"
    records = {str(t.number): trial_record(t) for t in load_study("tiny", storage).trials}
    assert [r["duration_s"] for r in from_run] == [r["duration_s"] for r in from_best]
    assert [fmt(r["duration_s"]) for r in as_json] == [r["duration_s"] for r in from_best]
    assert {str(r["number"]): r["duration_s"] for r in as_json} == {n: r["duration_s"] for n, r in records.items()}
    view = json.loads(cli("sql", "SELECT trial_number, duration_s FROM trials", "--format", "json").stdout)
    assert {str(r["trial_number"]): r["duration_s"] for r in view} == {n: r["duration_s"] for n, r in records.items()}
    assert all(d == round(d, 3) for d in (r["duration_s"] for r in as_json))  # whole milliseconds
