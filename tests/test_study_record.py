"""The study's service state, one typed record: what it reads from and writes to Optuna's
study attributes, and the keys the SQL views read, held together."""

from __future__ import annotations

import re
from importlib import resources

import optuna

from lrsearch.core import attrs
from lrsearch.core.study_record import _KEYS, Cancellation, Interruption, ModelRecord, StudyRecord, Unrunnable


def test_a_record_written_as_attributes_reads_back_the_same():
    record = StudyRecord(
        metric="val/acc",
        config={"study": {"name": "s"}},
        target=20,
        priority=3,
        submitted_at="2026-12-07T10:00:00+00:00",
        cancelled=Cancellation("2026-12-07T11:00", True),
        done=True,
        unrunnable=Unrunnable("no data", "0.1.0", "host", "2026-12-07T12:00"),
        interrupted=Interruption("2026-12-07T13:00", "SIGTERM"),
        model=ModelRecord("s", "2", 7, "abc", "models:/s@best"),
        lr_range={"low": 1e-4, "high": 1.0},
        experiment_id="1",
        parent_run_id="def",
    )
    stored = StudyRecord.to_attrs(**{name: getattr(record, name) for name in _KEYS})
    assert set(stored) == set(_KEYS.values()) and StudyRecord.from_attrs(stored) == record
    assert StudyRecord.from_attrs({}) == StudyRecord() and not StudyRecord().submitted
    assert StudyRecord.to_attrs(cancelled=None) == {attrs.CANCELLED: None}


def test_the_views_read_the_study_attributes_the_record_writes():
    """Every study attribute ``sql/views.sql`` names is one of the record's keys."""
    sql = resources.files("lrsearch.sql").joinpath("views.sql").read_text()
    named = {attrs.SQL_NAMES[name] for name in re.findall(r"\{attr: (\w+)\}", sql)}
    study_keys = {
        key
        for key in named
        if re.search(
            rf"study_user_attributes \w+ ON [^\n]*\{{attr: "
            rf"{next(n for n, k in attrs.SQL_NAMES.items() if k == key)}\}}",
            sql,
        )
    }
    assert study_keys and study_keys <= set(_KEYS.values()), study_keys - set(_KEYS.values())


def test_a_submitted_and_cancelled_study_reads_back_as_its_record(write_study, cli, tmp_path):
    assert cli("submit", str(write_study())).returncode == 0
    assert cli("cancel", "tiny", "--now").returncode == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'}")
    record = StudyRecord.from_attrs(study.user_attrs)
    assert record.submitted and record.target == 3 and record.metric == "val/acc" and not record.done
    assert record.cancelled is not None and record.cancelled.now and not record.open
    assert record.phase(finished=0, running=0) == "cancelled"
