"""A trial inside a trial array: its hyperparameters, its random stream, its schedule, its
pruning checks and what its training produced (a trial trained alone is an array of one)."""

from __future__ import annotations

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
