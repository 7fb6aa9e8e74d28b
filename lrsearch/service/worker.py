"""The worker loop: claim a trial slot, train the trial, tell Optuna, until the study's
total is reached; trials whose worker died are failed and queued again on the way."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from lrsearch.core import attrs, faults
from lrsearch.core.errors import LrsearchError, first_line
from lrsearch.core.stopping import Interrupted, StopFlag, TrialStop, stopped_by
from lrsearch.core.study_record import Cancellation, StudyRecord
from lrsearch.fit.member import Member
from lrsearch.results.ranking import FINISHED_STATES
from lrsearch.service.objective import Objective
from lrsearch.service.queue import config_digest, queue
from lrsearch.service.session import ArrayUse, Session, close_parent, join, mark_unrunnable, start_parent
from lrsearch.store.heartbeat import Heartbeats, grace_period
from lrsearch.store.lock import close_connections, store_lock
from lrsearch.store.retry import MAX_RETRY_DELAY_S
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

    def __init__(
        self,
        store: Any,
        url: str,
        tracker: Tracker,
        *,
        index: int = 0,
        stop: StopFlag | None = None,
        callbacks: Sequence[TrialCallback] = (),
        warn: Callable[[str], None] | None = None,
        array: int | str | None = None,
    ) -> None:
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
        self.beats = Heartbeats(store)  # of the trials it holds, in one statement
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
            target = functools.partial(self._target, session, size)
            claimed = _claim(session, target())
            if claimed is _DONE or claimed is _CANCELLED:
                self._end(session, "done" if claimed is _DONE else "cancelled")
                continue
            if not claimed:  # its open slots run elsewhere
                continue
            self._last = name
            if not session.started:
                with _released_on_error(session, claimed):
                    start_parent(session, objective.records)
                    objective.records.submit(
                        "the study's array size",
                        Tracker.set_tags,
                        session.parent_run_id,
                        {"array": self._wanted(session), "array.size": size},
                    )
            # An array's trials end (and start) together: their MLflow records, two jobs each,
            # wait for the tracking thread instead of holding up the array.
            objective.records.limit = max(objective.records.limit, 2 * size)
            # Its slots are refilled as its trials end only where it is the only study served:
            # several studies take turns, an array each.
            array = _Array(
                session, objective, self.stop, self.callbacks, refill=len(names) == 1, beats=self.beats, target=target
            )
            if session.arrays is None:
                session.arrays = ArrayUse(self._wanted(session), size, len(claimed), len(claimed))
            session.arrays.saw(len(claimed))
            array.train(claimed)
            if _cancelled(session) is not None:
                self._end(session, "cancelled")
            return True
        return False

    def _wanted(self, session: Session) -> int | str:
        if session.cfg.population:  # a population trains as one array, whatever --array says
            return session.cfg.pbt.population
        return self.array if self.array is not None else session.cfg.train.array

    def _target(self, session: Session, size: int) -> int:
        """The array's size now: ``size`` as asked for; with ``auto``, for a sampler that
        learns from finished trials, what the study's progress allows (``array_target``)."""
        from lrsearch.choices.sampling import array_target

        if self._wanted(session) != "auto":
            return size
        return array_target(session.cfg.study.sampler, size, session.finished)

    def _array_size(self, session: Session) -> int:
        """Trials of the study to train at once: the size asked for (capped by memory), or
        the fastest per trial, timed on this worker (``auto``)."""
        from lrsearch.fit.training import choose_array_size, largest_array

        name = session.study.study_name
        if name not in self.sizes:
            wanted = self._wanted(session)
            self.sizes[name] = (
                choose_array_size(session.cfg, session.data, session.target)
                if wanted == "auto"
                else min(int(wanted), largest_array(session.cfg, session.data))
            )
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
        self.beats.stop()
        for url in (self.url, self.tracker.uri):
            checkpoint(url)
        self.store.close()  # idle connections: what follows (summary, report) opens what it needs
        close_connections()
        return lines

    def _objective(self, session: Session) -> Objective:
        return Objective(
            session.cfg, session.data, session.tracker, session.experiment_id, session.parent_run_id, self.stop
        )

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
        if how == "done" and not StudyRecord.from_attrs(session.study.user_attrs).done:
            session.store.set_study_user_attrs(session.study_id, StudyRecord.to_attrs(done=True))
        self.warnings += session.warnings


def serve(
    storage: str | None = None,
    tracking: str | None = None,
    *,
    index: int = 0,
    stop: StopFlag | None = None,
    callbacks: Sequence[TrialCallback] = (),
    max_idle: float | None = None,
    warn: Callable[[str], None] | None = None,
    array: int | str | None = None,
    tracker: Any = None,
) -> list[str]:
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


