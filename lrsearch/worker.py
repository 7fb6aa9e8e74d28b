"""The worker loop: claim a trial slot, train the trial, tell Optuna, until the study's
total is reached; trials whose worker died are failed and queued again on the way."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch import attrs
from lrsearch.errors import first_line
from lrsearch.objective import Objective
from lrsearch.results import FINISHED_STATES, counts
from lrsearch.retry import MAX_RETRY_DELAY_S
from lrsearch.session import Session, close_parent
from lrsearch.stopping import Interrupted, StopFlag
from lrsearch.storage import checkpoint, close_connections, grace_period, heartbeat, store_lock

MAX_RETRIES = 2  # re-queues of a trial whose worker died (retries of retries count)
WAIT_S = 0.25  # how often a worker with nothing to claim looks again (a few reads)

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def setup_process() -> None:
    """Process-wide settings for a process that trains: quiet libraries, one torch thread
    (faster than several for these small networks, and fair to parallel workers)."""
    import torch

    from lrsearch.training import quiet_lightning

    # Optuna logs a failed trial with its traceback: lrsearch reports failures in one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(int(os.environ.get("LRSEARCH_TORCH_THREADS", "1")))
    quiet_lightning()


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
        finished, running = counts(study)
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
    trial.set_user_attr(attrs.REASON, "over the study's total: claimed while the store lock's connection "
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
                                f"while it ran here ({frozen.user_attrs.get(attrs.REASON, 'no heartbeat')})")
    if error is not None:
        raise error
    return frozen


def _fail_untold(session: Session, trial: optuna.trial.Trial, error: Exception) -> None:
    """Mark FAIL, with the reason, a trial that Optuna's tell could not end (unless the
    database itself is out of reach: then its heartbeat stops and a rerun fails it)."""
    try:
        session.store.set_trial_user_attr(trial._trial_id, attrs.REASON, f"not told: {type(error).__name__}: "
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
        run_id = trial.user_attrs.get(attrs.MLFLOW_RUN)
        try:
            run_id = run_id or tracker.trial_run(session.experiment_id, study.study_name, trial.number) or \
                tracker.start_trial(session.experiment_id, session.parent_run_id, study.study_name, trial.number,
                                    trial.user_attrs.get(attrs.HYPERPARAMETERS, trial.params))
            store.set_trial_user_attr(trial_id, attrs.MLFLOW_RUN, run_id)
        except Exception as e:  # the queued retry matters more than the dead run's record
            session.warnings.append(f"could not record trial {trial.number}'s MLflow run: {first_line(e)}")
        store.set_trial_user_attr(trial_id, attrs.REASON, reason)
        store.set_trial_state_values(trial_id, TrialState.FAIL)
        history = [*trial.system_attrs.get(attrs.RETRY_HISTORY, []), trial.number]
        if len(history) <= MAX_RETRIES:
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                system_attrs={attrs.FAILED_TRIAL: history[0], attrs.RETRY_HISTORY: history}))
        if run_id:
            try:
                tracker.kill_run(run_id, reason)
            except Exception as e:
                session.warnings.append(f"could not close trial {trial.number}'s MLflow run: {first_line(e)}")
