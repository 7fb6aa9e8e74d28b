"""The study service's queue, in the Optuna storage the workers share (study attributes:
see attrs.py): submit a study, list the studies with open slots in the order workers take
them, report their state, cancel one. No broker and no server of its own: SQLite on one
host, PostgreSQL across hosts. Imports no torch, so ``submit`` and ``status`` answer at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from lrsearch.choices.data import check_data
from lrsearch.choices.space import grid_size
from lrsearch.config import DEFAULT_TRIALS, WORKER_KEYS, Config, stored_config
from lrsearch.core.errors import UsageError, shown
from lrsearch.core.phase import explain
from lrsearch.core.study_record import Cancellation, StudyRecord, utc_now
from lrsearch.core.text import count
from lrsearch.fit.lr_find import RangeTest, range_test, record_range_test
from lrsearch.sql.schema import ensure_indexes
from lrsearch.store.folders import report_dir
from lrsearch.store.heartbeat import grace_period
from lrsearch.store.queue_store import QueueStore
from lrsearch.store.storage import check_stores, open_storage
from lrsearch.store.urls import is_postgres, redact, sqlite_path, storage_url, tracking_uri
from lrsearch.track.links import run_url
from lrsearch.track.probe import check_tracking

if TYPE_CHECKING:
    from lrsearch.store.retrying_storage import RetryingStorage


def target_trials(cfg: Config) -> int:
    """The study's total: ``trials``, capped at the grid's size for a grid study."""
    if cfg.study.sampler == "grid":
        size = grid_size(cfg.params)
        return min(cfg.study.trials or size, size)
    return cfg.study.trials or DEFAULT_TRIALS


@dataclass
class Submission:
    """A study as ``submit`` left it: queued (or resumed) for workers. Its MLflow experiment
    and parent run are made by the first worker that starts it: until then ``mlflow_url``
    (and the ids) are None."""

    name: str
    url: str  # the Optuna storage
    target: int
    resumed: bool
    experiment_id: str | None = None
    parent_run_id: str | None = None
    mlflow_url: str | None = None


def submit(cfg: Config, *, storage: str | None = None, tracking: str | None = None) -> Submission:
    """Create (or resume) the study ``cfg`` describes, and store its whole configuration
    with it, so that any worker runs it without the file. An existing study of that name
    must have the same configuration (only ``trials`` may rise), unless a worker found it
    unrunnable and none of its trials has finished; a cancelled, interrupted or finished one
    is queued again.

    Writes to the Optuna storage only, all of the study's attributes in one transaction:
    MLflow's experiment and parent run are the first worker's to make (:func:`session.join`),
    so ``submit`` imports neither MLflow nor torch. Bad data, an unreachable database and an
    unreachable tracking server are reported before anything is created. (A study with
    ``lr = { find = true }`` runs the range test here, once, and records it in MLflow.)
    """
    check_data(cfg.data)  # a CSV file's mistakes, before anything is created
    url, tracking = storage_url(storage), tracking_uri(tracking)
    name = cfg.study.name
    check_stores(url, tracking)  # another application's file is left as it is, before any lock file
    check_tracking(tracking)  # a tracking server that is down or refuses the login: one line, now
    # lr = { find = true }: the range test, once, before anything is created ("no clear
    # minimum" stops here); a study that has its range keeps it.
    found = range_test(cfg) if cfg.finds_lr and stored_range(url, name) is None else None
    with _queue(url) as store:
        with store.locked():  # one study, however many submit at once
            study_id = store.study_id(name)
            resumed = study_id is not None
            if study_id is None:
                study_id = store.create_study(name, cfg.study.direction)
            elif store.directions(study_id) != [cfg.study.direction]:
                raise UsageError(
                    f"study {name!r} in {redact(url)} was created with direction "
                    f"{', '.join(store.directions(study_id))}; the study file says {cfg.study.direction}"
                )
            record = StudyRecord.from_attrs(store.user_attrs(study_id))
            if not (record.unrunnable and not store.count_trials(study_id, FINISHED)):
                _check_drift(record, cfg, url)
            values = StudyRecord.to_attrs(
                metric=cfg.study.metric,
                config=cfg.to_toml(),
                target=target_trials(cfg),
                priority=cfg.study.priority,
                cancelled=None,
                done=False,
                interrupted=None,
                unrunnable=None,
            )
            if record.submitted_at is None:
                values.update(StudyRecord.to_attrs(submitted_at=utc_now()))
            new_range = cfg.finds_lr and record.lr_range is None
            if new_range:
                found = found or range_test(cfg)  # stored when we looked, gone since: another submit's race lost
                values.update(StudyRecord.to_attrs(lr_range=found.record()))
            store.set_user_attrs(study_id, values)
    if found is not None and new_range:
        _record_range_test(found, cfg, url, tracking)
    if not is_postgres(url):
        ensure_indexes(url)  # (PostgreSQL's come with its views: lrsearch server, status, sql)
    experiment_id, parent_run_id = record.experiment_id, record.parent_run_id
    return Submission(
        name,
        url,
        target_trials(cfg),
        resumed,
        experiment_id,
        parent_run_id,
        run_url(tracking, experiment_id, parent_run_id) if experiment_id and parent_run_id else None,
    )


FINISHED = ("COMPLETE", "PRUNED")  # results.FINISHED_STATES by name, without importing Optuna


@contextlib.contextmanager
def _queue(url: str, *, create: bool = True) -> Iterator[QueueStore]:
    """The queue's SQL on the store ``url`` (see queue_store.py); a new store, or one another
    Optuna release made, is opened through Optuna first, which makes or checks its tables."""
    path = sqlite_path(url)
    if path is not None and not path.exists() and not create:
        raise UsageError(f"no lrsearch store at {path} (run a study first, or pass --storage)")
    store = QueueStore(url)  # "cannot connect to …" at once, not after an outage window
    try:
        if not store.made_by_this_optuna():
            store.close()
            open_storage(url, create=create, hint="; run the same command again").close()
            store = QueueStore(url)
        yield store
    finally:
        store.close()


def _record_range_test(found: RangeTest, cfg: Config, url: str, tracking: str) -> None:
    """The range test's plot and ``lr-find`` run in the study's MLflow experiment."""
    from lrsearch.track.tracking import Tracker

    tracker = Tracker(tracking)
    record_range_test(found, cfg, tracker, tracker.experiment(cfg.study.name), report_dir(url, cfg.study.name))


@dataclass(frozen=True)
class SearchRange:
    """The lr range of a study with ``lr = { find = true }``: stored with it (``stored_in``
    its store) or, for a study not created yet, the range test's answer now."""

    low: float
    high: float
    suggestion: float
    optimizer: str
    stored_in: str | None


