"""Running a study from this host: this process is a worker, and ``workers - 1`` more
``lrsearch worker`` processes are started first, so they all import torch and Lightning at
once. Whichever of them ends last closes the study's parent run, as the study stands.

Light on purpose: nothing heavy is imported before the other workers have started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core.errors import LrsearchError
from lrsearch.core.stopping import PARENT_FD_ENV, PARENT_PID_ENV, StopFlag
from lrsearch.core.study_record import StudyRecord
from lrsearch.core.text import count
from lrsearch.store.urls import STORAGE_ENV, TRACKING_ENV, storage_url, tracking_uri

if TYPE_CHECKING:
    import optuna

    from lrsearch.config import Config
    from lrsearch.service.session import ArrayUse
    from lrsearch.track.process import TrackingProcess

# A worker process that run_study starts tells it its warnings and its error, if it fails,
# as JSON lines on a pipe of its own whose write end it finds here; its stderr is not read.
RESULTS_FD_ENV = "LRSEARCH_RESULTS_FD"


def tell_parent(kind: str, text: str) -> None:
    """In a worker process that ``run_study`` started, pass one of its ``"warning"`` lines,
    or its ``"error"``, to that process, which shows them; elsewhere, nothing."""
    fd = os.environ.get(RESULTS_FD_ENV)
    if not fd:
        return
    try:
        os.write(int(fd), (json.dumps({kind: text}) + "\n").encode())
    except (OSError, ValueError):  # the parent is gone: nobody to tell
        pass


@dataclass
class StudyRun:
    """A study after ``run_study``: where its records are and how to find them."""

    study: optuna.Study
    target: int
    experiment_id: str
    parent_run_id: str
    url: str
    warnings: list[str]
    errors: list[str] = field(default_factory=list)  # other worker processes that failed
    cancelled: bool = False  # by `lrsearch cancel` while it ran
    tracker: TrackingProcess | None = None  # the MLflow client it used (the caller's, if it gave one)
    arrays: ArrayUse | None = None  # how this process trained its trials together


def run_study(
    cfg: Config,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    study_file: Path | None = None,
    workers: int = 1,
    callbacks: Sequence[Callable[..., Any]] = (),
    on_start: Callable[[int, int], None] | None = None,
    stop: StopFlag | None = None,
    worker: int = 0,
    array: int | str | None = None,
    accelerator: str | None = None,
    tracker: TrackingProcess | None = None,
) -> StudyRun:
    """Create or resume the study ``cfg`` describes and run trials until its total is reached,
    here and in ``workers - 1`` other processes (which need ``study_file``).

    ``on_start(target, finished)`` is called once the study is open; ``callbacks`` after
    each trial run here, as ``study.optimize`` calls them. Signals ``stop`` receives are
    passed on to the other processes. ``array`` and ``accelerator`` override ``[train]``'s in every worker.
    ``tracker``: this worker's MLflow client, the caller's to close (default: a tracking
    process of its own, started first so that its imports overlap this process's, and
    closed before returning).
    """
    from lrsearch.track.process import TrackingProcess

    stop = stop or StopFlag()
    others, alive = (
        _start_workers(cfg, study_file, workers - 1, storage, tracking, array, accelerator) if workers > 1 else ([], -1)
    )
    if others:
        stop.on_signal = lambda signum: _signal(others, signum)
    own = tracker is None
    tracker = tracker or TrackingProcess(tracking_uri(tracking), worker)
    from lrsearch.core.stopping import stopped_by

    session = None
    status, why = "FAILED", None
    try:
        from lrsearch.service.queue import submit

        submitted = submit(cfg, storage=storage, tracking=tracking)  # the input checked, the study made
        tracker.open()  # MLflow's store opened (or made) there while this process imports torch and Lightning
        from lrsearch.results.ranking import count_finished, tracking_warnings
        from lrsearch.service.session import close_parent, open_session
        from lrsearch.service.worker import work
        from lrsearch.service.worker_process import setup_process

        setup_process()
        session = open_session(
            cfg,
            storage=storage,
            tracking=tracking,
            study_file=study_file,
            worker=worker,
            tracker=tracker,
            submitted=submitted,
            accelerator=accelerator,
        )
        if on_start is not None:
            on_start(session.target, count_finished(session.study))
        work(session, stop=stop, callbacks=callbacks, index=worker, array=array, accelerator=accelerator)
        status = "FINISHED"
    except BaseException as e:
        if session is None:  # the study never opened here (bad data, unreachable store): nor there
            _signal(others, signal.SIGTERM)
        status, why = stopped_by(e)
        raise
    finally:
        for w in others:  # their last trials, or their own interruption
            w.wait()
        if session is not None and others:  # work() closed it for this worker; the last closes it
            close_parent(session, status, why)
        if alive >= 0:
            os.close(alive)  # the others' pipe: end of file
        if own:
            tracker.close()
    failed = [w.error for w in others if w.proc.returncode != 0]
    cancelled = StudyRecord.from_attrs(session.store.get_study_user_attrs(session.study_id)).cancelled is not None
    return StudyRun(
        session.study,
        session.target,
        session.experiment_id,
        session.parent_run_id,
        session.mlflow_url,
        session.warnings + tracking_warnings(session.study) + [x for w in others for x in w.warnings],
        [f"{len(failed)} of {count(len(others), 'other worker')} failed ({failed[0]})"] if failed else [],
        cancelled,
        None if own else tracker,
        session.arrays,
    )


class _WorkerProcess:
    """A worker process started by ``run_study``, its results pipe read on a thread: its
    warnings are shown by this process, and its error, if it fails, named in this process's."""

    def __init__(self, proc: subprocess.Popen[bytes], index: int, results: int) -> None:
        self.proc = proc
        self.index = index
        self.results: list[dict[str, str]] = []
        self._reader = threading.Thread(target=self._read, args=(results,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                try:
                    self.results.append(json.loads(line))
                except ValueError:  # cut short by the worker's death
                    pass

    def wait(self) -> None:
        self.proc.wait()
        self._reader.join()

    @property
    def warnings(self) -> list[str]:
        return [f"worker {self.index}: {r['warning']}" for r in self.results if "warning" in r]

    @property
    def error(self) -> str:
        errors = [r["error"] for r in self.results if "error" in r]
        return f"worker {self.index}: " + (errors[-1] if errors else f"exit code {self.proc.returncode}")


def _start_workers(
    cfg: Config,
    study_file: Path | None,
    count: int,
    storage: str | None,
    tracking: str | None,
    array: int | str | None,
    accelerator: str | None = None,
) -> tuple[list[_WorkerProcess], int]:
    """``count`` ``lrsearch worker`` processes on this study, and the write end of a pipe
    whose end of file tells them that this process died (kept here, not inherited, until
    closed). They get the store URLs through their environment, never their command lines
    (which every local user can read)."""
    if study_file is None:
        raise LrsearchError("other worker processes need the study file")
    command = [
        sys.executable,
        "-m",
        "lrsearch.cli",
        "worker",
        str(study_file),
        "--name",
        cfg.study.name,
        "--epochs",
        str(cfg.train.epochs),
        "--quiet",  # run prints the study's summary (its output goes nowhere)
    ]
    if cfg.study.trials is not None:
        command += ["--trials", str(cfg.study.trials)]
    if array is not None:
        command += ["--array", str(array)]
    if accelerator is not None:
        command += ["--accelerator", accelerator]
    read_end, alive = os.pipe()
    env = {
        **os.environ,
        STORAGE_ENV: storage_url(storage),
        TRACKING_ENV: tracking_uri(tracking),
        PARENT_FD_ENV: str(read_end),
        PARENT_PID_ENV: str(os.getpid()),
    }
    started: list[_WorkerProcess] = []
    try:
        for i in range(1, count + 1):
            results, told = os.pipe()
            try:
                # Own sessions: a Ctrl-C reaches this process only, which passes it on.
                proc = subprocess.Popen(
                    [*command, "--worker-index", str(i)],
                    start_new_session=True,
                    env={**env, RESULTS_FD_ENV: str(told)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(read_end, told),
                )
            except BaseException:
                os.close(results)
                raise
            finally:
                os.close(told)  # the worker's own: end of file here when it exits
            started.append(_WorkerProcess(proc, i, results))
        return started, alive
    except BaseException:
        _signal(started, signal.SIGTERM)
        os.close(alive)
        raise
    finally:
        os.close(read_end)


def _signal(others: Sequence[_WorkerProcess], signum: int) -> None:
    for w in others:
        if w.proc.poll() is None:
            w.proc.send_signal(signum)
