"""The search space: which hyperparameters exist, when each applies, and how a trial samples them.

Sampling is define-by-run: a hyperparameter is suggested only when the values sampled
before it make it meaningful (``momentum`` only for optimizers that have one, ``decay``
only with the ``time_decay`` schedule), so it never appears on a trial where it means nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

if TYPE_CHECKING:
    import optuna

OPTIMIZERS = ("sgd", "adam", "rmsprop", "adagrad")
SCHEDULES = ("constant", "time_decay", "step", "exponential", "cosine", "plateau")
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")
# The usual default learning rates (Keras'), used when a study does not set `lr`.
DEFAULT_LR = {"sgd": 0.01, "adam": 0.001, "rmsprop": 0.001, "adagrad": 0.01}


@dataclass(frozen=True)
class Fixed:
    """One value for every trial."""

    value: Any


@dataclass(frozen=True)
class Range:
    """A numeric interval, sampled uniformly or on a log scale."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choices:
    """A list of values, sampled as a categorical."""

    values: tuple[Any, ...]


ParamSpec = Union[Fixed, Range, Choices]


@dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter lrsearch knows: its type, valid values, default and condition."""

    name: str
    kind: str  # "float", "int" or "category"
    expected: str
    valid: Callable[[Any], bool]
    default: Callable[[Mapping[str, Any], int], Any]
    used_when: tuple[str, tuple[str, ...]] | None = None
    choices: tuple[str, ...] = ()

    def applies(self, sampled: Mapping[str, Any]) -> bool:
        """Whether this hyperparameter means something given the values sampled before it."""
        if self.used_when is None:
            return True
        parent, values = self.used_when
        return sampled[parent] in values


def _const(value: Any) -> Callable[[Mapping[str, Any], int], Any]:
    return lambda sampled, epochs: value


def _category(name: str, choices: tuple[str, ...], default: str) -> Hyperparameter:
    return Hyperparameter(
        name, "category", "one of " + ", ".join(repr(c) for c in choices),
        lambda v: v in choices, _const(default), choices=choices,
    )


# Order matters: a hyperparameter's condition refers only to those above it.
HYPERPARAMETERS: dict[str, Hyperparameter] = {
    h.name: h
    for h in (
        _category("optimizer", OPTIMIZERS, "sgd"),
        Hyperparameter("lr", "float", "a number > 0", lambda v: v > 0,
                       lambda sampled, epochs: DEFAULT_LR[sampled["optimizer"]]),
        Hyperparameter(
            "momentum", "float", "a number in [0, 1)", lambda v: 0 <= v < 1, _const(0.0),
            used_when=("optimizer", MOMENTUM_OPTIMIZERS),
        ),
        _category("schedule", SCHEDULES, "constant"),
        Hyperparameter(
            "decay", "float", "a number >= 0", lambda v: v >= 0, _const(1e-3),
            used_when=("schedule", ("time_decay",)),
        ),
        Hyperparameter(
            "step_size", "int", "an integer >= 1 (epochs)", lambda v: v >= 1,
            lambda sampled, epochs: max(1, epochs // 4), used_when=("schedule", ("step",)),
        ),
        Hyperparameter(
            "gamma", "float", "a number in (0, 1]", lambda v: 0 < v <= 1,
            lambda sampled, epochs: 0.5 if sampled["schedule"] == "step" else 0.95,
            used_when=("schedule", ("step", "exponential")),
        ),
        Hyperparameter(
            "t_max", "int", "an integer >= 1 (epochs)", lambda v: v >= 1,
            lambda sampled, epochs: epochs, used_when=("schedule", ("cosine",)),
        ),
        Hyperparameter(
            "patience", "int", "an integer >= 0 (epochs)", lambda v: v >= 0, _const(10),
            used_when=("schedule", ("plateau",)),
        ),
        Hyperparameter(
            "factor", "float", "a number in (0, 1)", lambda v: 0 < v < 1, _const(0.1),
            used_when=("schedule", ("plateau",)),
        ),
    )
}


def sample_params(
    trial: optuna.trial.BaseTrial, space: Mapping[str, ParamSpec], epochs: int
) -> dict[str, Any]:
    """Sample every hyperparameter that applies, define-by-run.

    Declared entries (fixed, range or choices) are suggested to Optuna, so they are stored
    on the trial; undeclared ones take their default and are returned but not suggested.
    Works with a real trial or ``optuna.trial.FixedTrial``.
    """
    sampled: dict[str, Any] = {}
    for hp in HYPERPARAMETERS.values():
        if not hp.applies(sampled):
            continue
        spec = space.get(hp.name)
        sampled[hp.name] = (
            hp.default(sampled, epochs) if spec is None else _suggest(trial, hp, spec)
        )
    return sampled


def _suggest(trial: optuna.trial.BaseTrial, hp: Hyperparameter, spec: ParamSpec) -> Any:
    if isinstance(spec, Fixed):
        # A one-choice categorical records the value on the trial, so fixed values show
        # in `lrsearch best`, in SQL and on the grid like searched ones.
        return trial.suggest_categorical(hp.name, [spec.value])
    if isinstance(spec, Choices):
        return trial.suggest_categorical(hp.name, list(spec.values))
    if hp.kind == "int":
        step = int(spec.step or 1)
        return trial.suggest_int(hp.name, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(hp.name, spec.low, spec.high, log=spec.log, step=spec.step)


def grid_space(space: Mapping[str, ParamSpec]) -> dict[str, list[Any]]:
    """The GridSampler search space: every declared entry as its list of values."""
    grid: dict[str, list[Any]] = {}
    for name, spec in space.items():
        if isinstance(spec, Range):
            raise ValueError(f"{name} is a range; a grid needs choices")
        grid[name] = list(spec.values) if isinstance(spec, Choices) else [spec.value]
    return grid


def grid_size(space: Mapping[str, ParamSpec]) -> int:
    """How many points the grid of ``space`` has."""
    return math.prod(len(values) for values in grid_space(space).values())
