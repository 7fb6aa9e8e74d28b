"""Studies: create or join one from a config, run its trials, and read back the best."""

from __future__ import annotations

import datetime
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
from lrsearch.objective import HYPERPARAMETERS_ATTR, MLFLOW_RUN_ATTR, REASON_ATTR, TRACKING_ERROR_ATTR, Objective
from lrsearch.pruning import check_interval
from lrsearch.retry import MAX_RETRY_DELAY_S, outage_window
from lrsearch.space import grid_size, grid_space
from lrsearch.stopping import Interrupted, StopFlag
from lrsearch.queries import ensure_indexes, ensure_views
from lrsearch.storage import (
    check_stores, checkpoint, close_connections, grace_period, heartbeat, is_postgres, open_storage, prepare_database, redact,
    report_dir, storage_url, store_lock, tracking_uri,
)
from lrsearch.tracking import Tracker

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
# Trials that count towards a study's total: a FAIL is retried, a PRUNED one is an answer.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRIES = 2  # re-queues of a trial whose worker died (retries of retries count)
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
        return _GridSampler(grid_space(cfg.params), seed=seed)
    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its only ``after_trial`` work: calling ``Study.stop`` once
    the grid is done, which ends ``study.optimize`` but fails outside it. The worker loop
    asks and tells trials itself and ends at the study's total, which is the grid's size."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        pass


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
            study_file=study_file, run_id=study.user_attrs.get(PARENT_RUN_ATTR),
        )
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr("metric", cfg.study.metric)
    if is_postgres(url):
        ensure_views(url)  # no-op when current; skipped when MLflow's tables live elsewhere
    else:
        ensure_indexes(url)
    return Session(cfg, study, store, store.get_study_id_from_name(name), url, tracker, experiment_id,
                   parent_run_id, data, target_trials(cfg))


def work(session: Session, *, stop: StopFlag | None = None, callbacks: Sequence[TrialCallback] = ()) -> None:
    """Run trials until the study's total of COMPLETE + PRUNED trials is reached, then close
    the parent run if this worker is the last.

    Each trial's slot is claimed under the store's lock (count, then let Optuna create the
    trial), so workers joining late or together never exceed the total; a slot held by a
    trial whose worker died is freed when its heartbeat goes stale, and its parameters are
    queued again, under the same lock, to be taken by the next claim.
    """
    stop = stop or StopFlag()
    objective = Objective(session.cfg, session.data, session.tracker, session.experiment_id,
                          session.parent_run_id, stop)
    status = "FAILED"
    try:
        while True:
            stop.check()
            trial = _claim(session)
            if trial is _DONE:
                break
            if trial is None:  # the rest is running elsewhere: wait for it
                time.sleep(WAIT_S)
                continue
            frozen = _run_trial(session, objective, trial)
            for callback in callbacks:
                callback(session.study, frozen)
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        _finish(session, objective, status)


_DONE: Any = object()


def _claim(session: Session) -> optuna.trial.Trial | None | Any:
    """A new trial of the study, ``None`` if every open slot is running elsewhere, or
    ``_DONE`` once the total is reached. Under the store lock: trials whose worker died are
    failed and queued again (unless the store was just unreachable: then no heartbeat could
    be written either, and their workers get a grace period to beat again), then the slots
    are counted and Optuna creates the trial (taking a queued one first)."""
    study = session.study
    with store_lock(session.url, session.store.retry) as lock:
        # After an outage, a live worker's heartbeat resumes within one retry delay of the
        # database's return, and this worker's last failure was at most one delay before it.
        heartbeats = session.store.get_heartbeat_interval() is not None
        if heartbeats and session.store.retry.quiet_for(grace_period() + 2 * MAX_RETRY_DELAY_S):
            _fail_stale_trials(session)
        finished, running = _counts(study)
        if finished >= session.target:
            return _DONE
        if finished + running >= session.target:
            return None
        with warnings.catch_warnings():  # "heartbeats are meant for optimize": _run_trial beats itself
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        if lock.held():
            return trial
    return _confirm_claim(session, trial)


def _confirm_claim(session: Session, trial: optuna.trial.Trial) -> optuna.trial.Trial | None:
    """A trial claimed while the lock's connection dropped (so another worker may have
    claimed at the same time): keep it if the trials numbered before it leave it a slot,
    else end it FAIL at once, untrained, so the study never passes its total."""
    ahead = [t for t in session.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
             if t.number < trial.number]
    if len(ahead) < session.target:
        return trial
    trial.set_user_attr(REASON_ATTR, "over the study's total: claimed while the store lock's connection "
                                     "was lost, by more workers than slots")
    session.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    return None


