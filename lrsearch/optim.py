"""Optimizer and learning-rate schedule factories.

Optimizers use PyTorch's defaults beyond ``lr`` and ``momentum`` (RMSprop alpha 0.99,
eps 1e-8; Adagrad eps 1e-10; Adam betas (0.9, 0.999)); the classic Keras experiments used
RMSprop rho 0.9 and epsilon 1e-7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch.optim import lr_scheduler

# Keras' min_delta for ReduceLROnPlateau: an absolute improvement smaller than this is "flat".
PLATEAU_MIN_DELTA = 1e-7


@dataclass(frozen=True)
class Schedule:
    """A scheduler and when to step it: after every optimizer step, or every epoch."""

    scheduler: Any
    interval: str  # "step" or "epoch"
    monitor: str | None = None  # the metric ReduceLROnPlateau watches

    def step_epoch(self, metrics: Mapping[str, float]) -> None:
        """Advance an epoch-interval schedule at the end of an epoch."""
        if self.interval != "epoch":
            return
        if self.monitor is None:
            self.scheduler.step()
        else:
            self.scheduler.step(metrics[self.monitor])


def make_optimizer(parameters: Iterable[torch.nn.Parameter], hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer named by ``hp["optimizer"]`` with ``hp["lr"]`` (and ``momentum``)."""
    name, lr = hp["optimizer"], hp["lr"]
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=hp.get("momentum", 0.0))
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, momentum=hp.get("momentum", 0.0))
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def make_schedule(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    """The schedule named by ``hp["schedule"]``; ``constant`` is a real (flat) scheduler too,
    so every trial's learning rate is logged under the same name."""
    name = hp["schedule"]
    if name == "constant":
        return Schedule(lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), "epoch")
    if name == "time_decay":
        decay = hp["decay"]
        # lr_t = lr_0 / (1 + decay * t), t counted in optimizer updates (Keras' classic decay).
        return Schedule(lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + decay * t)), "step")
    if name == "step":
        return Schedule(lr_scheduler.StepLR(optimizer, hp["step_size"], hp["gamma"]), "epoch")
    if name == "exponential":
        return Schedule(lr_scheduler.ExponentialLR(optimizer, hp["gamma"]), "epoch")
    if name == "cosine":
        return Schedule(lr_scheduler.CosineAnnealingLR(optimizer, hp["t_max"]), "epoch")
    if name == "plateau":
        plateau = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=hp["factor"], patience=hp["patience"],
            threshold=PLATEAU_MIN_DELTA, threshold_mode="abs",
        )
        return Schedule(plateau, "epoch", monitor="val/loss")
    raise ValueError(f"unknown schedule {name!r}")
