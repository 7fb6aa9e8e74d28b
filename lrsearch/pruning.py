"""Reports the objective to Optuna every few epochs and stops a trial the pruner gives up on."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import optuna
import pytorch_lightning as pl


class PruningCallback(pl.Callback):
    """Like optuna-integration's callback, for the ``pytorch_lightning`` namespace, with
    three differences:

    - it checks every ``every`` epochs (at epochs every-1, 2*every-1, …; the step reported
      is the epoch), never at the last epoch, when the trial is about to end anyway;
    - the check (a storage write, and the pruner's reads) runs on a helper thread while the
      next epoch trains, and its verdict is applied at the end of that epoch: a pruned trial
      trains one epoch past the check that pruned it, always exactly one, so results stay
      reproducible;
    - it stops the Trainer cleanly instead of raising inside ``fit`` (which Lightning would
      record as a crash); the caller raises ``TrialPruned`` afterwards.

    Call :meth:`close` once ``fit`` returns or raises.
    """

    def __init__(self, trial: optuna.trial.Trial, metric: str, every: int = 1) -> None:
        self.trial = trial
        self.metric = metric
        self.every = every
        self.pruned_at: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsearch-pruning")
        self._pending: tuple[int, Future[bool]] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_verdict(trainer)
        epoch = trainer.current_epoch
        if trainer.should_stop or (epoch + 1) % self.every or epoch + 1 >= (trainer.max_epochs or 0):
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return  # a non-finite loss stops the trial through the module, not the pruner
        self._pending = (epoch, self._executor.submit(self._check, float(value), epoch))

    def close(self) -> None:
        """Wait for a check still running (it writes to the trial), then stop the thread."""
        if self._pending is not None:
            self._pending[1].exception()
            self._pending = None
        self._executor.shutdown()

    def _check(self, value: float, epoch: int) -> bool:
        self.trial.report(value, epoch)
        return self.trial.should_prune()

    def _apply_verdict(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        epoch, verdict = self._pending
        self._pending = None
        if verdict.result():  # waits if the check is still running; re-raises its error
            self.pruned_at = epoch
            trainer.should_stop = True