def _run_trial(session: Session, objective: Objective, trial: optuna.trial.Trial) -> FrozenTrial:
    """Train one trial and tell Optuna how it ended (this worker's own ask-and-tell, so that
    a failure on the way, a second signal included, never leaves the trial RUNNING)."""
    study = session.study
    value: float | None = None
    error: BaseException | None = None
    with heartbeat(session.store, trial._trial_id):
        try:
            value = objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except BaseException as e:  # recorded FAIL, then raised
            state, error = TrialState.FAIL, e
    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except Exception as e:  # the sampler's after_trial, say: the trial must not stay RUNNING
        _fail_untold(session, trial, e)
        raise
    frozen = session.store.get_trial(trial._trial_id)
    if frozen.state != state:  # failed by another worker that found no heartbeat of it
        session.warnings.append(f"trial {trial.number} was marked {frozen.state.name} by another worker "
                                f"while it ran here ({frozen.user_attrs.get(REASON_ATTR, 'no heartbeat')})")
    if error is not None:
        raise error
    return frozen


def _fail_untold(session: Session, trial: optuna.trial.Trial, error: Exception) -> None:
    """Mark FAIL, with the reason, a trial that Optuna's tell could not end (unless the
    database itself is out of reach: then its heartbeat stops and a rerun fails it)."""
    try:
        session.store.set_trial_user_attr(trial._trial_id, REASON_ATTR, f"not told: {type(error).__name__}: "
                                                                        f"{first_line(error)}")
        session.store.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:
        pass


def _finish(session: Session, objective: Objective, status: str) -> None:
    """The end of a worker's loop: its MLflow records written, the parent run closed if it
    is the last, and embedded stores checkpointed (the process may exit without closing)."""
    session.warnings.extend(objective.drain())
    close_parent(session, status)
    for url in (session.url, session.tracker.uri):
        checkpoint(url)
    session.store.close()  # idle connections: what follows (summary, report) opens what it needs
    close_connections()


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


def _fail_stale_trials(session: Session) -> None:
    """Trials whose worker stopped beating (killed, powered off): each ends FAIL with the
    reason and its MLflow run (made now if its worker died before making it) KILLED, and
    its parameters are queued again (at most ``MAX_RETRIES`` times, recorded as Optuna's
    ``RetryHeartbeatStaleTrialCallback`` records retries). Called under the store lock, so
    the queued retry is the next trial claimed."""
    store, study, tracker = session.store, session.study, session.tracker
    reason = f"worker lost: no heartbeat for {grace_period()} s"
    for trial_id in store._get_stale_trial_ids(session.study_id):  # BaseHeartbeat's interface
        trial = store.get_trial(trial_id)
        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        try:
            run_id = run_id or tracker.trial_run(session.experiment_id, study.study_name, trial.number) or \
                tracker.start_trial(session.experiment_id, session.parent_run_id, study.study_name, trial.number,
                                    trial.user_attrs.get(HYPERPARAMETERS_ATTR, trial.params))
            store.set_trial_user_attr(trial_id, MLFLOW_RUN_ATTR, run_id)
        except Exception as e:  # the queued retry matters more than the dead run's record
            session.warnings.append(f"could not record trial {trial.number}'s MLflow run: {first_line(e)}")
        store.set_trial_user_attr(trial_id, REASON_ATTR, reason)
        store.set_trial_state_values(trial_id, TrialState.FAIL)
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) <= MAX_RETRIES:
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                system_attrs={"failed_trial": history[0], "retry_history": history}))
        if run_id:
            try:
                tracker.kill_run(run_id, reason)
            except Exception as e:
                session.warnings.append(f"could not close trial {trial.number}'s MLflow run: {first_line(e)}")


def _counts(study: optuna.Study) -> tuple[int, int]:
    """Trials that count towards the total (COMPLETE + PRUNED), and trials RUNNING."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def close_parent(session: Session, status: str) -> None:
    """End the study's parent run as the study stands, whichever worker ends last: FINISHED
    once the total is reached (``status``, this worker's own fate, does not matter then);
    else, when no trial is running elsewhere, ``status`` (KILLED or FAILED), and while
    trials run elsewhere, nothing (their workers close it)."""
    try:
        finished, running = _counts(session.study)
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
        session.tracker.end_run(session.parent_run_id, status, _summary(session.study))
    except Exception as e:  # the trials are safe in Optuna: report, do not fail the study
        session.warnings.append(f"could not close the study's MLflow run: {first_line(e)}")


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
                 out: Path | None = None, study: optuna.Study | None = None) -> list[Path]:
    """Draw the study's report from the stores into ``out`` (default: see
    ``storage.report_dir``) and log it under ``report/`` on the parent MLflow run.
    ``study``: the study already open (as at the end of ``run``), read through its storage."""
    from lrsearch.report import build_report

    study = study or load_study(name, storage)
    tracker = Tracker(tracking_uri(tracking))
    out = out or report_dir(storage_url(storage), name)
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
