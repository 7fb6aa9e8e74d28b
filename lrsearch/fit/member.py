"""A trial inside a trial array: its hyperparameters, its random stream, its schedule, its
pruning checks and what its training produced (a trial trained alone is an array of one)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrsearch.fit.logger import MemoryLogger

if TYPE_CHECKING:
    import optuna
    import torch

    from lrsearch.choices.schedules import Schedule


@dataclass
class TrainResult:
    """What a fit produced: the per-epoch history and why it stopped early, if it did."""

    logger: MemoryLogger = field(default_factory=MemoryLogger)
    epochs: int = 0
    pruned_at: int | None = None
    diverged_at: int | None = None  # the epoch a loss became non-finite
    diverged_on: str | None = None  # which loss: train/loss or val/loss
    seconds: float = 0.0  # its share of the array's training time: each epoch's, divided among its members
    # Its network as training left it: W0, b0, W1, b1, … (W as [in, out], b as [1, out]).
    weights: list[torch.Tensor] | None = None
    # Population-based training: each time it copied another member ({"epoch", "source",
    # "reason", "before", "after"}; fit/population.py), in order.
    exploits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def history(self) -> dict[str, list[tuple[int, float, int]]]:
        return self.logger.history

    def final(self, key: str) -> float | None:
        return self.logger.last(key)

    def at(self, key: str, epoch: int) -> float | None:
        """``key``'s value at ``epoch`` (its step), if logged."""
        return next((v for step, v, _ in self.history.get(key, []) if step == epoch), None)


@dataclass(eq=False)
class Member:
    """One trial of an array. ``key`` names it in the array (its LR curve is logged as
    ``lr@key``); ``trial``, when given, receives its pruning reports; ``epochs`` is how long
    it trains; ``context`` is the caller's (the objective keeps its MLflow record there)."""

    key: str
    hp: Mapping[str, Any]
    seed: int
    epochs: int
    trial: optuna.trial.Trial | None = None
    context: Any = None  # the service's record of the trial (Any: service/ is above fit/)
    result: TrainResult = field(default_factory=TrainResult)
    # Set by the array while it trains:
    generator: torch.Generator | None = None  # its weights' initialization, then its data order
    shadow: torch.optim.Optimizer | None = None  # a torch optimizer its schedule steps (no weights)
    schedule: Schedule | None = None

    @property
    def epoch(self) -> int:
        """Epochs trained so far (the next epoch's number)."""
        return self.result.epochs

    @property
    def lr(self) -> float:
        assert self.shadow is not None
        return self.shadow.param_groups[0]["lr"]

    @property
    def ended_early(self) -> bool:
        """Pruned or diverged: it leaves the array before its last epoch."""
        return self.result.pruned_at is not None or self.result.diverged_at is not None

    def retune_shadow(self, hp: Mapping[str, Any]) -> None:
        """Its shadow optimizer made to read as ``hp``'s (population-based training's
        constant schedule): its param group and defaults replaced in place, as a new shadow of
        ``hp``'s optimizer would have them (a new torch optimizer and scheduler cost ~0.15 ms
        a copy, more than the copy). LearningRateMonitor reads only these: the group's ``lr``,
        ``momentum`` (or the defaults' ``betas``) and ``weight_decay``."""
        template = _shadow_template(hp["optimizer"], bool(hp.get("momentum")), bool(hp.get("nesterov")))
        assert self.shadow is not None and self.schedule is not None
        group = self.shadow.param_groups[0]
        fresh = {**template.param_groups[0], "params": group["params"], "lr": hp["lr"], "initial_lr": hp["lr"]}
        fresh.update({k: hp[k] for k in ("momentum", "weight_decay", "nesterov") if k in hp and k in fresh})
        group.clear()
        group.update(fresh)
        self.shadow.defaults = template.defaults
        self.schedule.scheduler.base_lrs = [hp["lr"]]  # the constant schedule: lr = base × 1


@functools.cache
def _shadow_template(optimizer: str, momentum: bool, nesterov: bool) -> torch.optim.Optimizer:
    """One weightless optimizer of each kind: its defaults and param group's keys."""
    hp = {
        "optimizer": optimizer,
        "lr": 1.0,
        **({"momentum": 0.5} if momentum else {}),
        **({"nesterov": True} if nesterov else {}),
    }
    import torch

    from lrsearch.choices.optimizers import make_optimizer

    return make_optimizer([torch.zeros(1, requires_grad=True, device="cpu")], hp)
