"""The study service's queue, in the Optuna storage the workers share (study attributes:
see attrs.py): submit a study, list the studies with open slots in the order workers take
them, report their state, cancel one. No broker and no server of its own: SQLite on one
host, PostgreSQL across hosts. Imports no torch, so ``submit`` and ``status`` answer at once.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from lrsearch import attrs
from lrsearch.config import DEFAULT_TRIALS, Config, stored_config
from lrsearch.data import check_data
from lrsearch.descriptions import searched, trials_view
from lrsearch.lr_find import range_test, record_range_test
from lrsearch.errors import UsageError
from lrsearch.queries import ensure_indexes, ensure_views
from lrsearch.results import FINISHED_STATES
from lrsearch.space import grid_size
from lrsearch.storage import check_stores, is_postgres, open_storage, prepare_database, redact, report_dir, \
    sqlite_path, storage_url, store_lock, tracking_uri
from lrsearch.tracking import Tracker, run_url


def target_trials(cfg: Config) -> int:
    """The study's total: ``trials``, capped at the grid's size for a grid study."""
    if cfg.study.sampler == "grid":
        size = grid_size(cfg.params)
        return min(cfg.study.trials or size, size)
    return cfg.study.trials or DEFAULT_TRIALS


@dataclass
class Submission:
    """A study as ``submit`` left it: queued (or resumed) for workers."""

    name: str
    url: str  # the Optuna storage
    target: int
    experiment_id: str
    parent_run_id: str
    mlflow_url: str
    resumed: bool


def submit(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
           study_file: Path | None = None, status: str = "SCHEDULED") -> Submission:
    """Create (or resume) the study ``cfg`` describes, with its MLflow experiment and parent
    run, and store its whole configuration with it, so that any worker runs it without the
    file. An existing study of that name must have the same configuration (only ``trials``
    may rise); a cancelled or finished one is queued again.

    Bad data, an unreachable database and an unreachable tracking store are reported
    before any store is created. Imports no torch.
    """
    check_data(cfg.data)  # a CSV file's mistakes, before anything is created
    url, tracking = storage_url(storage), tracking_uri(tracking)
    name = cfg.study.name
    check_stores(url, tracking)  # another application's file is left as it is, before any lock file
    # lr = { find = true }: the range test, once, before anything is created ("no clear
    # minimum" stops here); a study that has its range keeps it.
    found = range_test(cfg) if cfg.finds_lr and stored_range(url, name) is None else None
    if is_postgres(url):
        prepare_database(url)  # "cannot connect to …" at once, not after an outage window
    with store_lock(url):  # the first of several workers creates MLflow's tables (two migrations collide)
        tracker = Tracker(tracking)
        tracker.check()
    store = open_storage(url, hint="; run the same command again")
    with store_lock(url, store.retry):  # one study and one parent run, however many submit at once
        names = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
        study = optuna.create_study(storage=store, study_name=name, direction=cfg.study.direction,
                                    load_if_exists=True)
        if study.direction.name.lower() != cfg.study.direction:
            raise UsageError(f"study {name!r} in {redact(url)} was created with direction "
                             f"{study.direction.name.lower()}; the study file says {cfg.study.direction}")
        _check_drift(study, cfg, url)
        experiment_id = tracker.experiment(name)
        lr_range = study.user_attrs.get(attrs.LR_RANGE)
        if cfg.finds_lr and lr_range is None:
            if found is None:  # stored when we looked, gone since: another submit's race lost
                found = range_test(cfg)
            lr_range = found.record()
            record_range_test(found, cfg, tracker, experiment_id, report_dir(url, name))
            study.set_user_attr(attrs.LR_RANGE, lr_range)
        found_params = {f"lr_find.{k}": lr_range[k] for k in ("low", "high", "suggestion", "optimizer")} \
            if cfg.finds_lr else {}
        parent_run_id = tracker.start_study(
            experiment_id, name, params={**_flatten(cfg.to_dict()), **found_params},
            tags={"sampler": cfg.study.sampler, "pruner": cfg.study.pruner, "storage": redact(url),
                  "direction": cfg.study.direction, "metric": cfg.study.metric},
            study_file=study_file, run_id=study.user_attrs.get(attrs.PARENT_RUN), status=status,
        )
        tracker.share_trials_view(experiment_id, trials_view(name, cfg.study.direction, cfg.study.metric,
                                                             searched(cfg.params)))
        target = target_trials(cfg)
        for key, value in ((attrs.PARENT_RUN, parent_run_id), (attrs.EXPERIMENT, experiment_id),
                           (attrs.METRIC, cfg.study.metric), (attrs.CONFIG, cfg.to_toml()),
                           (attrs.TARGET, target), (attrs.PRIORITY, cfg.study.priority),
                           (attrs.CANCELLED, None), (attrs.DONE, False)):
            study.set_user_attr(key, value)
        if attrs.SUBMITTED_AT not in study.user_attrs:
            study.set_user_attr(attrs.SUBMITTED_AT, datetime.datetime.now(datetime.timezone.utc).isoformat())
    if is_postgres(url):
        ensure_views(url)  # no-op when current; skipped when MLflow's tables live elsewhere
    else:
        ensure_indexes(url)
    store.close()
    return Submission(name, url, target, experiment_id, parent_run_id,
                      tracker.run_url(experiment_id, parent_run_id), name in names)


def stored_range(url: str, name: str) -> dict[str, Any] | None:
    """The lr range a study of ``name`` in ``url`` already has (``lr = { find = true }``),
    without creating anything; None when there is no such study or range."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    if is_postgres(url):
        prepare_database(url)  # an unreachable database: one line at once, not after an outage window
    store = open_storage(url, create=False)
    try:
        study_id = store.get_study_id_from_name(name)
    except KeyError:  # no such study: it has no range
        return None
    else:
        return store.get_study_user_attrs(study_id).get(attrs.LR_RANGE)
    finally:
        store.close()


