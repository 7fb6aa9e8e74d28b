"""A finished trial as the report draws it: its number, state, value, hyperparameters (what a
population member ended with), per-epoch curves from MLflow and how it ran."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrsearch.choices.space import in_sampling_order
from lrsearch.core import attrs
from lrsearch.core.text import exploits_text, params_text
from lrsearch.results.ranking import duration_s, wall_s
from lrsearch.track.tracking import Tracker

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from lrsearch.track.process import TrackerLike

CURVE_KEYS = ("train/acc", "val/acc", "lr")


@dataclass
class TrialCurves:
    """One finished trial: its number, state, value, hyperparameters, per-epoch curves and
    how it ran (epochs, seconds, why it stopped, its MLflow run)."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    hyperparameters: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    epochs: int | None = None
    duration_s: float | None = None
    wall_s: float | None = None
    reason: str | None = None
    run_id: str | None = None
    # A member of population-based training: its params are what it ended with; this says
    # what it was drawn with and whom it copied.
    lineage: str | None = None

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        return next((step for step, v in self.curves.get(key, []) if v >= threshold), None)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None


def collect(
    frozen: Sequence[FrozenTrial], tracker: Tracker | None, states: Sequence[str] = ("COMPLETE", "PRUNED")
) -> list[TrialCurves]:
    """A study's trials (``frozen``, as Optuna gives them) in ``states``, with their MLflow
    metric histories if ``tracker`` is given (else :func:`with_curves` reads those of the
    trials that need them)."""
    trials = []
    for t in frozen:
        if t.state.name not in states:
            continue
        run_id = t.user_attrs.get(attrs.MLFLOW_RUN)
        curves: dict[str, list[tuple[int, float]]] = {}
        value = t.value
        if value is None and t.intermediate_values:  # pruned: its last report is what was judged
            value = t.intermediate_values[max(t.intermediate_values)]
        pbt = t.user_attrs.get(attrs.PBT)
        params = in_sampling_order(pbt["final"] if pbt else t.params)
        lineage = (
            f"drawn with {params_text(in_sampling_order(t.params))}; {exploits_text(pbt['exploits'])}" if pbt else None
        )
        trials.append(
            TrialCurves(
                t.number,
                t.state.name,
                value,
                params,
                {**t.user_attrs.get(attrs.HYPERPARAMETERS, t.params), **params},
                curves,
                epochs=t.user_attrs.get(attrs.EPOCHS_TRAINED),
                duration_s=duration_s(t),
                wall_s=wall_s(t),
                reason=t.user_attrs.get(attrs.REASON),
                run_id=run_id,
                lineage=lineage,
            )
        )
    return trials if tracker is None else with_curves(trials, tracker)


def with_curves(trials: Sequence[TrialCurves], tracker: TrackerLike) -> list[TrialCurves]:
    """``trials`` with their metric histories (``CURVE_KEYS``), read in one call."""
    histories = tracker.histories([t.run_id for t in trials if t.run_id], CURVE_KEYS)
    for t in trials:
        t.curves = histories.get(t.run_id, {}) if t.run_id else {}
    return list(trials)


def varied_params(trials: Sequence[TrialCurves]) -> list[str]:
    """The params that take more than one value across the trials (a grid's axes)."""
    names: dict[str, set[str]] = {}
    for t in trials:
        for k, v in t.params.items():
            names.setdefault(k, set()).add(repr(v))
    return [k for k, values in names.items() if len(values) > 1]
