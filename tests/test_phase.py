"""One rule for a submitted study's phase: the `studies` SQL view (on SQLite and PostgreSQL)
and Python's phase() (status, the run notes) agree on every combination of trials and
records, including a cancelled study whose trials all finished."""

from __future__ import annotations

import itertools
import warnings

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from lrsearch.core import attrs
from lrsearch.core.phase import PHASES, phase
from lrsearch.sql.queries import ResultsDatabase
from lrsearch.store.postgres import prepare_database
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import schema_url

TARGET = 2
RECORD = {"at": "2026-12-05T10:00:00+00:00"}
# finished (COMPLETE + PRUNED) of TARGET, running, and which of the three records are set
CASES = list(itertools.product((0, 1, TARGET), (0, 1), (False, True), (False, True), (False, True)))


def _fill(storage: str) -> dict[str, str]:
    """One study per case; the phase Python gives each."""
    store = open_storage(storage)
    expected = {}
    for i, (finished, running, cancelled, unrunnable, interrupted) in enumerate(CASES):
        name = f"case-{i}"
        study = optuna.create_study(storage=store, study_name=name)
        for n in range(finished):
            study.add_trial(
                create_trial(
                    state=TrialState.PRUNED if n else TrialState.COMPLETE,
                    value=0.5,
                    params={"lr": 0.1},
                    distributions={"lr": FloatDistribution(0, 1)},
                )
            )
        study.add_trial(create_trial(state=TrialState.FAIL))  # never counts
        for _ in range(running):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                study.ask()
        records = {
            attrs.CANCELLED: RECORD if cancelled else None,
            attrs.UNRUNNABLE: {**RECORD, "reason": "no", "version": "0", "host": "h"} if unrunnable else None,
            attrs.INTERRUPTED: {**RECORD, "signal": "SIGINT"} if interrupted else None,
        }
        store.set_study_user_attrs(
            study._study_id, {attrs.CONFIG: {}, attrs.TARGET: TARGET, attrs.SUBMITTED_AT: f"{i:03d}", **records}
        )
        expected[name] = phase(
            target=TARGET,
            finished=finished,
            running=running,
            cancelled=records[attrs.CANCELLED],
            unrunnable=records[attrs.UNRUNNABLE],
            interrupted=records[attrs.INTERRUPTED],
        )
    store.close()
    return expected


def _agree(storage: str, tracking: str | None = None) -> None:
    expected = _fill(storage)
    with ResultsDatabase(storage, tracking) as db:
        got = dict(db.query("SELECT study_name, state FROM studies").rows)
    assert got == expected
    assert set(expected.values()) == set(PHASES)  # every phase is reached by some case
    # the case the two rules once disagreed on: cancelled, yet every trial finished
    assert expected[f"case-{CASES.index((TARGET, 0, True, False, False))}"] == "done"


def test_sql_and_python_agree_on_sqlite(tmp_path):
    _agree(f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.slow
def test_sql_and_python_agree_on_postgres(pg_url):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    prepare_database(pg_url)
    SqlAlchemyStore(schema_url(pg_url, "mlflow"), "file:///tmp/unused").engine.dispose()  # the views join MLflow's
    _agree(pg_url)
