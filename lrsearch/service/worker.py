"""The worker loop: claim a trial slot, train the trial, tell Optuna, until the study's
total is reached; trials whose worker died are failed and queued again on the way."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from lrsearch.core import attrs, faults
from lrsearch.core.errors import LrsearchError, first_line
from lrsearch.service.objective import Objective, TakenOver
from lrsearch.results.ranking import FINISHED_STATES, counts
from lrsearch.store.retry import MAX_RETRY_DELAY_S
from lrsearch.service.queue import config_digest, queue
from lrsearch.service.session import Session, close_parent, join, mark_unrunnable, start_parent
from lrsearch.fit.member import Member
from lrsearch.core.stopping import Cancelled, Interrupted, StopFlag, TrialStop, stopped_by
from lrsearch.store.heartbeat import Heartbeat, grace_period
from lrsearch.store.lock import close_connections, store_lock
from lrsearch.store.storage import checkpoint, open_storage
from lrsearch.store.urls import storage_url, tracking_uri
from lrsearch.track.tracking import Tracker

MAX_RETRIES = 2  # re-queues of a trial whose worker died (retries of retries count)
WAIT_S = 0.25  # how soon a worker with nothing to claim looks again (a few reads) ...
MAX_WAIT_S = 0.5  # ... backing off to this while it stays idle
CANCEL_POLL_S = 1.0  # how often a running trial's worker looks for `lrsearch cancel --now`

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def default_index() -> int:
    """A worker's index when none is given (its sampler's seed): distinct per process and per
    host, since in containers every worker may be pid 1."""
    import socket
    import zlib

    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def setup_process() -> None:
    """Process-wide settings for a process that trains: quiet libraries, one torch thread
    (faster than several for these small networks, and fair to parallel workers)."""
    import torch

    from lrsearch.fit.training import quiet_lightning

    # Optuna logs a failed trial with its traceback: lrsearch reports failures in one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(int(os.environ.get("LRSEARCH_TORCH_THREADS", "1")))
    quiet_lightning()


class Worker:
    """One worker's warm state: its storage, its tracker, and a session on each study it has
    served (sampler, data, MLflow records), kept between trials and between studies.

    Trials are claimed round robin across the studies it is given (the caller orders them:
    priority, then the oldest submission), one array of trials at a time (``_Array``).
    """

    def __init__(self, store: Any, url: str, tracker: Tracker, *, index: int = 0, stop: StopFlag | None = None,
                 callbacks: Sequence[TrialCallback] = (), warn: Callable[[str], None] | None = None,
                 array: int | str | None = None) -> None:
        self.store = store
        self.url = url
        self.tracker = tracker
        self.index = index
        self.stop = stop or StopFlag()
        self.callbacks = callbacks
        self.warn = warn or (lambda line: None)
        self.sessions: dict[str, tuple[Session, Objective]] = {}
        self.ended: dict[str, str] = {}  # studies that ended while served here: name -> "done" or "cancelled"
        # Studies this worker cannot run (a configuration this version cannot read, a CSV
        # file this host lacks), by the stored configuration it failed on: a corrected
        # resubmission is tried again.
        self.broken: dict[str, str] = {}
        self.warnings: list[str] = []  # of the studies it has let go
        self.array = array  # trials trained at once: "auto", a size, or None (each study's [train] array)
        self.sizes: dict[str, int] = {}  # the array size used for each study served
        self._last: str | None = None
        faults.worker = index

    def add(self, session: Session) -> None:
        """Serve a study this process opened itself (``open_session``)."""
        self.sessions[session.study.study_name] = (session, self._objective(session))

    def open_studies(self) -> list[str]:
        """The queue (``service.queue``), less the studies this worker cannot run."""
        open_now = queue(self.store, with_config=True)
        for name in [n for n in self.broken if open_now.get(n) != self.broken[n]]:
            del self.broken[name]  # resubmitted (or gone): worth another try
        return [name for name in open_now if name not in self.broken]

    def step(self, names: Sequence[str]) -> bool:
        """Claim and run one trial of the first of ``names`` (after the study served last)
        that has an open slot; False if none has. A study this worker serves that left
        ``names`` (cancelled, or done by other workers) is let go first, its parent run
        closed if this worker was the last on it."""
        for name in [n for n in self.sessions if n not in names]:
            session = self.sessions[name][0]
            self._end(session, "cancelled" if _cancelled(session) is not None else "done")
        if self._last in names:
            at = names.index(self._last) + 1
            names = [*names[at:], *names[:at]]
        for name in names:
            served = self._session(name)
            if served is None:
                continue
            session, objective = served
            size = self._array_size(session)  # timed (once) before a claim: a claimed trial must train
            claimed = _claim(session, size)
            if claimed is _DONE or claimed is _CANCELLED:
                self._end(session, "done" if claimed is _DONE else "cancelled")
                continue
            if not claimed:  # its open slots run elsewhere
                continue
            self._last = name
            if not session.started:
                start_parent(session, objective.outbox)
                objective.outbox.submit("the study's array size", Tracker.set_tags, session.parent_run_id,
                                        {"array": self._wanted(session), "array.size": size})
            # An array's trials end (and start) together: their MLflow records, two jobs each,
            # wait for the tracking thread instead of holding up the array.
            objective.outbox.limit = max(objective.outbox.limit, 2 * size)
            # Its slots are refilled as its trials end only where it is the only study served:
            # several studies take turns, an array each.
            array = _Array(session, objective, self.stop, self.callbacks, refill=len(names) == 1)
            array.train(claimed)
            if _cancelled(session) is not None:
                self._end(session, "cancelled")
            return True
        return False

    def _wanted(self, session: Session) -> int | str:
        return self.array if self.array is not None else session.cfg.train.array

    def _array_size(self, session: Session) -> int:
        """Trials of the study to train at once: the size asked for (capped by memory), or
        the fastest per trial, timed on this worker (``auto``)."""
        from lrsearch.fit.training import choose_array_size, largest_array

        name = session.study.study_name
        if name not in self.sizes:
            wanted = self._wanted(session)
            self.sizes[name] = (choose_array_size(session.cfg, session.data, session.target) if wanted == "auto"
                                else min(int(wanted), largest_array(session.cfg, session.data)))
        return self.sizes[name]

    def finish(self, status: str, why: str | None = None) -> list[str]:
        """The end of this worker: every MLflow record written, each study's parent run
        closed if this worker is its last (``why`` it stopped, for a study left interrupted),
        embedded stores checkpointed (the process may exit without closing). Returns the
        warnings of all its studies."""
        lines = self.warnings
        for session, objective in self.sessions.values():
            session.warnings.extend(objective.drain())
            ended = self.ended.get(session.study.study_name)
            close_parent(session, "KILLED" if ended == "cancelled" else status, why)
            lines += session.warnings
        for url in (self.url, self.tracker.uri):
            checkpoint(url)
        self.store.close()  # idle connections: what follows (summary, report) opens what it needs
        close_connections()
        return lines

    def _objective(self, session: Session) -> Objective:
        return Objective(session.cfg, session.data, session.tracker, session.experiment_id,
                         session.parent_run_id, self.stop)

    def _session(self, name: str) -> tuple[Session, Objective] | None:
        if name not in self.sessions:
            try:
                session = join(name, self.store, self.url, self.tracker, worker=self.index)
            except LrsearchError as e:  # this study cannot run here; the others can
                self._unrunnable(name, str(e))
                return None
            self.add(session)
        return self.sessions[name]

    def _unrunnable(self, name: str, reason: str) -> None:
        """Skip the study from now on (until it is resubmitted), saying why where its
        owner looks: ``status``, the ``studies`` view, its parent run's description."""
        self.broken[name] = _config_of(self.store, name)
        self.warn(f"study {name!r} skipped: {reason}")
        try:
            mark_unrunnable(self.store, name, self.url, self.tracker, reason)
        except Exception as e:  # the warning above stands; the record can wait for the next worker
            self.warn(f"could not record why study {name!r} cannot run here: {first_line(e)}")

    def _end(self, session: Session, how: str) -> None:
        """A study done, or cancelled: its parent run closed as the study stands (by whichever
        worker ends last), and a finished one marked so, to drop out of the queue."""
        name = session.study.study_name
        self.ended[name] = how
        session.warnings.extend(self.sessions.pop(name)[1].drain())  # a worker that serves for days holds
        close_parent(session, "KILLED" if how == "cancelled" else "FINISHED")  # only its open studies
        if how == "done" and not session.study.user_attrs.get(attrs.DONE):
            session.store.set_study_user_attr(session.study_id, attrs.DONE, True)
        self.warnings += session.warnings


