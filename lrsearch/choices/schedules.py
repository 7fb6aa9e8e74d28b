"""Learning-rate schedules a study can name: one registry entry each (PyTorch's scheduler,
when it steps, the hyperparameters it takes with their defaults, its docs line), and the
linear warm-up (``warmup_epochs``) that may precede any of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrsearch.core.registry import Epochs, Registry

if TYPE_CHECKING:
    import torch

# Keras' min_delta for ReduceLROnPlateau: an absolute improvement smaller than this is "flat".
PLATEAU_MIN_DELTA = 1e-7


@dataclass(frozen=True)
class Span:
    """How long the schedule runs: its epochs (after any warm-up) and the optimizer updates
    per epoch (the schedules that step every update need their total)."""

    epochs: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class Schedule:
    """A scheduler, when to step it (after every optimizer update, or every epoch), and an
    optional linear warm-up before it.

    The warm-up raises each group's learning rate linearly, update by update, from 1/W of the
    rate the scheduler starts at to that rate over W = ``warmup_steps`` updates; the scheduler
    is not stepped until then, so it runs whole afterwards (epoch-interval schedules from the
    first epoch after the warm-up). The training loop calls :meth:`step_update` after every
    optimizer update and :meth:`step_epoch` at the end of every epoch.
    """

    # scheduler: Any, as PyTorch types LRScheduler.step(epoch), which ReduceLROnPlateau's step(metric) overrides.
    def __init__(self, scheduler: Any, interval: str, monitor: str | None = None, warmup_steps: int = 0) -> None:
        self.scheduler = scheduler
        self.interval = interval  # "step" or "epoch"
        self.monitor = monitor  # the metric ReduceLROnPlateau watches
        self.warmup_steps = warmup_steps
        self.updates = 0
        groups = scheduler.optimizer.param_groups
        self._targets = [g["lr"] for g in groups]  # where the scheduler starts
        if warmup_steps:
            self._warm(1)

    def _warm(self, k: int) -> None:
        for group, target in zip(self.scheduler.optimizer.param_groups, self._targets):
            group["lr"] = target * k / self.warmup_steps

    @property
    def per_update(self) -> bool:
        """Whether :meth:`step_update` still does anything: a scheduler that steps every
        update, or a warm-up not yet over (its last call ends it)."""
        return self.interval == "step" or (self.warmup_steps > 0 and self.updates <= self.warmup_steps)

    def step_update(self) -> None:
        """After an optimizer update."""
        self.updates += 1
        if self.warmup_steps and self.updates <= self.warmup_steps:
            self._warm(min(self.updates + 1, self.warmup_steps))
        elif self.interval == "step":
            self.scheduler.step()

    def step_epoch(self, metrics: Mapping[str, float]) -> None:
        """Advance an epoch-interval schedule at the end of an epoch (none while warming up)."""
        if self.interval != "epoch" or (self.warmup_steps and self.updates <= self.warmup_steps):
            return
        if self.monitor is None:
            self.scheduler.step()
        else:
            self.scheduler.step(metrics[self.monitor])


@dataclass(frozen=True)
class ScheduleKind:
    name: str
    doc: str
    build: Callable[[torch.optim.Optimizer, Mapping[str, Any], Span], Schedule]
    # The hyperparameters it takes, with their defaults (a default may be in epochs).
    options: Mapping[str, Any] = field(default_factory=dict)


def _constant(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    # A real (flat) scheduler, so every trial's learning rate is logged under the same name.
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), "epoch")


def _time_decay(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    decay = hp["decay"]
    # lr_t = lr_0 / (1 + decay * t), t counted in optimizer updates (Keras' classic decay).
    return Schedule(lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + decay * t)), "step")


def _step(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.StepLR(optimizer, hp["step_size"], hp["gamma"]), "epoch")


def _exponential(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.ExponentialLR(optimizer, hp["gamma"]), "epoch")


def _cosine(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    return Schedule(lr_scheduler.CosineAnnealingLR(optimizer, hp["t_max"]), "epoch")


def _plateau(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    plateau = lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=hp["factor"],
        patience=hp["patience"],
        threshold=PLATEAU_MIN_DELTA,
        threshold_mode="abs",
    )
    return Schedule(plateau, "epoch", monitor="val/loss")


def _one_cycle(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    # max_lr is the trial's lr; PyTorch's defaults start at lr/25 and end at lr/25e4. Momentum
    # is not cycled: it is the trial's own (searched) hyperparameter.
    cycle = lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=hp["lr"],
        total_steps=span.steps,
        pct_start=hp["pct_start"],
        anneal_strategy=hp["anneal"],
        cycle_momentum=False,
    )
    return Schedule(cycle, "step")


def _cyclic(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], span: Span) -> Schedule:
    from torch.optim import lr_scheduler

    cyclic = lr_scheduler.CyclicLR(
        optimizer,
        base_lr=hp["lr"] * hp["base_fraction"],
        max_lr=hp["lr"],
        step_size_up=hp["half_cycle"] * span.steps_per_epoch,
        mode=hp["mode"],
        cycle_momentum=False,
    )
    return Schedule(cyclic, "step")


SCHEDULES: Registry[ScheduleKind] = Registry(
    "schedule",
    [
        ScheduleKind("constant", "the learning rate stays `lr`", _constant),
        ScheduleKind(
            "time_decay",
            "lr / (1 + decay · t), t = optimizer updates so far (Keras' decay)",
            _time_decay,
            {"decay": 1e-3},
        ),
        ScheduleKind(
            "step", "lr × gamma every step_size epochs (StepLR)", _step, {"step_size": Epochs(4), "gamma": 0.5}
        ),
        ScheduleKind("exponential", "lr × gamma every epoch (ExponentialLR)", _exponential, {"gamma": 0.95}),
        ScheduleKind(
            "cosine", "cosine annealing to 0 over t_max epochs (CosineAnnealingLR)", _cosine, {"t_max": Epochs(1)}
        ),
        ScheduleKind(
            "plateau",
            f"lr × factor after `patience` epochs without a val/loss improvement of "
            f"{PLATEAU_MIN_DELTA:g} (ReduceLROnPlateau)",
            _plateau,
            {"patience": 10, "factor": 0.1},
        ),
        ScheduleKind(
            "one_cycle",
            "Smith's one-cycle policy: up to `lr` over the first pct_start of the updates, "
            "then down to lr/25e4 (OneCycleLR, momentum not cycled)",
            _one_cycle,
            {"pct_start": 0.3, "anneal": "cos"},
        ),
        ScheduleKind(
            "cyclic",
            "triangles between lr · base_fraction and `lr`, half_cycle epochs up then down; "
            "triangular2 halves each cycle's height (CyclicLR)",
            _cyclic,
            {"mode": "triangular", "base_fraction": 0.1, "half_cycle": Epochs(10)},
        ),
    ],
)


def schedule_epochs(epochs: int, hp: Mapping[str, Any]) -> int:
    """The epochs the schedule itself runs: those after the warm-up (at least one). Its
    defaults in epochs (``Epochs``) count these."""
    return max(1, epochs - hp.get("warmup_epochs", 0))


def make_schedule(
    optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], epochs: int = 1, steps_per_epoch: int = 1
) -> Schedule:
    """The schedule named by ``hp["schedule"]``, after ``hp["warmup_epochs"]`` (if any) of
    linear warm-up, over a run of ``epochs`` epochs of ``steps_per_epoch`` updates."""
    warmup = hp.get("warmup_epochs", 0)
    schedule = SCHEDULES[hp["schedule"]].build(optimizer, hp, Span(schedule_epochs(epochs, hp), steps_per_epoch))
    if warmup:
        schedule = Schedule(schedule.scheduler, schedule.interval, schedule.monitor, warmup * steps_per_epoch)
    return schedule
