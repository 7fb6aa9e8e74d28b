"""Studies: create or join one from a config, run its trials, and read back the best."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch.config import DEFAULT_TRIALS, Config
from lrsearch.data import Dataset, load_data
from lrsearch.errors import UsageError, first_line
from lrsearch.objective import MLFLOW_RUN_ATTR, TRACKING_ERROR_ATTR, Objective
from lrsearch.pruning import check_interval
from lrsearch.space import grid_size, grid_space
from lrsearch.stopping import Interrupted, StopFlag
from lrsearch.queries import ensure_indexes, ensure_views
from lrsearch.storage import (
    checkpoint, data_dir, grace_period, is_postgres, open_storage, redact, storage_url, store_lock, tracking_uri,
)
from lrsearch.tracking import Tracker

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
# Trials that count towards a study's total: a FAIL is retried, a PRUNED one is an answer.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRIES = 2  # re-queues of a trial whose worker died
WAIT_S = 0.25  # how often a worker with nothing to claim looks again (a few reads)

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass
class StudyRun:
    """A study after ``run_study``: where its records are and how to find them."""

    study: optuna.Study
    target: int
    experiment_id: str
    parent_run_id: str
    url: str
    warnings: list[str]


def target_trials(cfg: Config) -> int:
    """The study's total: ``trials``, capped at the grid's size for a grid study."""
    if cfg.study.sampler == "grid":
        size = grid_size(cfg.params)
        return min(cfg.study.trials or size, size)
    return cfg.study.trials or DEFAULT_TRIALS


def make_sampler(cfg: Config, n_existing: int = 0, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. A seeded sampler's seed is derived from the study seed, the
    trials already run and the worker's index: a resumed study continues its sequence
    instead of proposing its first trials again, and parallel workers never share a seed
    (which would make them propose the same trials)."""
    seed = None
    if cfg.study.seed is not None:
        seed = (cfg.study.seed + 7919 * n_existing + 104729 * worker) % 2**31
    name = cfg.study.sampler
    if name == "tpe":
        # multivariate + group: TPE models the parameters that occur together (momentum only
        # with sgd and rmsprop, decay only with time_decay, …) jointly, as Optuna advises for
        # define-by-run spaces; constant liar keeps parallel workers apart.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg.params), seed=seed)
    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """The study's pruner; epochs are its steps."""
    epochs = cfg.train.epochs
    name = cfg.study.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 10))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=check_interval(cfg), max_resource=epochs)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


@dataclass
class Session:
    """One worker's view of an open study: the study, its MLflow records and its data."""

    cfg: Config
    study: optuna.Study
    url: str
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    data: Dataset
    target: int
    warnings: list[str] = field(default_factory=list)

    @property
    def mlflow_url(self) -> str:
        return self.tracker.run_url(self.experiment_id, self.parent_run_id)


def open_session(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
                 study_file: Path | None = None, worker: int = 0) -> Session:
    """Create or join the study ``cfg`` describes, with its MLflow experiment and parent run.

    Bad data and an unreachable tracking store are reported before any store is created.
    """
    data = load_data(cfg.data)
    url = storage_url(storage)
    name = cfg.study.name
    with store_lock(url):  # the first of several workers creates MLflow's tables (two migrations collide)
        tracker = Tracker(tracking_uri(tracking))
        tracker.check()
    store = open_storage(url, stale_trial_callback=_StaleTrials(tracker))
    with store_lock(url):  # one study and one parent run, however many workers start at once
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
            study_file=study_file, run_id=study.user_attrs.get(PARENT_RUN_ATTR),
        )
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr("metric", cfg.study.metric)
    if is_postgres(url):
        ensure_views(url)  # no-op when current; skipped when MLflow's tables live elsewhere
    else:
        ensure_indexes(url)
    return Session(cfg, study, url, tracker, experiment_id, parent_run_id, data, target_trials(cfg))


