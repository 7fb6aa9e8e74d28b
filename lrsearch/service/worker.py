"""The worker loop: claim a trial slot, train the trial, tell Optuna, until the study's
total is reached; trials whose worker died are failed and queued again on the way."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from lrsearch.core import faults
from lrsearch.core.errors import LrsearchError, first_line
from lrsearch.core.stopping import StopFlag, stopped_by
from lrsearch.core.study_record import StudyRecord
from lrsearch.core.text import count, fmt
from lrsearch.service.array_host import TrialCallback, _Array
from lrsearch.service.claims import _CANCELLED, _DONE, _cancelled, _claim, _released_on_error
from lrsearch.service.objective import Objective
from lrsearch.service.queue import config_digest, queue
from lrsearch.service.session import ArrayUse, Session, close_parent, join, mark_unrunnable, start_parent
from lrsearch.store.heartbeat import Heartbeats
from lrsearch.store.lock import close_connections
from lrsearch.store.storage import checkpoint, open_storage
from lrsearch.store.urls import storage_url, tracking_uri
from lrsearch.track.tracking import Tracker

if TYPE_CHECKING:
    from lrsearch.store.retrying_storage import RetryingStorage
    from lrsearch.track.process import TrackerLike, TrackingProcess

WAIT_S = 0.25  # how soon a worker with nothing to claim looks again (a few reads) ...
MAX_WAIT_S = 0.5  # ... backing off to this while it stays idle


class Worker:
    """One worker's warm state: its storage, its tracker, and a session on each study it has
    served (sampler, data, MLflow records), kept between trials and between studies.

    Trials are claimed round robin across the studies it is given (the caller orders them:
    priority, then the oldest submission), one array of trials at a time (``_Array``).
    """

    def __init__(
        self,
        store: RetryingStorage,
        url: str,
        tracker: TrackerLike,
        *,
        index: int = 0,
        stop: StopFlag | None = None,
        callbacks: Sequence[TrialCallback] = (),
        warn: Callable[[str], None] | None = None,
        say: Callable[[str], None] | None = None,
        array: int | str | None = None,
        accelerator: str | None = None,
    ) -> None:
        self.store = store
        self.url = url
        self.tracker = tracker
        self.index = index
        self.stop = stop or StopFlag()
        self.callbacks = [*callbacks, self._count]
        self.warn = warn or (lambda line: None)
        self.say = say  # what it takes up and leaves, for the person watching it (None: nobody is)
        self.ran: dict[str, Counter[str]] = {}  # the trials it trained of each study, by how they ended
        self.served: list[Session] = []  # the studies it trained trials of, in the order it took them up
        self.sessions: dict[str, tuple[Session, Objective]] = {}
        self.ended: dict[str, str] = {}  # studies that ended while served here: name -> "done" or "cancelled"
        # Studies this worker cannot run (a configuration this version cannot read, a CSV
        # file this host lacks), by the stored configuration it failed on: a corrected
        # resubmission is tried again.
        self.broken: dict[str, str] = {}
        self.warnings: list[str] = []  # of the studies it has let go
        self.array = array  # trials trained at once: "auto", a size, or None (each study's [train] array)
        self.accelerator = accelerator  # Lightning's, or None (each study's [train] accelerator)
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
            if name not in self.ran:
                self.ran[name] = Counter()
                self.served.append(session)
                if self.say is not None:
                    self.say(
                        f"study {name!r} taken up: {session.finished} of {count(session.target, 'trial')} "
                        f"finished; {count(len(claimed), 'trial')} at a time here"
                    )
            if not session.started:
                with _released_on_error(session, claimed):
                    start_parent(session, objective.records)
                    objective.records.submit(
                        "the study's array size",
                        Tracker.set_tags,
                        session.parent_run_id,
                        {"array": self._wanted(session), "array.size": size, "accelerator": self._accelerator(session)},
                    )
            # An array's trials end (and start) together: their MLflow records, two jobs each,
            # wait for the tracking thread instead of holding up the array.
            objective.records.limit = max(objective.records.limit, 2 * size)
            # Its slots are refilled as its trials end only where it is the only study served:
            # several studies take turns, an array each.
            array = _Array(
                session,
                objective,
                self.stop,
                self.callbacks,
                refill=len(names) == 1,
                beats=self.beats,
                target=target,
                accelerator=self._accelerator(session),
            )
            if session.arrays is None:
                session.arrays = ArrayUse(self._wanted(session), size, len(claimed), len(claimed))
            session.arrays.saw(len(claimed))
            array.train(claimed)
            if array.device is not None and session.arrays.device is None:
                session.arrays.device = array.device
                objective.records.submit(
                    "the study's device", Tracker.set_tags, session.parent_run_id, {"device": array.device}
                )
            if _cancelled(session) is not None:
                self._end(session, "cancelled")
            return True
        return False

    def _wanted(self, session: Session) -> int | str:
        if session.cfg.population:  # a population trains as one array, whatever --array says
            return session.cfg.pbt.population
        return self.array if self.array is not None else session.cfg.train.array

    def _accelerator(self, session: Session) -> str:
        return self.accelerator if self.accelerator is not None else session.cfg.train.accelerator

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
                choose_array_size(session.cfg, session.data, session.target, self._accelerator(session))
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
            self._left(session, ended or ("left" if status == "FINISHED" else "stopped"))
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
                session = join(
                    name, self.store, self.url, self.tracker, worker=self.index, accelerator=self.accelerator
                )
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
        self._left(session, how)
        self.warnings += session.warnings

    def _count(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran[study.study_name][trial.state.name] += 1

    def _left(self, session: Session, how: str) -> None:
        """One line as this worker lets a study go (``how``: done, cancelled, left to the
        other workers, stopped): the trials it trained of it, and the study's best so far."""
        from lrsearch.results.ranking import best_trials, state_text

        ran = self.ran.get(session.study.study_name)
        if ran is None or self.say is None:  # joined, never trained here; or nobody to tell (a read saved)
            return
        best = best_trials(session.study, 1)
        shown = f"; best {session.cfg.study.metric} {fmt(best[0]['value'])} (trial {best[0]['number']})" if best else ""
        self.say(
            f"study {session.study.study_name!r} {how}: {count(sum(ran.values()), 'trial')} trained here"
            f"{f' ({state_text(ran)})' if ran else ''}{shown}"
        )


