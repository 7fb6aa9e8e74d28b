"""A study's trial slots: claiming trials under the store lock (never past the study's total,
whoever claims at once), releasing the ones claimed but never begun on an error, and failing
and queueing again the trials of a worker that died (its heartbeats stopped)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch.core import attrs, faults
from lrsearch.core.errors import first_line
from lrsearch.core.study_record import Cancellation, StudyRecord
from lrsearch.results.ranking import FINISHED_STATES
from lrsearch.service.session import Session
from lrsearch.store.heartbeat import grace_period
from lrsearch.store.lock import store_lock
from lrsearch.store.retry import MAX_RETRY_DELAY_S

MAX_RETRIES = 2  # re-queues of a trial whose worker died (retries of retries count)


# What _claim returns instead of trial ids, compared by identity (Any: they stand in a list's place).
_DONE: Any = object()


_CANCELLED: Any = object()


def _cancelled(session: Session) -> Cancellation | None:
    """The study's cancellation, read afresh, or None."""
    return StudyRecord.from_attrs(session.store.get_study_user_attrs(session.study_id)).cancelled


def _claim(session: Session, count: int = 1) -> list[int] | Any:
    """Up to ``count`` trials of the study to run (their ids; none if every open slot is
    running elsewhere), or ``_DONE`` once the total is reached. Under the store lock: trials
    whose worker died are failed and queued again (unless the store was just unreachable:
    then no heartbeat could be written either, and their workers get a grace period to beat
    again), then the slots are counted and the trials made, queued ones first, in one
    transaction. ``_CANCELLED`` for a cancelled study."""
    with store_lock(session.url, session.store.retry) as lock:
        record = StudyRecord.from_attrs(session.store.get_study_user_attrs(session.study_id))
        if record.cancelled is not None:
            return _CANCELLED
        # Not while this worker meets an outage: its own calls wait it out, and the others'
        # heartbeats, held back by it, resume within an interval of the database's return
        # (and a trial is failed only at a second look: see _stale_trials).
        heartbeats = session.store.get_heartbeat_interval() is not None
        if heartbeats and session.store.retry.quiet_for(grace_period() + 2 * MAX_RETRY_DELAY_S):
            _fail_stale_trials(session)
        states = session.store.count_states(session.study_id)
        finished = session.finished = sum(states.get(s.name, 0) for s in FINISHED_STATES)
        if finished >= session.target:
            return _DONE
        trials = session.store.claim_trials(
            session.study_id, min(count, session.target - finished - states.get("RUNNING", 0))
        )
        if not trials:
            return trials
        with _released_on_error(session, trials):
            faults.point("claimed")
            if record.interrupted is not None:  # its last worker closed the parent run: reopen it
                session.store.set_study_user_attrs(session.study_id, StudyRecord.to_attrs(interrupted=None))
                session.started = False
            if lock.held():
                return trials
    with _released_on_error(session, trials):
        return [t for t in trials if _confirm_claim(session, t) is not None]


@contextlib.contextmanager
def _released_on_error(session: Session, trial_ids: Sequence[int]) -> Iterator[None]:
    """Trials claimed, not yet in an array: on any error (an outage past its window, a
    second signal), each ended FAIL now, and queued again if it had parameters (a queued
    trial taken), rather than left RUNNING until its heartbeat goes stale."""
    try:
        yield
    except BaseException as e:
        for trial_id in trial_ids:
            _fail_untold(session, trial_id, e)
            with contextlib.suppress(Exception):
                trial = session.store.get_trial(trial_id)
                if trial.state != TrialState.FAIL:
                    continue
                if trial.params:  # a retry lrsearch queued (worker lost, interrupted)
                    _queue_again(session, trial)
                elif "fixed_params" in trial.system_attrs:  # one queued with Study.enqueue_trial
                    session.study.enqueue_trial(trial.system_attrs["fixed_params"])
        raise


