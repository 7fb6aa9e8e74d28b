"""A trial's ending, before it is stored: its Optuna state, value and reason from what it
trained (``outcome``), the attributes stored with it, what follows it, and another worker's
end of it (``TakenOver``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from lrsearch.fit.member import Member, TrainResult


@dataclass
class Ending:
    """How an array member's trial ended, before it is stored: its Optuna state (COMPLETE,
    PRUNED or FAIL), objective value (COMPLETE only), why, the user attributes stored with its
    end, its MLflow run's status (if not the state's), and what follows: the trial queued
    again, an interruption or ``lrsearch cancel --now`` to raise once it is stored, or
    another worker's end of it (``taken``)."""

    member: Member
    state: str
    value: float | None
    reason: str | None
    attrs: dict[str, Any]
    status: str | None = None
    requeue: bool = False
    raises: BaseException | None = None  # Interrupted (a signal) or Cancelled (cancel --now)
    taken: TakenOver | None = None

    @property
    def trial(self) -> optuna.trial.Trial:
        return self.member.context.trial

    def told(self) -> tuple[optuna.trial.TrialState, list[float] | None]:
        """The Optuna state and values ``study.tell`` stores for it: a PRUNED trial's value
        is its last report (if any), as Optuna's tell keeps it."""
        from optuna.trial import TrialState

        state = TrialState[self.state]
        if self.state == "COMPLETE":
            return state, [float(self.value)] if self.value is not None else None
        if self.state == "PRUNED":
            reports = self.trial._cached_frozen_trial.intermediate_values
            last = reports.get(max(reports)) if reports else None
            return state, [float(last)] if last is not None and math.isfinite(last) else None
        return state, None


class TakenOver(Exception):
    """A trial ended by another worker while it trained here (see ``claims._stale_trials``)."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason or "no heartbeat"
        super().__init__(self.reason)


def outcome(result: TrainResult, metric: str, verdict: str = "") -> tuple[str, float, str | None]:
    """The trial's Optuna state, objective value and, unless COMPLETE, why.

    A trial whose loss (training or validation) or objective is not finite is never
    COMPLETE: Optuna would store ``inf`` as a valid value. A pruned trial's reason gives the
    value the pruner judged (the one reported at the check's epoch, not the epoch trained
    after it) and ``verdict``, the pruner's rule.
    """
    if result.diverged_at is not None:
        return "PRUNED", math.nan, f"non-finite {result.diverged_on} at epoch {result.diverged_at}"
    value = result.final(metric)
    if result.pruned_at is not None:
        judged = result.at(metric, result.pruned_at)
        shown = "" if judged is None else f": {metric}={judged:.4g}"
        return "PRUNED", math.nan, f"pruned at epoch {result.pruned_at}{shown}" + (f", {verdict}" if verdict else "")
    if value is None or not math.isfinite(value):
        return "PRUNED", math.nan, f"non-finite {metric} ({value})"
    return "COMPLETE", value, None
