"""Learning-rate schedules a study can name: one registry entry each (PyTorch's scheduler,
when it steps, the hyperparameters it takes with their defaults, its docs line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from lrsearch.registry import Epochs, Registry

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class ScheduleKind:
    name: str
    doc: str
    build: Callable[[torch.optim.Optimizer, Mapping[str, Any]], Schedule]
    # The hyperparameters it takes, with their defaults (a default may be in epochs).
    options: Mapping[str, Any] = field(default_factory=dict)


def _constant(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    # A real (flat) scheduler, so every trial's learning rate is logged under the same name.
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), "epoch")


def _time_decay(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    from torch.optim import lr_scheduler

    decay = hp["decay"]
    # lr_t = lr_0 / (1 + decay * t), t counted in optimizer updates (Keras' classic decay).
    return Schedule(lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + decay * t)), "step")


def _step(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.StepLR(optimizer, hp["step_size"], hp["gamma"]), "epoch")


def _exponential(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.ExponentialLR(optimizer, hp["gamma"]), "epoch")


def _cosine(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.CosineAnnealingLR(optimizer, hp["t_max"]), "epoch")


def _plateau(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    from torch.optim import lr_scheduler

    plateau = lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=hp["factor"], patience=hp["patience"],
        threshold=PLATEAU_MIN_DELTA, threshold_mode="abs",
    )
    return Schedule(plateau, "epoch", monitor="val/loss")


SCHEDULES: Registry[ScheduleKind] = Registry("schedule", [
    ScheduleKind("constant", "the learning rate stays `lr`", _constant),
    ScheduleKind("time_decay", "lr / (1 + decay · t), t = optimizer updates so far (Keras' decay)",
                 _time_decay, {"decay": 1e-3}),
    ScheduleKind("step", "lr × gamma every step_size epochs (StepLR)", _step,
                 {"step_size": Epochs(4), "gamma": 0.5}),
    ScheduleKind("exponential", "lr × gamma every epoch (ExponentialLR)", _exponential, {"gamma": 0.95}),
    ScheduleKind("cosine", "cosine annealing to 0 over t_max epochs (CosineAnnealingLR)", _cosine,
                 {"t_max": Epochs(1)}),
    ScheduleKind("plateau", f"lr × factor after `patience` epochs without a val/loss improvement of "
                            f"{PLATEAU_MIN_DELTA:g} (ReduceLROnPlateau)", _plateau,
                 {"patience": 10, "factor": 0.1}),
])


def make_schedule(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any]) -> Schedule:
    """The schedule named by ``hp["schedule"]``."""
    return SCHEDULES[hp["schedule"]].build(optimizer, hp)
