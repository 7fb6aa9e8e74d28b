"""The MLP and the LightningModule that trains it on whole-epoch tensors."""

from __future__ import annotations

import math
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lrsearch.optimizers import make_optimizer
from lrsearch.schedules import Schedule, make_schedule

# The name LearningRateMonitor logs the learning rate under, whatever the optimizer.
LR_NAME = "lr"


class MLPClassifier(pl.LightningModule):
    """Trains with manual optimization: one Lightning "batch" is the whole shuffled epoch,
    sliced into minibatches here, so Lightning's per-step hooks run once per epoch instead
    of once per optimizer update (they cost more than this small network's compute).

    For the same reason it validates on ``val`` (the whole validation set, one forward
    pass) at the end of each training epoch rather than through Lightning's validation
    loop, whose per-epoch hooks cost more than the validation itself (README, Performance).
    """

    def __init__(self, net: torch.nn.Module, hp: Mapping[str, Any], batch_size: int, generator: torch.Generator,
                 val: tuple[torch.Tensor, torch.Tensor], steps_per_epoch: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.hp = dict(hp)
        self.batch_size = batch_size
        self.generator = generator
        self.val = val
        self.steps_per_epoch = steps_per_epoch  # optimizer updates per epoch
        self.schedule: Schedule | None = None
        self.diverged_at: int | None = None  # the epoch a loss became non-finite
        self.diverged_on: str | None = None  # which loss: train/loss or val/loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.net.parameters(), self.hp)
        self.schedule = make_schedule(optimizer, self.hp, self.trainer.max_epochs or 1, self.steps_per_epoch)
        # Every trial has a scheduler named LR_NAME, so the LR curve keeps one key.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.schedule.scheduler, "name": LR_NAME}}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # The raw optimizer: LightningOptimizer.step and manual_backward add per-update hooks
        # this CPU-only, single-device loop has no use for.
        optimizer = self.optimizers().optimizer
        order = torch.randperm(len(x), generator=self.generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb = x[idx], y[idx]
            logits = self.net(xb)
            loss = F.cross_entropy(logits, yb)
            value = loss.item()
            if not math.isfinite(value):
                self._diverge("train/loss")
                loss_sum = value * len(x)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.schedule is not None:
                self.schedule.step_update()
            loss_sum += value * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        self._log_epoch("train", loss_sum / len(x), correct / len(x))
        self._validate()

    @torch.no_grad()
    def _validate(self) -> None:
        x, y = self.val
        logits = self.net(x)
        loss = F.cross_entropy(logits, y).item()
        self._log_epoch("val", loss, int((logits.argmax(1) == y).sum()) / len(y))
        # Whatever the metric: a NaN validation loss still leaves a finite val/acc (argmax of NaN
        # logits), which would rank the trial COMPLETE.
        if not math.isfinite(loss) and self.diverged_at is None:
            self._diverge("val/loss")

    def _diverge(self, key: str) -> None:
        """Stop at the end of this epoch: ``key`` is not finite (the trial ends PRUNED, saying so)."""
        self.diverged_at, self.diverged_on = self.current_epoch, key
        self.trainer.should_stop = True

    def _log_epoch(self, split: str, loss: float, acc: float) -> None:
        """Send an epoch's metrics to the logger and to ``trainer.callback_metrics``.

        Not ``self.log``: each call moves Lightning's whole result collection to the device
        and deep-copies its metadata, which costs more than a whole epoch of this
        network. Values and steps (the epoch) are the ones ``self.log(on_epoch=True)`` gives.
        """
        metrics = {f"{split}/loss": loss, f"{split}/acc": acc}
        # float64: callbacks read these as tensors, and float32 would turn 0.842 into 0.84200000763.
        self.trainer.callback_metrics.update(
            {key: torch.tensor(value, dtype=torch.float64) for key, value in metrics.items()})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self.schedule is not None and self.diverged_at is None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            self.schedule.step_epoch(metrics)
