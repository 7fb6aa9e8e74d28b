"""A worker's session on a submitted study: its stored configuration, a sampler of its
own, its data and MLflow records; and the parent run closed as the study stands."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lrsearch import attrs
from lrsearch.config import Config, stored_config
from lrsearch.data import Dataset, load_data
from lrsearch.descriptions import write_study_note
from lrsearch.errors import UsageError, first_line
from lrsearch.results import counts, summary
from lrsearch.retry import outage_window
from lrsearch.sampling import make_pruner, make_sampler
from lrsearch.storage import open_storage, redact, tracking_uri
from lrsearch.tracking import Tracker


@dataclass
class Session:
    """One worker's view of an open study: the study, its MLflow records and its data."""

    cfg: Config
    study: optuna.Study
    store: Any  # the study's storage (lrsearch.retrying_storage.RetryingStorage)
    study_id: int
    url: str
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    data: Dataset
    target: int
    warnings: list[str] = field(default_factory=list)
    opened_at: datetime.datetime = field(default_factory=datetime.datetime.now)

    @property
    def mlflow_url(self) -> str:
        return self.tracker.run_url(self.experiment_id, self.parent_run_id)


def join(name: str, store: Any, url: str, tracker: Tracker, *, worker: int = 0) -> Session:
    """This worker's session on a submitted study: its stored configuration, a sampler of
    this worker's own, its data, and its parent run RUNNING."""
    study_id = store.get_study_id_from_name(name)
    user_attrs = store.get_study_user_attrs(study_id)
    raw = user_attrs.get(attrs.CONFIG)
    if raw is None:
        raise UsageError(f"study {name!r} in {redact(url)} was not submitted with lrsearch (no stored "
                         "configuration): run lrsearch submit FILE first")
    cfg = stored_config(raw, name)
    if cfg.finds_lr:  # the range the test found when the study was created
        found = user_attrs.get(attrs.LR_RANGE)
        if found is None:
            raise UsageError(f"study {name!r} has lr = {{ find = true }} but no range stored: submit it again")
        cfg = cfg.with_lr_range(found["low"], found["high"])
    n_existing = len(store.get_all_trials(study_id, deepcopy=False))
    study = optuna.load_study(study_name=name, storage=store, sampler=make_sampler(cfg, n_existing, worker),
                              pruner=make_pruner(cfg))
    parent_run_id = user_attrs[attrs.PARENT_RUN]
    tracker.set_running(parent_run_id)
    write_study_note(study, tracker, "running", user_attrs)
    return Session(cfg, study, store, study_id, url, tracker, user_attrs[attrs.EXPERIMENT], parent_run_id,
                   load_data(cfg.data), user_attrs[attrs.TARGET])


def open_session(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
                 study_file: Path | None = None, worker: int = 0) -> Session:
    """Submit the study ``cfg`` describes (or resume it) and join it as a worker."""
    from lrsearch.service import submit

    submission = submit(cfg, storage=storage, tracking=tracking, study_file=study_file, status="RUNNING")
    store = open_storage(submission.url, hint="; run the same command again to resume the study")
    return join(cfg.study.name, store, submission.url, Tracker(tracking_uri(tracking)), worker=worker)


def close_parent(session: Session, status: str) -> None:
    """End the study's parent run as the study stands, whichever worker ends last: FINISHED
    once the total is reached (``status``, this worker's own fate, does not matter then);
    else, when no trial is running elsewhere, ``status`` (KILLED or FAILED), and while
    trials run elsewhere, nothing (their workers close it)."""
    try:
        finished, running = counts(session.study)
        if finished >= session.target:
            status = "FINISHED"
        elif running > 0 or status == "FINISHED":
            return
        if session.tracker.status(session.parent_run_id) == status:  # closed so by another worker
            return
        # A run still RUNNING whose trial ended before this worker began (and more than one
        # outage window before: its worker may still be sending it) lost its last records: its
        # worker died first, or the tracking store was away longer than the window.
        trials = {t.number: t for t in session.study.get_trials(deepcopy=False)}
        settled = session.opened_at - datetime.timedelta(seconds=outage_window())
        for run_id, number in session.tracker.running_trial_runs(session.experiment_id, session.parent_run_id):
            trial = trials.get(number)
            if trial is not None and trial.datetime_complete is not None and trial.datetime_complete < settled:
                session.tracker.close_lost_run(run_id, trial.state.name)
        session.tracker.end_run(session.parent_run_id, status, summary(session.study))
        write_study_note(session.study, session.tracker)
    except Exception as e:  # the trials are safe in Optuna: report, do not fail the study
        session.warnings.append(f"could not close the study's MLflow run: {first_line(e)}")
