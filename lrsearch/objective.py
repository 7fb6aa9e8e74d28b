"""The objective: a trial's params, a trained model, a metric, and the MLflow run that records it."""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from lrsearch.config import Config
from lrsearch.data import Dataset
from lrsearch.errors import first_line
from lrsearch.report import plot_learning_curves
from lrsearch.space import sample_params
from lrsearch.stopping import Interrupted, StopFlag
from lrsearch.tracking import History, Outbox, Tracker, artifact_dir, write_json
from lrsearch.training import TrainResult, train

MLFLOW_RUN_ATTR = "mlflow_run_id"
HYPERPARAMETERS_ATTR = "hyperparameters"
REASON_ATTR = "reason"
TRACKING_ERROR_ATTR = "tracking_error"


@dataclass
class Objective:
    """Called once per trial, by the worker loop (``study.py``) or ``study.optimize``.

    A trial's MLflow calls run in the background: the run is created while the trial
    trains, and its metrics, artifacts and status are sent while the next trial trains.
    Call :meth:`drain` before reading them or ending the study.
    """

    cfg: Config
    data: Dataset
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    stop: StopFlag = field(default_factory=StopFlag)
    outbox: Outbox = field(default_factory=Outbox)

    def drain(self) -> list[str]:
        """Wait until every trial's MLflow record is written; one line per record that failed."""
        return [f"MLflow record lost for {error}" for error in self.outbox.drain()]

    def __call__(self, trial: optuna.trial.Trial) -> float:
        cfg = self.cfg
        hp = sample_params(trial, cfg.params, cfg.train.epochs)
        seed = trial_seed(cfg.study.seed, trial.number)
        trial.set_user_attr(HYPERPARAMETERS_ATTR, hp)
        run = _TrialRun(self.tracker, trial)
        run.start(self.outbox, self.experiment_id, self.parent_run_id, cfg.study.name,
                  {**hp, **_fixed_settings(cfg, seed)})
        result = TrainResult()
        started = time.perf_counter()
        try:
            with self.stop.interruptible():  # a second signal stops training at once
                train(cfg, self.data, hp, seed, trial, result, self.stop)
        except BaseException as e:
            # Record what was measured before the failure; the caller marks the trial FAIL.
            interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
            reason = "interrupted" if interrupted else f"{type(e).__name__}: {first_line(e)}"
            self._end(trial, run, hp, seed, result, "FAIL", reason, "KILLED" if interrupted else None)
            raise
        trial.set_user_attr("epochs_trained", result.epochs)
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 4))
        if self.stop.requested:
            self._end(trial, run, hp, seed, result, "FAIL", f"interrupted at epoch {result.epochs - 1}", "KILLED")
            raise Interrupted(self.stop.signum or 0)
        state, value, reason = outcome(result, cfg.study.metric)
        self._end(trial, run, hp, seed, result, state, reason)
        if state == "PRUNED":
            raise optuna.TrialPruned(reason)
        return value

    def _end(self, trial: optuna.trial.Trial, run: _TrialRun, hp: dict[str, Any], seed: int,
             result: TrainResult, state: str, reason: str | None, status: str | None = None) -> None:
        """Store why the trial ended (unless COMPLETE) and close its MLflow run (even if the
        reason could not be stored: the run must not stay RUNNING)."""
        try:
            if reason:
                trial.set_user_attr(REASON_ATTR, reason)
        finally:
            run.finish(self.outbox, self._artifacts(trial, hp, seed, result), result.history, state, reason,
                       status)

    def _artifacts(self, trial: optuna.trial.Trial, hp: dict[str, Any], seed: int,
                   result: TrainResult) -> Callable[[Path], None]:
        def write(folder: Path) -> None:
            config = self.cfg.to_dict()
            write_json({"study": self.cfg.study.name, "trial": trial.number, "seed": seed,
                        "hyperparameters": hp, **{k: config[k] for k in ("data", "model", "train")}},
                       folder / "trial_config.json")
            if self.cfg.tracking.trial_plots and result.history:
                plot_learning_curves(result.history, f"{self.cfg.study.name} trial {trial.number}: "
                                     f"{_describe(hp)}", folder / "learning_curves.png")
        return write