def serve(storage: str | None = None, tracking: str | None = None, *, index: int = 0,
          stop: StopFlag | None = None, callbacks: Sequence[TrialCallback] = (), max_idle: float | None = None,
          warn: Callable[[str], None] | None = None, array: int | str | None = None,
          tracker: Any = None) -> list[str]:
    """Serve every study submitted to ``storage`` until stopped, or ``max_idle`` seconds
    pass with nothing to do. Polls while idle, backing off to ``MAX_WAIT_S``. Returns the
    warnings of the studies it served. ``tracker``: its MLflow client (default: a tracking
    process of its own, closed at the end)."""
    from lrsearch.track.process import TrackingProcess

    url = storage_url(storage)
    own = tracker is None
    tracker = tracker or TrackingProcess(tracking_uri(tracking), index)
    try:
        store = open_storage(url, hint="; start the worker again")
    except BaseException:
        if own:
            tracker.close()
        raise
    worker = Worker(store, url, tracker, index=index, stop=stop, callbacks=callbacks, warn=warn, array=array)
    idle_since, wait = time.monotonic(), WAIT_S
    status, why = "FAILED", None
    try:
        while True:
            worker.stop.check()
            if worker.step(worker.open_studies()):
                idle_since, wait = time.monotonic(), WAIT_S
                continue
            if max_idle is not None and time.monotonic() - idle_since >= max_idle:
                break
            time.sleep(wait)
            wait = min(2 * wait, MAX_WAIT_S)
        status = "FINISHED"
    except BaseException as e:
        status, why = stopped_by(e)
        raise
    finally:
        lines = worker.finish(status, why)
        if own:
            tracker.close()
    return lines