def work(
    session: Session,
    *,
    stop: StopFlag | None = None,
    callbacks: Sequence[TrialCallback] = (),
    index: int = 0,
    array: int | str | None = None,
) -> None:
    """Run trials of this one study until its total of COMPLETE + PRUNED trials is reached
    (or it is cancelled), then close the parent run if this worker is the last.

    Each trial's slot is claimed under the store's lock (count, then let Optuna create the
    trial), so workers joining late or together never exceed the total; a slot held by a
    trial whose worker died is freed when its heartbeat goes stale, and its parameters are
    queued again, under the same lock, to be taken by the next claim.
    """
    worker = Worker(
        session.store, session.url, session.tracker, index=index, stop=stop, callbacks=callbacks, array=array
    )
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
        user_attrs = store.get_study_user_attrs(store.get_study_id_from_name(name))
        return config_digest(StudyRecord.from_attrs(user_attrs).config)
    except Exception:  # gone, or unreadable: tried again when the queue next shows it
        return ""


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


class _Array:
    """The trials of one study a worker trains at once (``training.fit_array``'s host). At
    each epoch boundary, in as few transactions as the store allows: the trials whose MLflow
    run was made since link to it; the trials that ended are told to Optuna together (this
    worker's own ask-and-tell, so that a failure on the way, a second signal included, never
    leaves a trial RUNNING); and their slots are refilled with new claims while the study has
    slots open, sampled together and stored in one transaction. A trial holds its heartbeat
    from its claim until its MLflow record is sent. A trial stopped by a signal, a lost parent
    or ``cancel --now`` is queued again, as a lost worker's is."""

    def __init__(
        self,
        session: Session,
        objective: Objective,
        stop: StopFlag,
        callbacks: Sequence[TrialCallback],
        refill: bool,
        beats: Heartbeats,
        target: Callable[[], int] = lambda: 1,
    ) -> None:
        self.session = session
        self.target = target  # how many trials to train at once from now on
        self.objective = objective
        self.stop = stop
        self.callbacks = callbacks
        self.refilling = refill
        self.beats = beats
        self.open: set[Member] = set()  # joined, not yet told
        self.raised: BaseException | None = None  # the first stop a trial's end raised
        self.trial_stop: TrialStop | None = None

    def train(self, trials: Sequence[int]) -> None:
        """Train the claimed ``trials`` (ids) and the trials claimed as they end."""
        from lrsearch.fit.training import fit_array

        joining: list[int] = list(trials)
        try:
            with _watch_cancel(self.session) as cancelled:
                self.trial_stop = TrialStop(self.stop, cancelled)
                members = self._join(joining)
                joining = []
                faults.point("joined")
                with self.stop.interruptible():  # a second signal stops training at once
                    if members:  # none if another worker ended every one before it began
                        fit_array(self.session.cfg, self.session.data, members, self, self.trial_stop)
                faults.point("trained")
                if self.open:  # the fit ended before they left it: Lightning's own SIGTERM handler ends it mid-epoch
                    with self.stop.shielded():
                        self._end(
                            list(self.open),
                            None if self.stop.requested else LrsearchError("the fit ended before its trials did"),
                        )
        except BaseException as e:
            for trial_id in joining:  # claimed, never begun
                _fail_untold(self.session, trial_id, e)
            self._end(list(self.open), e)
            raise
        if self.raised is not None:
            raise self.raised

    def boundary(self, members: Sequence[Member], leaving: Sequence[Member], refill: bool) -> list[Member]:
        """At an epoch boundary of the fit: link new runs, tell the trials that ended (whatever
        a second signal: it is raised once they are told), and claim new ones up to the
        array's size (if ``refill``)."""
        with self.stop.shielded():
            faults.point("boundary")
            self._link(members)
            self._end(leaving)
            joined = self._refill(max(0, self.target() - (len(members) - len(leaving))) if refill else 0)
            if joined:
                faults.point("refilled")
                if self.session.arrays is not None:
                    self.session.arrays.saw(len(members) - len(leaving) + len(joined))
            return joined

    def _link(self, members: Sequence[Member]) -> None:
        """The trials whose MLflow run was made since the last boundary link to it (one transaction)."""
        linked = {m.context.trial._trial_id: found for m in members if (found := self.objective.run_attrs(m))}
        if not linked:
            return
        try:
            self.session.store.set_trials_user_attrs(linked)
        except UpdateFinishedTrialError:  # one was ended elsewhere: the others one at a time
            for trial_id, values in linked.items():
                with contextlib.suppress(UpdateFinishedTrialError):
                    self.session.store.set_trials_user_attrs({trial_id: values})

    def _refill(self, free: int) -> list[Member]:
        if (
            not free
            or not self.refilling
            or self.stop.requested
            or self.trial_stop is None
            or self.trial_stop.requested
        ):
            return []
        claimed = _claim(self.session, free)
        if claimed is _DONE or claimed is _CANCELLED:
            claimed = []
        if len(claimed) < free:
            self.refilling = False  # the study's open slots are taken: none will open for this array
        return self._join(claimed)

    def _join(self, ids: Sequence[int]) -> list[Member]:
        """The claimed trials' members, their parameters sampled on one read of the study and
        stored in one transaction; none for a trial another worker ended first (this process
        paused past the grace period, say)."""
        members: list[Member] = []
        assert self.trial_stop is not None
        try:
            with self.session.store.sampling(self.session.study_id, ids) as ended:
                for trial_id in ids:
                    # What study.ask does: the sampler's cache of the study's trials (TPE's, QMC's)
                    # read again for each trial, here from the window's copy.
                    self.session.study._thread_local.cached_all_trials = None
                    trial = optuna.Trial(self.session.study, trial_id)
                    member = self.objective.begin(trial, recorded=functools.partial(self.beats.release, trial_id))
                    self.beats.hold(trial_id)
                    members.append(member)
        except BaseException as e:
            self.open.update(members)  # sampled, never trained: ended FAIL with their runs
            self._end(members, e)
            for trial_id in ids[len(members) :]:
                _fail_untold(self.session, trial_id, e)
            raise
        for member in [m for m in members if m.context.trial._trial_id in ended]:
            # Ended by another worker before it began here (this process paused past the grace period, say).
            self.objective.record(self.objective.taken(self.objective.ending(member, self.trial_stop)))
            self.session.warnings.append(
                f"trial {member.context.trial.number} was ended by another worker before it began here"
            )
            members.remove(member)
        self.open.update(members)
        return members

    def _end(self, members: Sequence[Member], error: BaseException | None = None) -> None:
        """Tell Optuna how each of ``members`` ended, all in one transaction (after ``error``,
        out of the fit: FAIL), and hand their MLflow records over; then queue again the ones
        that must be, and call the callbacks."""
        members = [m for m in members if m in self.open]
        if not members:
            return
        assert self.trial_stop is not None
        session = self.session
        endings = [self.objective.ending(m, self.trial_stop, error) for m in members]
        told = {e.trial._trial_id: (*e.told(), e.attrs) for e in endings}
        try:
            for e in endings:  # as study.tell does, before it stores the state
                state, values = told[e.trial._trial_id][:2]
                session.study.sampler.after_trial(session.study, e.trial._cached_frozen_trial, state, values)
            taken = session.store.end_trials(told)
        except BaseException as e:  # the trials must not stay RUNNING, nor their runs
            for ending in endings:
                _fail_untold(session, ending.trial._trial_id, e)
                self.open.discard(ending.member)
                self.objective.record(ending)
            raise
        for ending in endings:  # all stored: none is ended again, whatever fails below
            self.open.discard(ending.member)
        first: BaseException | None = None  # raised once every trial's end is handed on
        for ending in endings:
            session.finished += ending.state in ("COMPLETE", "PRUNED") and ending.trial._trial_id not in taken
            if ending.trial._trial_id in taken:  # ended by another worker that found no heartbeat of it
                ending = self.objective.taken(ending)
                session.warnings.append(
                    f"trial {ending.trial.number} was marked FAIL by another worker while it "
                    f"ran here ({ending.taken.reason if ending.taken else 'no heartbeat'})"
                )
            try:
                self.objective.record(ending)
            except BaseException as e:  # the tracking process gone, say: the others' records still go
                first = first or e
        faults.point("told")
        for ending in endings:
            frozen = _frozen(ending)
            try:
                if ending.taken is None and ending.requeue:
                    _queue_again(session, frozen)
                if isinstance(ending.raises, Interrupted):  # stopped at the epoch boundary: the others stop too
                    self.raised = self.raised or ending.raises
                if error is None and ending.taken is None:
                    for callback in self.callbacks:
                        callback(session.study, frozen)
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first


def _frozen(ending: Any) -> FrozenTrial:
    """The trial as its end stored it (``study.tell`` returns as much)."""
    import datetime

    frozen = copy.copy(ending.trial._cached_frozen_trial)
    state, values = ending.told()
    frozen.state, frozen.values = state, values
    frozen.user_attrs = {**frozen.user_attrs, **ending.attrs}
    frozen.datetime_complete = datetime.datetime.now()
    return frozen


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
            if cancel is not None and cancel.now:
                cancelled.set()
                return

    thread = threading.Thread(target=watch, name="lrsearch-cancel", daemon=True)
    thread.start()
    try:
        yield cancelled
    finally:
        done.set()
        thread.join()


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
