"""The objective: a trial's params, a trained model, a metric, and the MLflow run that records it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from lrsearch.config import Config
from lrsearch.data import Dataset
from lrsearch.report import plot_learning_curves
from lrsearch.space import sample_params
from lrsearch.tracking import Tracker, artifact_dir, write_json
from lrsearch.training import TrainResult, train

MLFLOW_RUN_ATTR = "mlflow_run_id"
REASON_ATTR = "reason"


@dataclass
class Objective:
    """Called by ``study.optimize`` once per trial."""

    cfg: Config
    data: Dataset
    tracker: Tracker
    experiment_id: str
    parent_run_id: str

    def __call__(self, trial: optuna.trial.Trial) -> float:
        cfg = self.cfg
        hp = sample_params(trial, cfg.params, cfg.train.epochs)
        seed = trial_seed(cfg.study.seed, trial.number)
        run_id = self.tracker.start_trial(self.experiment_id, self.parent_run_id, cfg.study.name,
                                          trial.number, {**hp, **_fixed_settings(cfg, seed)})
        trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
        trial.set_user_attr("hyperparameters", hp)
        result = TrainResult()
        try:
            train(cfg, self.data, hp, seed, trial, result)
        except BaseException as e:
            # Record what was measured before the failure; Optuna marks the trial FAIL.
            interrupted = isinstance(e, KeyboardInterrupt)
            reason = "interrupted" if interrupted else f"{type(e).__name__}: {e}"
            trial.set_user_attr(REASON_ATTR, reason)
            self._finish(trial, run_id, hp, seed, result, "FAIL", reason, "KILLED" if interrupted else None)
            raise
        state, value, reason = outcome(result, cfg.study.metric)
        trial.set_user_attr("epochs_trained", result.epochs)
        if reason:
            trial.set_user_attr(REASON_ATTR, reason)
        self._finish(trial, run_id, hp, seed, result, state, reason)
        if state == "PRUNED":
            raise optuna.TrialPruned(reason)
        return value

    def _finish(self, trial: optuna.trial.Trial, run_id: str, hp: dict[str, Any], seed: int,
                result: TrainResult, state: str, reason: str | None, status: str | None = None) -> None:
        with artifact_dir() as tmp:
            folder = Path(tmp)
            write_json(self._trial_config(trial, hp, seed), folder / "trial_config.json")
            if result.history:
                plot_learning_curves(result.history, f"{self.cfg.study.name} trial {trial.number}: "
                                     f"{_describe(hp)}", folder / "learning_curves.png")
            self.tracker.finish_trial(run_id, result.history, state, reason=reason, artifacts=folder,
                                      status=status)

    def _trial_config(self, trial: optuna.trial.Trial, hp: dict[str, Any], seed: int) -> dict[str, Any]:
        config = self.cfg.to_dict()
        config.pop("params")
        return {"study": self.cfg.study.name, "trial": trial.number, "seed": seed,
                "hyperparameters": hp, **{k: config[k] for k in ("data", "model", "train")}}


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