def work(session: Session, *, stop: StopFlag | None = None, callbacks: Sequence[TrialCallback] = (),
         index: int = 0, array: int | str | None = None) -> None:
    """Run trials of this one study until its total of COMPLETE + PRUNED trials is reached
    (or it is cancelled), then close the parent run if this worker is the last.

    Each trial's slot is claimed under the store's lock (count, then let Optuna create the
    trial), so workers joining late or together never exceed the total; a slot held by a
    trial whose worker died is freed when its heartbeat goes stale, and its parameters are
    queued again, under the same lock, to be taken by the next claim.
    """
    worker = Worker(session.store, session.url, session.tracker, index=index, stop=stop, callbacks=callbacks,
                    array=array)
    worker.add(session)
    name = session.study.study_name
    status, why = "FAILED", None
    try:
        while True:
            worker.stop.check()
            if worker.step([name]):
                continue
            if name in worker.ended:
                break
            time.sleep(WAIT_S)  # the rest is running elsewhere: wait for it
        status = "FINISHED"
    except BaseException as e:
        status, why = stopped_by(e)
        raise
    finally:
        worker.finish(status, why)  # the warnings stay in session.warnings


def _config_of(store: Any, name: str) -> str:
    try:
        return config_digest(store.get_study_user_attrs(store.get_study_id_from_name(name)).get(attrs.CONFIG))
    except Exception:  # gone, or unreadable: tried again when the queue next shows it
        return ""


_DONE: Any = object()
_CANCELLED: Any = object()


def _cancelled(session: Session) -> dict[str, Any] | None:
    """The study's cancellation ({"at": …, "now": …}), read afresh, or None."""
    return session.store.get_study_user_attrs(session.study_id).get(attrs.CANCELLED)