class _TrialRun:
    """A trial's MLflow run, opened in the background as the trial starts training and
    closed in the background after it ends, in order with the other trials' records.

    Tolerant of a tracking store that stops answering: the trial trains and is stored in
    Optuna regardless, with the error in ``tracking_error``.
    """

    def __init__(self, tracker: Tracker, trial: optuna.trial.Trial) -> None:
        self.tracker = tracker
        self.trial = trial
        self.run_id: str | None = None
        self.error: str | None = None
        self._opened: Future | None = None

    def start(self, outbox: Outbox, experiment_id: str, parent_run_id: str, study: str,
              params: dict[str, Any]) -> None:
        """Create the run and log its params while the trial trains."""
        self._opened = outbox.submit(f"trial {self.trial.number}", self._open, experiment_id, parent_run_id,
                                     study, params)

    def _open(self, experiment_id: str, parent_run_id: str, study: str, params: dict[str, Any]) -> None:
        try:
            run_id = self.tracker.start_trial(experiment_id, parent_run_id, study, self.trial.number, params)
        except Exception as e:  # one failure is enough: later calls would wait out timeouts too
            self.error = f"MLflow tracking lost: {first_line(e)}"
            return
        self.run_id = run_id
        # Straight to the storage (thread-safe; the trial is RUNNING until finish has waited
        # for this job): Trial.set_user_attr would also edit the trial's cached copy, which
        # the training thread reads.
        self.trial.storage.set_trial_user_attr(self.trial._trial_id, MLFLOW_RUN_ATTR, run_id)

    def finish(self, outbox: Outbox, write_artifacts: Callable[[Path], None], history: History,
               state: str, reason: str | None, status: str | None = None) -> None:
        """Wait until the run is open (usually long done), then close it in the background."""
        if self._opened is None:
            return
        self._opened.exception()  # waits; MLflow's errors land in self.error, not raised
        if self.error is not None:
            self.trial.set_user_attr(TRACKING_ERROR_ATTR, self.error)
        elif self.run_id is not None:
            outbox.submit(f"trial {self.trial.number}", self._send, self.run_id, write_artifacts, history,
                          state, reason, status)

    def _send(self, run_id: str, write_artifacts: Callable[[Path], None], history: History, state: str,
              reason: str | None, status: str | None) -> None:
        with artifact_dir() as tmp:
            folder = Path(tmp)
            write_artifacts(folder)
            self.tracker.finish_trial(run_id, history, state, reason=reason, artifacts=folder, status=status)


def outcome(result: TrainResult, metric: str) -> tuple[str, float, str | None]:
    """The trial's Optuna state, objective value and, unless COMPLETE, why.

    A trial whose loss or objective is not finite is never COMPLETE: Optuna would store
    ``inf`` as a valid value.
    """
    if result.diverged_at is not None:
        return "PRUNED", math.nan, f"non-finite train/loss at epoch {result.diverged_at}"
    value = result.final(metric)
    if result.pruned_at is not None:
        return "PRUNED", math.nan, f"pruned at epoch {result.pruned_at} ({metric}={value:.4g})"
    if value is None or not math.isfinite(value):
        return "PRUNED", math.nan, f"non-finite {metric} ({value})"
    return "COMPLETE", value, None


def trial_seed(study_seed: int | None, number: int) -> int:
    """The seed for a trial's weights and shuffling: reproducible when the study has a seed."""
    if study_seed is None:
        return random.randrange(2**31)
    return (study_seed * 1_000_003 + number) % 2**31


def _fixed_settings(cfg: Config, seed: int) -> dict[str, Any]:
    return {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
            "hidden": list(cfg.model.hidden), "activation": cfg.model.activation,
            "init": cfg.model.init, "data": cfg.data.source, "seed": seed}


def _describe(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
