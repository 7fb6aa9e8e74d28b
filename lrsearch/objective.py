"""The objective: a trial's params, a trained model, a metric, and the MLflow run that records it."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from lrsearch import attrs
from lrsearch.config import Config
from lrsearch.data import Dataset
from lrsearch.descriptions import trial_note
from lrsearch.errors import first_line
from lrsearch.report import plot_learning_curves
from lrsearch.sampling import PRUNERS
from lrsearch.space import in_sampling_order, sample_params
from lrsearch.stopping import Cancelled, Interrupted, StopFlag, TrialStop
from lrsearch.tracking import Outbox, Tracker, TrialRecord, write_json
from lrsearch.training import TrainResult, train


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

    def __call__(self, trial: optuna.trial.Trial, cancelled: threading.Event | None = None,
                 recorded: Callable[[], None] | None = None) -> float:
        """Train ``trial``; ``cancelled``, once set, stops it at the next epoch boundary and
        raises :class:`Cancelled` (the trial ends FAIL, its run KILLED). ``recorded()`` is
        called once the trial's MLflow record is sent (or has failed), in the background."""
        self._recorded, self._handed = recorded or (lambda: None), False
        try:
            return self._train(trial, cancelled)
        finally:
            if not self._handed:  # it failed before its record was handed to the tracking thread
                self._recorded()

    def _train(self, trial: optuna.trial.Trial, cancelled: threading.Event | None) -> float:
        cfg = self.cfg
        stop = TrialStop(self.stop, cancelled)
        hp = sample_params(trial, cfg.params, cfg.train.epochs)
        seed = trial_seed(cfg.study.seed, trial.number)
        trial.set_user_attr(attrs.HYPERPARAMETERS, hp)
        run = TrialRecord(self.tracker, trial.number, _attr_writer(trial))
        run.start(self.outbox, self.experiment_id, self.parent_run_id, cfg.study.name,
                  {**hp, **_fixed_settings(cfg, seed)})
        result = TrainResult()
        started = time.perf_counter()
        try:
            with self.stop.interruptible():  # a second signal stops training at once
                train(cfg, self.data, hp, seed, trial, result, stop)
        except BaseException as e:
            # Record what was measured before the failure; the caller marks the trial FAIL.
            interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
            reason = "interrupted" if interrupted else f"{type(e).__name__}: {first_line(e)}"
            self._end(trial, run, hp, seed, result, "FAIL", reason, "KILLED" if interrupted else None)
            raise
        trial.set_user_attr(attrs.EPOCHS_TRAINED, result.epochs)
        trial.set_user_attr(attrs.TRAIN_SECONDS, round(time.perf_counter() - started, 4))
        if self.stop.requested:
            self._end(trial, run, hp, seed, result, "FAIL", f"interrupted at epoch {result.epochs - 1}", "KILLED")
            raise Interrupted(self.stop.signum or 0)
        cut_short = result.epochs < cfg.train.epochs and result.pruned_at is None and result.diverged_at is None
        if stop.cancelled.is_set() and cut_short:  # a trial that ended on its own keeps its result
            self._end(trial, run, hp, seed, result, "FAIL", "cancelled", "KILLED")
            raise Cancelled()
        state, value, reason = outcome(result, cfg.study.metric, PRUNERS[cfg.study.pruner].verdict)
        self._end(trial, run, hp, seed, result, state, reason, value=value)
        if state == "PRUNED":
            raise optuna.TrialPruned(reason)
        return value

    def _end(self, trial: optuna.trial.Trial, run: TrialRecord, hp: dict[str, Any], seed: int,
             result: TrainResult, state: str, reason: str | None, status: str | None = None,
             value: float | None = None) -> None:
        """Store why the trial ended (unless COMPLETE) and close its MLflow run (even if the
        reason could not be stored: the run must not stay RUNNING), with its one-line description."""
        objective = value if state == "COMPLETE" else None
        note = trial_note(state, reason, self.cfg.study.metric, objective, result.epochs,
                          in_sampling_order(trial.params))
        try:
            if reason:
                trial.set_user_attr(attrs.REASON, reason)
        finally:
            self._handed = True
            run.finish(self.outbox, self._artifacts(trial, hp, seed, result), result.history, state, reason,
                       status, note=note, objective=objective, then=self._recorded)

    def _artifacts(self, trial: optuna.trial.Trial, hp: dict[str, Any], seed: int,
                   result: TrainResult) -> Callable[[Path], None]:
        def write(folder: Path) -> None:
            config = self.cfg.to_dict()
            write_json({"study": self.cfg.study.name, "trial": trial.number, "seed": seed,
                        attrs.HYPERPARAMETERS: hp, **{k: config[k] for k in ("data", "model", "train")}},
                       folder / "trial_config.json")
            if self.cfg.tracking.trial_plots and result.history:
                plot_learning_curves(result.history, f"{self.cfg.study.name} trial {trial.number}: "
                                     f"{_describe(hp)}", folder / "learning_curves.png")
        return write


def outcome(result: TrainResult, metric: str, verdict: str = "") -> tuple[str, float, str | None]:
    """The trial's Optuna state, objective value and, unless COMPLETE, why.

    A trial whose loss (training or validation) or objective is not finite is never
    COMPLETE: Optuna would store ``inf`` as a valid value. A pruned trial's reason gives the
    value the pruner judged (the one reported at the check's epoch, not the epoch trained
    after it) and ``verdict``, the pruner's rule.
    """
    if result.diverged_at is not None:
        return "PRUNED", math.nan, f"non-finite {result.diverged_on} at epoch {result.diverged_at}"
    value = result.final(metric)
    if result.pruned_at is not None:
        judged = result.at(metric, result.pruned_at)
        shown = "" if judged is None else f": {metric}={judged:.4g}"
        return "PRUNED", math.nan, f"pruned at epoch {result.pruned_at}{shown}" + (f", {verdict}" if verdict else "")
    if value is None or not math.isfinite(value):
        return "PRUNED", math.nan, f"non-finite {metric} ({value})"
    return "COMPLETE", value, None


def _attr_writer(trial: optuna.trial.Trial) -> Callable[[str, Any], None]:
    """Writes a trial's user attribute from the tracking thread: straight to the storage
    (thread-safe; the trial stays RUNNING until its record has been waited for), because
    ``Trial.set_user_attr`` would also edit the trial's cached copy, which the training
    thread reads."""
    return lambda key, value: trial.storage.set_trial_user_attr(trial._trial_id, key, value)


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