def _check_drift(study: optuna.Study, cfg: Config, url: str) -> None:
    """Refuse a configuration that differs from the stored one, except a higher ``trials``."""
    raw = study.user_attrs.get(attrs.CONFIG)
    if raw is None:  # a study made before configurations were stored, or by another tool
        return
    stored = stored_config(raw, cfg.study.name)
    differ = [key for key in stored.differences(cfg)
              if key != "[study].trials" or target_trials(cfg) < target_trials(stored)]
    if differ:
        shown = ", ".join(differ[:5]) + (", …" if len(differ) > 5 else "")
        raise UsageError(f"study {cfg.study.name!r} in {redact(url)} was submitted with a different "
                         f"configuration: {shown} {'differs' if len(differ) == 1 else 'differ'} (only trials "
                         f"may rise); use another --name, or the file it was submitted with")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def queue(store: Any) -> list[str]:
    """The submitted studies with open slots (not done, not cancelled), in the order workers
    take them: higher priority first, then the oldest submission. A few reads, whatever the
    number of trials: cheap enough to poll."""
    studies = [s for s in store.get_all_studies()
               if attrs.CONFIG in s.user_attrs and not s.user_attrs.get(attrs.DONE)
               and not s.user_attrs.get(attrs.CANCELLED)]
    studies.sort(key=lambda s: (-s.user_attrs.get(attrs.PRIORITY, 0), s.user_attrs.get(attrs.SUBMITTED_AT, ""),
                                s.study_name))
    return [s.study_name for s in studies]


STATUS_COLUMNS = ["name", "state", "target", "complete", "pruned", "fail", "running", "best_value", "best_trial",
                  "workers", "submitted", "eta_s", "mlflow_url"]


def status(name: str | None = None, *, storage: str | None = None, tracking: str | None = None) -> list[dict[str, Any]]:
    """One row per submitted study (or the one named), from the ``studies`` view, with the
    workers on it now (its RUNNING trials whose heartbeat is fresh) and an estimate of the
    time left (trials left × mean trial time ÷ workers)."""
    from lrsearch.queries import ResultsDatabase

    url, tracking = storage_url(storage), tracking_uri(tracking)
    with ResultsDatabase(url, tracking) as db:
        rows = db.query("SELECT * FROM studies WHERE target IS NOT NULL ORDER BY submitted_at, study_name").records()
    if name is not None:
        rows = [r for r in rows if r["study_name"] == name]
        if not rows:
            raise UsageError(f"no submitted study named {name!r} in {redact(url)}")
    store = open_storage(url, create=False)
    try:
        out = []
        for r in rows:
            workers = _active_workers(store, r["study_name"]) if r["n_running"] else 0
            left = max(0, r["target"] - r["n_complete"] - r["n_pruned"])
            eta = None if not workers or r["mean_trial_s"] is None else round(left * r["mean_trial_s"] / workers, 1)
            out.append({"name": r["study_name"], "state": r["state"], "target": r["target"],
                        "complete": r["n_complete"], "pruned": r["n_pruned"], "fail": r["n_fail"],
                        "running": r["n_running"], "best_value": r["best_value"],
                        "best_trial": r["best_trial_number"], "workers": workers,
                        "submitted": r["submitted_at"], "eta_s": 0.0 if r["state"] == "done" else eta,
                        "mlflow_url": run_url(tracking, r["mlflow_experiment_id"], r["mlflow_parent_run_id"])
                        if r["mlflow_parent_run_id"] else None})
        return out
    finally:
        store.close()


def _active_workers(store: Any, name: str) -> int:
    """The study's RUNNING trials whose worker still beats (one trial per worker at a time)."""
    study_id = store.get_study_id_from_name(name)
    running = len(store.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    return max(0, running - len(store._get_stale_trial_ids(study_id)))  # BaseHeartbeat's interface


def cancel(name: str, *, now: bool = False, storage: str | None = None, tracking: str | None = None) -> str:
    """Stop a study: no new trials are claimed; running ones finish (with ``now``, they stop
    at their next epoch boundary, FAIL with reason ``cancelled``). The parent run ends KILLED
    here if nothing runs, else by the worker whose trial ends last. Submitting the study
    again resumes it. Returns the study's state as a line."""
    url = storage_url(storage)
    store = open_storage(url, create=False)
    try:
        names = {s.study_name: s for s in store.get_all_studies()}
        if name not in names or attrs.CONFIG not in names[name].user_attrs:
            raise UsageError(f"no submitted study named {name!r} in {redact(url)}")
        study_id = names[name]._study_id
        user_attrs = names[name].user_attrs
        target = user_attrs[attrs.TARGET]
        with store_lock(url, store.retry):
            trials = store.get_all_trials(study_id, deepcopy=False)
            finished = sum(t.state in FINISHED_STATES for t in trials)
            if finished >= target:
                return f"study {name!r} is done ({finished} of {target} trials): nothing to cancel"
            store.set_study_user_attr(study_id, attrs.CANCELLED, {
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "now": now})
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if running == 0 and finished < target:
            tracker = Tracker(tracking_uri(tracking))
            if tracker.status(user_attrs[attrs.PARENT_RUN]) != "KILLED":
                tracker.end_run(user_attrs[attrs.PARENT_RUN], "KILLED")
        what = ("stopping at their next epoch" if now else "finishing") if running else "none running"
        return f"study {name!r} cancelled: {finished} of {target} trials done, {running} running ({what})"
    finally:
        store.close()
