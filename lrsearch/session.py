"""A worker's session on a study: the study created or joined, its MLflow experiment and
parent run, its data; and the parent run closed as the study stands."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lrsearch import attrs
from lrsearch.config import DEFAULT_TRIALS, Config
from lrsearch.data import Dataset, load_data
from lrsearch.errors import UsageError, first_line
from lrsearch.queries import ensure_indexes, ensure_views
from lrsearch.results import counts, summary
from lrsearch.retry import outage_window
from lrsearch.sampling import make_pruner, make_sampler
from lrsearch.space import grid_size
from lrsearch.storage import check_stores, is_postgres, open_storage, prepare_database, redact, storage_url, \
    store_lock, tracking_uri
from lrsearch.tracking import Tracker


def target_trials(cfg: Config) -> int:
    """The study's total: ``trials``, capped at the grid's size for a grid study."""
    if cfg.study.sampler == "grid":
        size = grid_size(cfg.params)
        return min(cfg.study.trials or size, size)
    return cfg.study.trials or DEFAULT_TRIALS


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


def open_session(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
                 study_file: Path | None = None, worker: int = 0) -> Session:
    """Create or join the study ``cfg`` describes, with its MLflow experiment and parent run.

    Bad data, an unreachable database and an unreachable tracking store are reported
    before any store is created.
    """
    data = load_data(cfg.data)
    url, tracking = storage_url(storage), tracking_uri(tracking)
    name = cfg.study.name
    check_stores(url, tracking)  # another application's file is left as it is, before any lock file
    if is_postgres(url):
        prepare_database(url)  # "cannot connect to …" at once, not after an outage window
    with store_lock(url):  # the first of several workers creates MLflow's tables (two migrations collide)
        tracker = Tracker(tracking)
        tracker.check()
    store = open_storage(url, hint="; run the same command again to resume the study")
    with store_lock(url, store.retry):  # one study and one parent run, however many workers start at once
        summaries = optuna.get_all_study_summaries(store, include_best_trial=False)
        n_existing = next((s.n_trials for s in summaries if s.study_name == name), 0)
        study = optuna.create_study(storage=store, study_name=name, direction=cfg.study.direction,
                                    sampler=make_sampler(cfg, n_existing, worker),
                                    pruner=make_pruner(cfg), load_if_exists=True)
        if study.direction.name.lower() != cfg.study.direction:
            raise UsageError(f"study {name!r} in {redact(url)} was created with direction "
                             f"{study.direction.name.lower()}; the study file says {cfg.study.direction}")
        experiment_id = tracker.experiment(name)
        parent_run_id = tracker.start_study(
            experiment_id, name, params=_flatten(cfg.to_dict()),
            tags={"sampler": cfg.study.sampler, "pruner": cfg.study.pruner, "storage": redact(url),
                  "direction": cfg.study.direction, "metric": cfg.study.metric},
            study_file=study_file, run_id=study.user_attrs.get(attrs.PARENT_RUN),
        )
        study.set_user_attr(attrs.PARENT_RUN, parent_run_id)
        study.set_user_attr(attrs.EXPERIMENT, experiment_id)
        study.set_user_attr(attrs.METRIC, cfg.study.metric)
    if is_postgres(url):
        ensure_views(url)  # no-op when current; skipped when MLflow's tables live elsewhere
    else:
        ensure_indexes(url)
    return Session(cfg, study, store, store.get_study_id_from_name(name), url, tracker, experiment_id,
                   parent_run_id, data, target_trials(cfg))


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
    except Exception as e:  # the trials are safe in Optuna: report, do not fail the study
        session.warnings.append(f"could not close the study's MLflow run: {first_line(e)}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