def work(session: Session, *, stop: StopFlag | None = None, callbacks: Sequence[TrialCallback] = ()) -> None:
    """Run trials until the study's total of COMPLETE + PRUNED trials is reached.

    Each trial's slot is claimed under the store's lock (count, then let Optuna create the
    trial), so workers joining late or together never exceed the total; a slot held by a
    trial whose worker died is freed when its heartbeat goes stale, and its parameters are
    queued again. Closes the parent run when the study is done.
    """
    stop = stop or StopFlag()
    study, target = session.study, session.target
    claim = contextlib.ExitStack()
    objective = Objective(session.cfg, session.data, session.tracker, session.experiment_id,
                          session.parent_run_id, stop, on_trial_start=claim.close)
    try:
        while True:
            stop.check()
            claim.enter_context(store_lock(session.url))
            finished, running = _counts(study)
            if finished >= target:
                claim.close()
                break
            if finished + running >= target:  # the rest is running elsewhere: wait for it
                claim.close()
                # A trial whose worker died holds its slot until marked FAIL here (optimize
                # does this too, but only when it gets to start a trial).
                _fail_stale_trials(study)
                time.sleep(WAIT_S)
                continue
            try:
                study.optimize(objective, n_trials=1, callbacks=callbacks, gc_after_trial=False)
            finally:
                claim.close()
    except BaseException as e:
        _finish(session, objective, "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    _finish(session, objective, "FINISHED")


def _finish(session: Session, objective: Objective, status: str) -> None:
    """The end of a worker's loop: its MLflow records written, the parent run closed if it
    is the last, and embedded stores checkpointed (the process may exit without closing)."""
    session.warnings.extend(objective.drain())
    close_parent(session, status)
    for url in (session.url, session.tracker.uri):
        checkpoint(url)


def run_study(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
              study_file: Path | None = None, callbacks: Sequence[TrialCallback] = (),
              on_start: Callable[[int, int], None] | None = None, stop: StopFlag | None = None,
              worker: int = 0) -> StudyRun:
    """Create or resume the study ``cfg`` describes and run trials until its total is reached.

    ``on_start(target, finished)`` is called once the study is open; ``callbacks`` after
    each trial, as ``study.optimize`` calls them.
    """
    session = open_session(cfg, storage=storage, tracking=tracking, study_file=study_file, worker=worker)
    if on_start is not None:
        on_start(session.target, count_finished(session.study))
    work(session, stop=stop, callbacks=callbacks)
    return StudyRun(session.study, session.target, session.experiment_id, session.parent_run_id,
                    session.mlflow_url, session.warnings + tracking_warnings(session.study))


def tracking_warnings(study: optuna.Study) -> list[str]:
    """One line for trials whose MLflow record was lost (the tracking store stopped answering)."""
    lost = [t.number for t in study.get_trials(deepcopy=False) if TRACKING_ERROR_ATTR in t.user_attrs]
    if not lost:
        return []
    shown = ", ".join(map(str, lost[:10])) + (", …" if len(lost) > 10 else "")
    return [f"MLflow tracking was lost for {len(lost)} trials ({shown}); they are complete in Optuna, "
            f"with the error in their {TRACKING_ERROR_ATTR!r} user attribute"]


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():  # experimental since Optuna 2.9, and still the way
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _counts(study: optuna.Study) -> tuple[int, int]:
    """Trials that count towards the total (COMPLETE + PRUNED), and trials RUNNING."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def close_parent(session: Session, status: str) -> None:
    """End the study's parent run: FINISHED once the total is reached; KILLED or FAILED when this
    worker stops early and no other worker is running a trial (else they will close it)."""
    finished, running = _counts(session.study)
    if status == "FINISHED" and finished < session.target:
        return
    if status != "FINISHED" and running > 0:
        return
    try:
        session.tracker.end_run(session.parent_run_id, status, _summary(session.study))
    except Exception as e:  # the trials are safe in Optuna: report, do not fail the study
        session.warnings.append(f"could not close the study's MLflow run: {first_line(e)}")


class _StaleTrials:
    """For a trial whose worker died: end its MLflow run KILLED and queue its parameters
    again (Optuna has already marked it FAIL)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if run_id:
            try:
                self.tracker.kill_run(run_id, f"worker lost: no heartbeat for {grace_period()} s")
            except Exception:
                pass  # re-queueing the trial matters more than the dead run's record
        self.retry(study, trial)


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    """An existing study, or :class:`UsageError` naming the studies that do exist."""
    url = storage_url(storage)
    store = open_storage(url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no study named {name!r} in {redact(url)} (studies: {known})")
    return optuna.load_study(study_name=name, storage=store)


def best_trials(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` COMPLETE trials with a finite value, best first, as plain dicts."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return [trial_record(t) for t in done[:top]]


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as ``lrsearch best`` shows it."""
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "value": t.value, "state": t.state.name,
            "params": t.user_attrs.get("hyperparameters", t.params),
            "duration_s": duration, "mlflow_run_id": t.user_attrs.get(MLFLOW_RUN_ATTR)}


def _summary(study: optuna.Study) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False)
    summary = {f"n_{s.name.lower()}": float(sum(t.state == s for t in trials))
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = best_trials(study, 1)
    if best:
        summary["best_value"] = best[0]["value"]
        summary["best_trial"] = float(best[0]["number"])
    return summary


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def write_report(name: str, *, storage: str | None = None, tracking: str | None = None,
                 out: Path | None = None) -> list[Path]:
    """Draw the study's report from the stores into ``out`` (default
    ``lrsearch-data/reports/NAME``) and log it under ``report/`` on the parent MLflow run."""
    from lrsearch.report import build_report

    study = load_study(name, storage)
    tracker = Tracker(tracking_uri(tracking))
    out = out or data_dir() / "reports" / name
    grid = any("grid_id" in t.system_attrs for t in study.get_trials(deepcopy=False))
    paths = build_report(study, tracker.client, out, grid=grid)
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent:
        tracker.log_dir(parent, out, "report")
    return paths


def experiment_table(name: str, *, storage: str | None = None, tracking: str | None = None) -> str:
    """The Markdown results table of a (grid) study, from the stores."""
    from lrsearch.report import collect, experiment_table as table

    return table(collect(load_study(name, storage), Tracker(tracking_uri(tracking)).client))