def _claim(session: Session, count: int = 1) -> list[optuna.trial.Trial] | Any:
    """Up to ``count`` new trials of the study (none if every open slot is running
    elsewhere), or ``_DONE`` once the total is reached. Under the store lock: trials whose
    worker died are failed and queued again (unless the store was just unreachable: then no
    heartbeat could be written either, and their workers get a grace period to beat again),
    then the slots are counted and Optuna creates the trials (taking queued ones first).
    ``_CANCELLED`` for a cancelled study."""
    study = session.study
    with store_lock(session.url, session.store.retry) as lock:
        user_attrs = session.store.get_study_user_attrs(session.study_id)
        if user_attrs.get(attrs.CANCELLED) is not None:
            return _CANCELLED
        # Not while this worker meets an outage: its own calls wait it out, and the others'
        # heartbeats, held back by it, resume within an interval of the database's return
        # (and a trial is failed only at a second look: see _stale_trials).
        heartbeats = session.store.get_heartbeat_interval() is not None
        if heartbeats and session.store.retry.quiet_for(grace_period() + 2 * MAX_RETRY_DELAY_S):
            _fail_stale_trials(session)
        finished, running = counts(study)
        if finished >= session.target:
            return _DONE
        with warnings.catch_warnings():  # "heartbeats are meant for optimize": _Array beats itself
            warnings.simplefilter("ignore", UserWarning)
            trials = [study.ask() for _ in range(min(count, session.target - finished - running))]
        if not trials:
            return trials
        faults.point("claimed")
        if user_attrs.get(attrs.INTERRUPTED) is not None:  # its last worker closed the parent run: reopen it
            session.store.set_study_user_attr(session.study_id, attrs.INTERRUPTED, None)
            session.started = False
        if lock.held():
            return trials
    return [t for t in trials if _confirm_claim(session, t) is not None]


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


class _Array:
    """The trials of one study a worker trains at once (``training.fit_array``'s host): each
    trial's heartbeat from its claim until its MLflow record is sent, its end told to Optuna
    as soon as it leaves the array (this worker's own ask-and-tell, so that a failure on the
    way, a second signal included, never leaves a trial RUNNING), and its slot refilled with
    a new claim while the study has slots open. A trial stopped by a signal, a lost parent
    or ``cancel --now`` is queued again, as a lost worker's is."""

    def __init__(self, session: Session, objective: Objective, stop: StopFlag,
                 callbacks: Sequence[TrialCallback], refill: bool) -> None:
        self.session = session
        self.objective = objective
        self.stop = stop
        self.callbacks = callbacks
        self.refilling = refill
        self.open: dict[Member, Heartbeat] = {}  # joined, not yet told
        self.raised: BaseException | None = None  # the first stop a trial's end raised
        self.trial_stop: TrialStop | None = None

    def train(self, trials: Sequence[optuna.trial.Trial]) -> None:
        from lrsearch.fit.training import fit_array

        begun = 0
        try:
            with _watch_cancel(self.session) as cancelled:
                self.trial_stop = TrialStop(self.stop, cancelled)
                with self.session.store.sampling():
                    members = []
                    for trial in trials:
                        members += self._join(trial)
                        begun += 1
                with self.stop.interruptible():  # a second signal stops training at once
                    if members:  # none if another worker ended every one before it began
                        fit_array(self.session.cfg, self.session.data, members, self, self.trial_stop)
        except BaseException as e:
            for trial in trials[begun:]:  # claimed, never begun
                _fail_untold(self.session, trial, e)
            for member in list(self.open):
                self._leave(member, e)
            raise
        if self.raised is not None:
            raise self.raised

    def epoch_end(self, members: Sequence[Member]) -> None:
        """At each epoch boundary: the trials whose MLflow run was made since the last one
        link to it (one transaction for all of them)."""
        linked = {m.context.trial._trial_id: found for m in members if (found := self.objective.run_attrs(m))}
        if not linked:
            return
        with self.stop.shielded():
            try:
                self.session.store.set_trials_user_attrs(linked)
            except UpdateFinishedTrialError:  # one was ended elsewhere: the others one at a time
                for trial_id, values in linked.items():
                    with contextlib.suppress(UpdateFinishedTrialError):
                        self.session.store.set_trials_user_attrs({trial_id: values})

    def leave(self, member: Member) -> None:
        """A member ended (at an epoch boundary of the fit): its trial told now, whatever a
        second signal (it is raised once the trial is told, and queued again if it must be)."""
        with self.stop.shielded():
            self._leave(member)

    def refill(self, free: int) -> list[Member]:
        with self.stop.shielded():
            return self._refill(free)

    def _refill(self, free: int) -> list[Member]:
        if not self.refilling or self.stop.requested or self.trial_stop is None or self.trial_stop.requested:
            return []
        claimed = _claim(self.session, free)
        if claimed is _DONE or claimed is _CANCELLED:
            claimed = []
        if len(claimed) < free:
            self.refilling = False  # the study's open slots are taken: none will open for this array
        with self.session.store.sampling():
            return [member for trial in claimed for member in self._join(trial)]

    def _join(self, trial: optuna.trial.Trial) -> list[Member]:
        """The trial's member, as a list: none if another worker ended the trial first."""
        beat = Heartbeat(self.session.store, trial._trial_id).start()
        try:
            member = self.objective.begin(trial, recorded=beat.stop)
        except UpdateFinishedTrialError:  # this process paused past the grace period, say
            beat.stop()
            self.session.warnings.append(f"trial {trial.number} was ended by another worker before it began here")
            return []
        except BaseException:
            beat.stop()
            raise
        self.open[member] = beat
        return [member]

    def _leave(self, member: Member, error: BaseException | None = None) -> None:
        session, trial = self.session, member.context.trial
        beat = self.open.pop(member)
        value: float | None = None
        state: TrialState | None
        requeue = False
        assert self.trial_stop is not None
        try:
            try:
                value = self.objective.end(member, self.trial_stop, error)
                state = TrialState.FAIL if error is not None else TrialState.COMPLETE
                requeue = isinstance(error, (Interrupted, KeyboardInterrupt))
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Cancelled:  # `lrsearch cancel --now`: FAIL, and the worker goes on
                state, requeue = TrialState.FAIL, True
            except Interrupted as e:  # stopped at the epoch boundary: the others stop there too
                state, requeue = TrialState.FAIL, True
                self.raised = self.raised or e
            except TakenOver:  # ended elsewhere: the tell below reads it, and says so
                state = None
        except BaseException:
            beat.stop()
            raise
        if state != TrialState.COMPLETE:  # a failed trial's NaN is no value to tell
            value = None
        try:
            frozen = session.study.tell(trial, value, state=state, skip_if_finished=True)  # as stored
        except Exception as e:  # the sampler's after_trial, say: the trial must not stay RUNNING
            _fail_untold(session, trial, e)
            raise
        faults.point("told")
        if frozen.state != state:  # ended by another worker that found no heartbeat of it
            session.warnings.append(f"trial {trial.number} was marked {frozen.state.name} by another worker "
                                    f"while it ran here ({frozen.user_attrs.get(attrs.REASON, 'no heartbeat')})")
        elif requeue:
            _queue_again(session, frozen)
        if error is None:
            for callback in self.callbacks:
                callback(session.study, frozen)


