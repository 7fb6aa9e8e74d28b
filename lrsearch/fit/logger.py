"""A trial's metrics kept in memory, for one batched write per trial, and the Lightning
logger of a trial array that files each member's there."""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pytorch_lightning.loggers import Logger

# LearningRateMonitor calls momentum "<scheduler name>-momentum"; store it as plain "momentum".
_RENAMES = {"lr-momentum": "momentum"}


class MemoryLogger:
    """Collects ``(step, value, timestamp_ms)`` per metric key; nothing leaves the process
    until the trial's tracking code sends the whole history in a few batched calls."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float, int]]] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if key == "epoch":  # Lightning's convenience key: the step already is the epoch
                continue
            key = _RENAMES.get(key, key)
            self.history.setdefault(key, []).append((step or 0, float(value), now))

    def last(self, key: str) -> float | None:
        """The last value logged under ``key``, or None."""
        points = self.history.get(key)
        return points[-1][1] if points else None


class ArrayLogger(Logger):
    """The Lightning logger of a trial array: files what LearningRateMonitor logs for member
    KEY (``lr@KEY``, ``lr@KEY-momentum``) in that member's own history, at that member's own
    epoch (members join an array at different epochs of its fit). The array logs each
    member's other metrics there itself."""

    def __init__(self, members: Callable[[], Iterable[Any]]) -> None:
        super().__init__()
        self.members = members  # the members now in the array

    @property
    def name(self) -> str:
        return "lrsearch"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass  # hyperparameters go to MLflow as run params, once, by the tracking code

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        by_key = {m.key: m for m in self.members()}
        for name, value in metrics.items():
            base, _, rest = name.partition("@")
            key, dash, suffix = rest.partition("-")
            member = by_key.get(key)
            if member is not None:
                member.result.logger.log_metrics({base + dash + suffix: value}, step=member.epoch)
