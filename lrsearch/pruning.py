"""Reports each epoch's objective to Optuna and stops a trial the pruner gives up on."""

from __future__ import annotations

import math

import optuna
import pytorch_lightning as pl


class PruningCallback(pl.Callback):
    """Like optuna-integration's callback, for the ``pytorch_lightning`` namespace, and
    stopping the Trainer cleanly instead of raising inside ``fit`` (which Lightning would
    record as a crash); the caller raises ``TrialPruned`` afterwards."""

    def __init__(self, trial: optuna.trial.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return  # a non-finite loss stops the trial through the module, not the pruner
        epoch = trainer.current_epoch
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True