def search_range(cfg: Config, *, storage: str | None = None) -> SearchRange:
    """The range ``cfg``'s study searches: the one stored with it, else the range test's
    (run here, recorded nowhere: ``submit`` records it when it creates the study)."""
    url = storage_url(storage)
    found = stored_range(url, cfg.study.name)
    if found is not None:
        return SearchRange(found["low"], found["high"], found["suggestion"], found["optimizer"], url)
    result = range_test(cfg)
    return SearchRange(result.low, result.high, result.suggestion, result.optimizer, None)


def stored_range(url: str, name: str) -> Mapping[str, Any] | None:
    """The lr range a study of ``name`` in ``url`` already has (``lr = { find = true }``),
    without creating anything; None when there is no such study or range."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    with _queue(url, create=False) as store:
        study_id = store.study_id(name)
        return None if study_id is None else StudyRecord.from_attrs(store.user_attrs(study_id)).lr_range


def _check_drift(record: StudyRecord, cfg: Config, url: str) -> None:
    """Refuse a configuration that differs from the stored one, except a higher ``trials``
    and the keys of how a worker trains (``WORKER_KEYS``: the array size, the accelerator)."""
    raw = record.config
    if raw is None:  # a study made before configurations were stored, or by another tool
        return
    stored = stored_config(raw, cfg.study.name)
    differ = [
        key
        for key in stored.differences(cfg)
        if key not in WORKER_KEYS and (key != "[study].trials" or target_trials(cfg) < target_trials(stored))
    ]
    if differ:
        shown = ", ".join(differ[:5]) + (", …" if len(differ) > 5 else "")
        raise UsageError(
            f"study {cfg.study.name!r} in {redact(url)} was submitted with a different "
            f"configuration: {shown} {'differs' if len(differ) == 1 else 'differ'} (only trials "
            f"may rise); use another --name, or the file it was submitted with"
        )


@overload
def queue(store: RetryingStorage, *, with_config: Literal[False] = False) -> list[str]: ...
@overload
def queue(store: RetryingStorage, *, with_config: Literal[True]) -> dict[str, str]: ...
def queue(store: RetryingStorage, *, with_config: bool = False) -> list[str] | dict[str, str]:
    """The submitted studies with open slots (not done, not cancelled), in the order workers
    take them: higher priority first, then the oldest submission. A few reads, whatever the
    number of trials: cheap enough to poll. ``with_config``: a dict of each name to a digest
    of its stored configuration (a worker that cannot run a study tries again once it
    changes)."""
    records = {s.study_name: StudyRecord.from_attrs(s.user_attrs) for s in store.get_all_studies()}
    names = sorted(
        (name for name, r in records.items() if r.open),
        key=lambda name: (-records[name].priority, records[name].submitted_at or "", name),
    )
    if with_config:
        return {name: config_digest(records[name].config) for name in names}
    return names


def config_digest(raw: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


STATUS_COLUMNS = [
    "name",
    "state",
    "target",
    "complete",
    "pruned",
    "fail",
    "running",
    "best_value",
    "best_trial",
    "workers",
    "created",
    "eta_s",
    "mlflow_url",
    "reason",
]


def status(name: str | None = None, *, storage: str | None = None, tracking: str | None = None) -> list[dict[str, Any]]:
    """One row per submitted study (or the one named), from the ``studies`` view, with the
    workers on it now (its RUNNING trials whose heartbeat is fresh), an estimate of the
    time left (trials left × mean trial time ÷ workers), and for an unrunnable or
    interrupted study, why. SQL only: no Optuna, no MLflow (it answers at once)."""
    from lrsearch.sql.queries import ResultsDatabase

    url, tracking = storage_url(storage), tracking_uri(tracking)
    with ResultsDatabase(url, tracking) as db:
        rows = db.query("SELECT * FROM studies WHERE target IS NOT NULL ORDER BY submitted_at, study_name").records()
        if name is not None:
            rows = [r for r in rows if r["study_name"] == name]
            if not rows:
                raise UsageError(f"no submitted study named {shown(name)} in {redact(url)}")
        workers = db.active_workers(grace_period()) if any(r["n_running"] for r in rows) else {}
    out = []
    for r in rows:
        active = workers.get(r["study_name"], 0)
        left = max(0, r["target"] - r["n_complete"] - r["n_pruned"])
        eta = None if not active or r["mean_trial_s"] is None else round(left * r["mean_trial_s"] / active, 1)
        out.append(
            {
                "name": r["study_name"],
                "state": r["state"],
                "target": r["target"],
                "complete": r["n_complete"],
                "pruned": r["n_pruned"],
                "fail": r["n_fail"],
                "running": r["n_running"],
                "best_value": r["best_value"],
                "best_trial": r["best_trial_number"],
                "workers": active,
                "created": r["submitted_at"],  # by submit, or by run (which submits it too)
                "eta_s": 0.0 if r["state"] == "done" else eta,
                "mlflow_url": run_url(tracking, r["mlflow_experiment_id"], r["mlflow_parent_run_id"])
                if r["mlflow_parent_run_id"]
                else None,
                "reason": explain(r["state"], r["unrunnable"], r["interrupted"]),
            }
        )
    return out


def cancel(name: str, *, now: bool = False, storage: str | None = None, tracking: str | None = None) -> str:
    """Stop a study: no new trials are claimed; running ones finish (with ``now``, they stop
    at their next epoch boundary, FAIL with reason ``cancelled``). The workers on it close
    its parent run (KILLED), the last to leave; submitting the study again resumes it.
    Writes one attribute to the Optuna storage; returns the study's state as a line.
    (``tracking`` is unused: MLflow is the workers' to update.)"""
    url = storage_url(storage)
    with _queue(url, create=False) as store:
        study_id = store.study_id(name)
        record = StudyRecord() if study_id is None else StudyRecord.from_attrs(store.user_attrs(study_id))
        if study_id is None or not record.submitted or record.target is None:
            raise UsageError(f"no submitted study named {shown(name)} in {redact(url)}")
        target = record.target
        with store.locked():
            finished = store.count_trials(study_id, FINISHED)
            running = store.count_trials(study_id, ("RUNNING",))
            if finished >= target:
                return f"study {name!r} is done ({finished} of {count(target, 'trial')}): nothing to cancel"
            store.set_user_attrs(study_id, StudyRecord.to_attrs(cancelled=Cancellation(utc_now(), now)))
    what = ("stopping at their next epoch" if now else "finishing") if running else "none running"
    return f"study {name!r} cancelled: {finished} of {count(target, 'trial')} done, {running} running ({what})"
