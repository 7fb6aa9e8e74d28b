"""A trial array's host: the trials of one study a worker trains at once, in one fit
(``training.fit_array``'s ``ArrayHost``): at each epoch boundary their runs linked, the
trials that ended told to Optuna together, their slots refilled with new claims; a
``cancel --now`` watched for while they train."""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from lrsearch.core import faults
from lrsearch.core.errors import LrsearchError
from lrsearch.core.stopping import Interrupted, StopFlag, TrialStop
from lrsearch.fit.member import Member
from lrsearch.service.claims import _CANCELLED, _DONE, _cancelled, _claim, _fail_untold, _queue_again
from lrsearch.service.ending import Ending
from lrsearch.service.objective import Objective
from lrsearch.service.session import Session
from lrsearch.store.heartbeat import Heartbeats

CANCEL_POLL_S = 1.0  # how often a running trial's worker looks for `lrsearch cancel --now`
TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


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
        accelerator: str | None = None,
    ) -> None:
        self.session = session
        self.id = uuid.uuid4().hex[:12]  # its trials' array_id: which trials trained in this one fit
        self.target = target  # how many trials to train at once from now on
        self.accelerator = accelerator  # Lightning's, as the worker was told (None: the study's, as fit_array reads it)
        self.device: str | None = None  # the device it picked, once the fit has started
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
                        module = fit_array(
                            self.session.cfg,
                            self.session.data,
                            members,
                            self,
                            self.trial_stop,
                            accelerator=self.accelerator,
                        )
                        if module is not None and module.trained_on is not None:
                            self.device = str(module.trained_on)
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
                    member = self.objective.begin(
                        trial, recorded=functools.partial(self.beats.release, trial_id), array=self.id
                    )
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


def _frozen(ending: Ending) -> FrozenTrial:
    """The trial as its end stored it (``study.tell`` returns as much)."""
    import datetime

    frozen = copy.copy(ending.trial._cached_frozen_trial)
    state, values = ending.told()
    frozen.state, frozen.values = state, values
    frozen.user_attrs = {**frozen.user_attrs, **ending.attrs}
    frozen.datetime_complete = datetime.datetime.now()
    return frozen


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