def _confirm_claim(session: Session, trial_id: int) -> int | None:
    """A trial claimed while the lock's connection dropped (so another worker may have
    claimed at the same time): keep it if the trials numbered before it leave it a slot,
    else end it FAIL at once, untrained, so the study never passes its total."""
    number = session.store.get_trial(trial_id).number
    ahead = [
        t
        for t in session.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
        if t.number < number
    ]
    if len(ahead) < session.target:
        return trial_id
    session.store.fail_trial(
        trial_id,
        {
            attrs.REASON: "over the study's total: claimed while the store lock's "
            "connection was lost, by more workers than slots"
        },
    )
    return None


def _queue_again(session: Session, trial: FrozenTrial) -> bool:
    """Queue a trial's parameters again (WAITING: the next claim takes it) unless it has
    been retried ``MAX_RETRIES`` times already; recorded as Optuna's
    ``RetryHeartbeatStaleTrialCallback`` records retries."""
    history = [*trial.system_attrs.get(attrs.RETRY_HISTORY, []), trial.number]
    if len(history) > MAX_RETRIES:
        return False
    session.study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={attrs.FAILED_TRIAL: history[0], attrs.RETRY_HISTORY: history},
        )
    )
    return True


def _fail_untold(session: Session, trial_id: int, error: BaseException) -> None:
    """Mark FAIL, with the reason, a trial that Optuna's tell could not end (unless the
    database itself is out of reach: then its heartbeat stops and a rerun fails it)."""
    try:
        session.store.fail_trial(trial_id, {attrs.REASON: f"not told: {type(error).__name__}: {first_line(error)}"})
    except Exception:
        pass


def _stale_trials(session: Session) -> list[int]:
    """The trials found stale at two looks ``2 * heartbeat_interval()`` apart or more, with
    the same last heartbeat at both. One look cannot tell a dead worker from a live one
    whose beats an outage held back, when this worker saw no outage itself (it was busy
    with no trial open, say): a live worker beats again within an interval of the
    database's return (each beat is tried once, every interval)."""
    from lrsearch.store.heartbeat import heartbeat_interval

    now, looks = time.monotonic(), {}
    for tid, beat in session.store.stale_heartbeats(session.study_id).items():
        last, since = session.suspects.get(tid, (beat, now))
        looks[tid] = (beat, since if last == beat else now)  # it beat since: a new first look
    due = [tid for tid, (_, since) in looks.items() if now - since >= 2 * heartbeat_interval()]
    session.suspects = {tid: look for tid, look in looks.items() if tid not in due}
    return due


def _fail_stale_trials(session: Session) -> None:
    """Trials whose worker stopped beating (killed, powered off; see ``_stale_trials``):
    each ends FAIL with the reason and its MLflow run (made now if its worker died before
    making it) KILLED, and its parameters are queued again (at most ``MAX_RETRIES`` times,
    recorded as Optuna's ``RetryHeartbeatStaleTrialCallback`` records retries). Called
    under the store lock, so the queued retry is the next trial claimed."""
    store, study, tracker = session.store, session.study, session.tracker
    reason = f"worker lost: no heartbeat for {grace_period()} s"
    for trial_id in _stale_trials(session):
        trial = store.get_trial(trial_id)
        run_id = trial.user_attrs.get(attrs.MLFLOW_RUN)
        try:
            run_id = (
                run_id
                or tracker.trial_run(session.experiment_id, study.study_name, trial.number)
                or tracker.start_trial(
                    session.experiment_id,
                    session.parent_run_id,
                    study.study_name,
                    trial.number,
                    trial.user_attrs.get(attrs.HYPERPARAMETERS, trial.params),
                )
            )
        except Exception as e:  # the queued retry matters more than the dead run's record
            session.warnings.append(f"could not record trial {trial.number}'s MLflow run: {first_line(e)}")
        ended = {attrs.REASON: reason, **({attrs.MLFLOW_RUN: run_id} if run_id else {})}
        if not store.fail_trial(trial_id, ended):
            continue  # its worker told it meanwhile: alive after all (a pause, thawed)
        _queue_again(session, trial)
        if run_id:
            try:
                tracker.kill_run(run_id, reason)
            except Exception as e:
                session.warnings.append(f"could not close trial {trial.number}'s MLflow run: {first_line(e)}")
