"""The search space: which hyperparameters exist, when each applies, and how a trial samples them.

Sampling is define-by-run: a hyperparameter is suggested only when the values sampled
before it make it meaningful (``momentum`` only for optimizers that have one, ``decay``
only with the ``time_decay`` schedule), so it never appears on a trial where it means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.choices.schedules import SCHEDULES, schedule_epochs
from lrsearch.core.constraints import POSITIVE, Constraint, Interval, Options, Satisfies
from lrsearch.core.registry import Registry, resolve

if TYPE_CHECKING:
    import optuna


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


@dataclass(frozen=True)
class Find:
    """``lr = { find = true }``: a log range ``factor`` times either side of the range test's
    suggestion, resolved once when the study is created (lr_find.py) and stored with it."""

    factor: float = 10.0


# A find table's factor, in the study file and on `lrsearch lr-find --factor`.
FIND_FACTOR = Satisfies("a number > 1", lambda v: 1 < v < math.inf)


ParamSpec = Fixed | Range | Choices | Find


def resolve_find(space: Mapping[str, ParamSpec], low: float, high: float) -> dict[str, ParamSpec]:
    """``space`` with a ``Find`` spec replaced by the log range it resolved to."""
    return {name: Range(low, high, log=True) if isinstance(spec, Find) else spec for name, spec in space.items()}


# The registries whose chosen entry decides which other hyperparameters apply.
_OWNERS: dict[str, Registry] = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}


@dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter lrsearch knows: its type, valid values, default and condition.

    A hyperparameter with an ``owner`` ("optimizer" or "schedule") applies when the chosen
    optimizer's or schedule's registry entry lists it among its options, with the default
    the entry gives; ``requires`` adds a condition on a value sampled before it.
    """

    name: str
    kind: str  # "float", "int", "bool" or "category"
    constraint: Constraint  # its check, and the words of its error messages
    doc: str
    default: Any = None  # a value, or a function of the values sampled before it
    owner: str | None = None
    requires: tuple[str, Callable[[Any], bool], str] | None = None  # (name, test, as text)
    choices: tuple[Any, ...] = ()
    optional: bool = False  # undeclared: left out of a trial's hyperparameters (its default changes nothing)
    # Population-based training may change it while a member trains (choices/population.py):
    # a per-member value of the batched optimizer, changed in place.
    changes: bool = False

    @property
    def expected(self) -> str:
        return self.constraint.expected

    def valid(self, value: Any) -> bool:
        return self.constraint(value)

    def applies(self, sampled: Mapping[str, Any]) -> bool:
        """Whether this hyperparameter means something given the values sampled before it."""
        if self.owner is not None and self.name not in _OWNERS[self.owner][sampled[self.owner]].options:
            return False
        if self.requires is not None:
            name, test, _ = self.requires
            return name in sampled and test(sampled[name])
        return True

    def default_for(self, sampled: Mapping[str, Any], epochs: int) -> Any:
        """The value an undeclared hyperparameter takes on a trial."""
        if self.owner is not None:
            return resolve(_OWNERS[self.owner][sampled[self.owner]].options[self.name], epochs)
        return self.default(sampled) if callable(self.default) else self.default


def _category(name: str, registry: Registry, default: str, doc: str) -> Hyperparameter:
    return Hyperparameter(name, "category", Options(registry.names), doc, default, choices=registry.names)


def _choice(name: str, values: tuple[str, ...], doc: str, owner: str) -> Hyperparameter:
    return Hyperparameter(name, "category", Options(values), doc, owner=owner, choices=values)