def _queue_again(session: Session, trial: FrozenTrial) -> bool:
    """Queue a trial's parameters again (WAITING: the next claim takes it) unless it has
    been retried ``MAX_RETRIES`` times already; recorded as Optuna's
    ``RetryHeartbeatStaleTrialCallback`` records retries."""
    history = [*trial.system_attrs.get(attrs.RETRY_HISTORY, []), trial.number]
    if len(history) > MAX_RETRIES:
        return False
    session.study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={attrs.FAILED_TRIAL: history[0], attrs.RETRY_HISTORY: history}))
    return True


@contextlib.contextmanager
def _watch_cancel(session: Session) -> Iterator[threading.Event]:
    """An event set, on a thread that reads the study every ``CANCEL_POLL_S``, once the
    study is cancelled with ``--now``: the trial then stops at its next epoch boundary."""
    cancelled, done = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(CANCEL_POLL_S):
            try:
                cancel = _cancelled(session)
            except Exception:  # an outage: the trial meets it too
                continue
            if cancel is not None and cancel.get("now"):
                cancelled.set()
                return

    thread = threading.Thread(target=watch, name="lrsearch-cancel", daemon=True)
    thread.start()
    try:
        yield cancelled
    finally:
        done.set()
        thread.join()


def _fail_untold(session: Session, trial: optuna.trial.Trial, error: Exception) -> None:
    """Mark FAIL, with the reason, a trial that Optuna's tell could not end (unless the
    database itself is out of reach: then its heartbeat stops and a rerun fails it)."""
    try:
        session.store.fail_trial(trial._trial_id, {attrs.REASON: f"not told: {type(error).__name__}: "
                                                                f"{first_line(error)}"})
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
            run_id = run_id or tracker.trial_run(session.experiment_id, study.study_name, trial.number) or \
                tracker.start_trial(session.experiment_id, session.parent_run_id, study.study_name, trial.number,
                                    trial.user_attrs.get(attrs.HYPERPARAMETERS, trial.params))
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