@dataclass
class Served:
    """What a worker did: the studies it trained trials of, in the order it took them up,
    and the warnings of every study it served."""

    sessions: list[Session]
    warnings: list[str]


def serve(
    storage: str | None = None,
    tracking: str | None = None,
    *,
    index: int = 0,
    stop: StopFlag | None = None,
    callbacks: Sequence[TrialCallback] = (),
    max_idle: float | None = None,
    warn: Callable[[str], None] | None = None,
    say: Callable[[str], None] | None = None,
    array: int | str | None = None,
    accelerator: str | None = None,
    tracker: TrackingProcess | None = None,
) -> Served:
    """Serve every study submitted to ``storage`` until stopped, or ``max_idle`` seconds
    pass with nothing to do. Polls while idle, backing off to ``MAX_WAIT_S``. ``say`` hears
    a line as it takes up a study and as it lets one go. ``tracker``: its MLflow client
    (default: a tracking process of its own, closed at the end)."""
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
    worker = Worker(
        store,
        url,
        tracker,
        index=index,
        stop=stop,
        callbacks=callbacks,
        warn=warn,
        say=say,
        array=array,
        accelerator=accelerator,
    )
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
    return Served(worker.served, lines)


def work(
    session: Session,
    *,
    stop: StopFlag | None = None,
    callbacks: Sequence[TrialCallback] = (),
    index: int = 0,
    array: int | str | None = None,
    accelerator: str | None = None,
) -> None:
    """Run trials of this one study until its total of COMPLETE + PRUNED trials is reached
    (or it is cancelled), then close the parent run if this worker is the last.

    Each trial's slot is claimed under the store's lock (count, then let Optuna create the
    trial), so workers joining late or together never exceed the total; a slot held by a
    trial whose worker died is freed when its heartbeat goes stale, and its parameters are
    queued again, under the same lock, to be taken by the next claim.
    """
    worker = Worker(
        session.store,
        session.url,
        session.tracker,
        index=index,
        stop=stop,
        callbacks=callbacks,
        array=array,
        accelerator=accelerator,
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


def _config_of(store: RetryingStorage, name: str) -> str:
    try:
        user_attrs = store.get_study_user_attrs(store.get_study_id_from_name(name))
        return config_digest(StudyRecord.from_attrs(user_attrs).config)
    except Exception:  # gone, or unreadable: tried again when the queue next shows it
        return ""