# Order matters: this is the sampling order, and a condition refers only to those above it.
HYPERPARAMETERS: dict[str, Hyperparameter] = {
    h.name: h
    for h in (
        _category("optimizer", OPTIMIZERS, "sgd", "the optimizer (table below)"),
        Hyperparameter(
            "lr",
            "float",
            POSITIVE,
            "the (initial) learning rate",
            lambda sampled: OPTIMIZERS[sampled["optimizer"]].default_lr,
            changes=True,
        ),
        Hyperparameter(
            "momentum", "float", Interval(float, 0, 1, closed="left"), "momentum", owner="optimizer", changes=True
        ),
        Hyperparameter(
            "nesterov",
            "bool",
            Satisfies("true or false", lambda v: isinstance(v, bool)),
            "Nesterov's momentum",
            owner="optimizer",
            requires=("momentum", lambda v: v > 0, "momentum > 0"),
            choices=(True, False),
        ),
        Hyperparameter(
            "weight_decay",
            "float",
            Interval(float, 0, None),
            "decoupled weight decay (per update: w -= lr · weight_decay · w)",
            owner="optimizer",
            changes=True,
        ),
        Hyperparameter(
            "warmup_epochs",
            "int",
            Interval(int, 0, None, unit="epochs"),
            "epochs of linear warm-up (update by update, up to the rate the schedule starts at) before any schedule",
            0,
            optional=True,
        ),
        _category("schedule", SCHEDULES, "constant", "the learning-rate schedule (table below)"),
        Hyperparameter("decay", "float", Interval(float, 0, None), "time_decay's decay", owner="schedule"),
        Hyperparameter(
            "step_size", "int", Interval(int, 1, None, unit="epochs"), "epochs between steps", owner="schedule"
        ),
        Hyperparameter(
            "gamma",
            "float",
            Interval(float, 0, 1, closed="right"),
            "the factor per step (step) or per epoch (exponential)",
            owner="schedule",
        ),
        Hyperparameter(
            "t_max", "int", Interval(int, 1, None, unit="epochs"), "epochs to anneal over", owner="schedule"
        ),
        Hyperparameter(
            "patience",
            "int",
            Interval(int, 0, None, unit="epochs"),
            "epochs without improvement before a cut",
            owner="schedule",
        ),
        Hyperparameter(
            "factor", "float", Interval(float, 0, 1, closed="neither"), "the factor of each cut", owner="schedule"
        ),
        Hyperparameter(
            "pct_start",
            "float",
            Interval(float, 0, 1, closed="neither"),
            "the fraction of the updates spent rising to `lr`",
            owner="schedule",
        ),
        _choice("anneal", ("cos", "linear"), "how the rate rises and falls", owner="schedule"),
        _choice(
            "mode", ("triangular", "triangular2"), "triangles of equal height, or halved each cycle", owner="schedule"
        ),
        Hyperparameter(
            "base_fraction",
            "float",
            Interval(float, 0, 1, closed="neither"),
            "the cycle's lowest rate, as a fraction of `lr`",
            owner="schedule",
        ),
        Hyperparameter(
            "half_cycle",
            "int",
            Interval(int, 1, None, unit="epochs"),
            "epochs from the lowest rate to `lr` (and as many back)",
            owner="schedule",
        ),
    )
}


def _check_registries() -> None:
    """Every option an optimizer or schedule names is a hyperparameter of its owner."""
    for owner, registry in _OWNERS.items():
        for entry in registry:
            for option in entry.options:
                hp = HYPERPARAMETERS.get(option)
                if hp is None or hp.owner != owner:
                    raise AssertionError(
                        f"{registry.kind} {entry.name!r} takes {option!r}, "
                        f"which is not a hyperparameter owned by {owner!r}"
                    )


_check_registries()


def in_sampling_order(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` in the order hyperparameters are sampled (names lrsearch does not know,
    from studies it did not run, after them in their own order): one order everywhere."""
    known = [name for name in HYPERPARAMETERS if name in params]
    return {name: params[name] for name in [*known, *(k for k in params if k not in HYPERPARAMETERS)]}


def sample_params(trial: optuna.trial.BaseTrial, space: Mapping[str, ParamSpec], epochs: int) -> dict[str, Any]:
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
        if spec is None and hp.optional:
            continue
        sampled[hp.name] = (
            hp.default_for(sampled, schedule_epochs(epochs, sampled)) if spec is None else _suggest(trial, hp, spec)
        )
    return sampled


def _suggest(trial: optuna.trial.BaseTrial, hp: Hyperparameter, spec: ParamSpec) -> Any:
    if isinstance(spec, Find):
        raise ValueError(f"{hp.name} = {{ find = true }} must be resolved (resolve_find) before sampling")
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
        if isinstance(spec, Find):
            raise ValueError(f"{name} is found by the range test; a grid needs choices")
        grid[name] = list(spec.values) if isinstance(spec, Choices) else [spec.value]
    return grid


def grid_size(space: Mapping[str, ParamSpec]) -> int:
    """How many points the grid of ``space`` has."""
    return math.prod(len(values) for values in grid_space(space).values())
