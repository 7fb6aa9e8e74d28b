"""A trial's MLflow records sent in the background, in order: the run made while the trial
trains, its metrics, artifacts and status sent once it ends.

Jobs are functions of the tracker (``fn(tracker, *args)``), so that they can run on a thread
of this process (:class:`ThreadRunner`, around a :class:`~lrsearch.track.tracking.Tracker`) or
in the tracking process (``process.py``), where MLflow's work does not share the training
thread's interpreter: every argument is plain data (numbers, text, bytes), never a closure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lrsearch.core import attrs, faults
from lrsearch.core.errors import first_line
from lrsearch.track.artifacts import artifact_dir
from lrsearch.track.records import History
from lrsearch.track.tracking import Tracker

if TYPE_CHECKING:
    from lrsearch.track.process import TrackerLike

# A drawing made where the record is sent: (function, its arguments, the file name); the
# function is called as fn(*args, path) and must be importable by name (it is pickled).
Drawing = tuple[Callable[..., Any], tuple[Any, ...], str]


class Runner(Protocol):
    """Where an outbox's jobs run: ``submit(fn, *args)`` runs ``fn(tracker, *args)`` after
    every job submitted before it (``first``: it may go ahead of those not yet begun)."""

    def submit(self, fn: Callable[..., Any], *args: Any, first: bool = False) -> Future[Any]: ...


class ThreadRunner:
    """Jobs on one background thread of this process, with ``tracker``."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, first: bool = False) -> Future[Any]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsearch-tracking")
        return self._executor.submit(fn, self.tracker, *args)


class Outbox:
    """Tracking jobs run in order in the background (``runner``), so a trial's records travel
    to MLflow while the next trial trains; ``drain`` waits for them all.

    At most ``limit`` jobs wait at a time (a submit past that waits for the oldest)."""

    def __init__(self, runner: Runner, limit: int = 2) -> None:
        self.runner = runner
        self.limit = limit
        self._pending: list[tuple[str, Future[Any]]] = []
        self._errors: list[str] = []

    def submit(self, label: str, fn: Callable[..., Any], *args: Any, first: bool = False) -> Future[Any]:
        """Run ``fn(tracker, *args)`` in the background; ``label`` names it in errors;
        ``first``: ahead of the jobs not yet begun, where the runner can (a trial's new run)."""
        while len(self._pending) >= self.limit:
            self._settle(*self._pending.pop(0))
        future = self.runner.submit(fn, *args, first=first)
        self._pending.append((label, future))
        return future

    def drain(self) -> list[str]:
        """Wait for every submitted job; one line per job that failed since the last drain."""
        while self._pending:
            self._settle(*self._pending.pop(0))
        errors, self._errors = self._errors, []
        return errors

    def _settle(self, label: str, future: Future[Any]) -> None:
        error = future.exception()  # waits
        if error is not None:
            self._errors.append(f"{label}: {first_line(error)}")


def outbox_for(tracker: TrackerLike) -> Outbox:
    """An outbox whose jobs run where ``tracker`` does: in the tracking process for its
    handle, else on a thread of this process."""
    return Outbox(ThreadRunner(tracker)) if isinstance(tracker, Tracker) else tracker.outbox()


@dataclass
class TrialRecord:
    """A trial's MLflow run, opened in the background as the trial starts training and
    closed in the background after it ends, in order with the other trials' records.

    Tolerant of a tracking store that stops answering: the trial trains and is stored in
    Optuna regardless, with the error in its ``tracking_error`` attribute (``attrs()``).
    """

    number: int
    _opened: Future[Any] | None = field(default=None, repr=False)

    def start(
        self,
        outbox: Outbox,
        experiment_id: str,
        parent_run_id: str,
        study: str,
        params: dict[str, Any],
        inputs: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Create the run and log its params and datasets while the trial trains."""
        self._opened = outbox.submit(
            f"trial {self.number}",
            open_trial_run,
            experiment_id,
            parent_run_id,
            study,
            self.number,
            params,
            list(inputs),
            first=True,
        )

    def opened(self, wait: bool = True) -> tuple[str | None, str | None]:
        """(the run's id, what went wrong) once the run is made; (None, None) while it is not
        yet (``wait=False``) or was never asked for."""
        if self._opened is None or (not wait and not self._opened.done()):
            return None, None
        error = self._opened.exception()  # waits
        if error is not None:
            return None, f"MLflow tracking lost: {first_line(error)}"
        return self._opened.result()

    def attrs(self) -> dict[str, Any]:
        """The trial attributes its record gives: the run's id, or why the record is incomplete."""
        run_id, error = self.opened()
        return {**({attrs.MLFLOW_RUN: run_id} if run_id else {}), **({attrs.TRACKING_ERROR: error} if error else {})}

    def finish(
        self,
        outbox: Outbox,
        files: Mapping[str, bytes],
        drawings: Sequence[Drawing],
        history: History,
        state: str,
        reason: str | None,
        status: str | None = None,
        *,
        note: str | None = None,
        objective: tuple[float, str] | None = None,
        then: Callable[[], None] = lambda: None,
    ) -> None:
        """Close the run in the background (once it is open) with the trial's metric
        ``history``, its artifacts (``files``: name -> bytes, and ``drawings``), state and
        description; ``then()`` runs once the record is sent, or has failed (the trial's
        heartbeat stops)."""
        run_id, _ = self.opened()
        if run_id is None:
            then()
            return
        sent = outbox.submit(
            f"trial {self.number}",
            send_trial_record,
            run_id,
            dict(files),
            list(drawings),
            _plain(history),
            state,
            reason,
            status,
            note,
            objective,
        )
        sent.add_done_callback(lambda _: then())


def open_trial_run(
    tracker: Tracker,
    experiment_id: str,
    parent_run_id: str,
    study: str,
    number: int,
    params: dict[str, Any],
    inputs: list[Mapping[str, Any]],
) -> tuple[str, str | None]:
    """The trial's run made, with its params and datasets: (its id, why its datasets are
    missing, if they are). A run that cannot be made raises: nothing more is sent for it."""
    run_id = tracker.start_trial(experiment_id, parent_run_id, study, number, params)
    faults.point("run-created")
    try:
        tracker.log_data(run_id, inputs)
    except Exception as e:  # a description of the run: its loss is said, the record goes on
        return run_id, f"datasets not recorded: {first_line(e)}"
    return run_id, None


def send_trial_record(
    tracker: Tracker,
    run_id: str,
    files: dict[str, bytes],
    drawings: list[Drawing],
    history: History,
    state: str,
    reason: str | None,
    status: str | None,
    note: str | None,
    objective: tuple[float, str] | None,
) -> None:
    faults.point("record")
    with artifact_dir() as tmp:
        folder = Path(tmp)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        for draw, args, name in drawings:
            draw(*args, folder / name)
        tracker.finish_trial(
            run_id, history, state, reason=reason, artifacts=folder, status=status, note=note, objective=objective
        )


def json_bytes(obj: Any) -> bytes:
    """``obj`` as an artifact's JSON text (sorted keys, indented: readable in MLflow's artifact view)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _plain(history: History) -> dict[str, list[tuple[int, float, int]]]:
    """A copy of ``history`` in plain lists (the logger's keeps growing while the array trains)."""
    return {key: list(points) for key, points in history.items()}
