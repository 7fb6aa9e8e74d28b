"""Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural
Networks"): the ``[pbt]`` section of a study file, which hyperparameters may change while a
network trains, and the exploit-and-explore decisions, as Ray Tune's
``PopulationBasedTraining`` makes them (``synch=True``: the population in lockstep).

A population is a trial array (``fit/population.py`` applies these decisions to its stacked
tensors). Every ``interval`` epochs its members are ranked on the study's metric; each of
the bottom ``quantile`` copies a member of the top ``quantile`` (weights, optimizer state
and hyperparameters), then explores: each hyperparameter that may change is drawn afresh
from its ``[params]`` range with probability ``resample``, else multiplied by one of the
``perturb`` factors (and kept inside its range). What the learning rate does over a
member's epochs is then a schedule the search found, not one it chose from a list.

Pure Python: no torch, no Optuna (reading a study file imports neither).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lrsearch.choices.space import HYPERPARAMETERS, Choices, Find, Fixed, ParamSpec, Range
from lrsearch.core.constraints import Interval, Satisfies, declared

MAX_POPULATION = 256  # config.MAX_ARRAY: a population trains as one array


@dataclass(frozen=True)
class PopulationConfig:
    """The ``[pbt]`` section (only with ``[study] sampler = "pbt"``)."""

    # Members trained together, as one trial array (the study's `trials` counts members: a
    # study of more trials trains one population after another).
    population: int = declared(int, 16, Interval(int, 2, MAX_POPULATION))
    # Epochs between exploits; None: see interval_for.
    interval: int | None = declared(int, None, Interval(int, 1, None, unit="epochs"), unset="epochs / 8, at least 1")
    # The bottom fraction that copies the top fraction (Ray Tune's quantile_fraction).
    quantile: float = declared(float, 0.25, Interval(float, 0, 0.5, closed="right"))
    # Factors a copied continuous hyperparameter is multiplied by, one drawn at random.
    perturb: tuple[float, ...] = declared(
        list,
        (0.8, 1.2),
        Satisfies(
            "a list of 1 to 8 positive numbers",
            lambda v: 1 <= len(v) <= 8 and all(type(x) in (int, float) and 0 < x < math.inf for x in v),
        ),
    )
    # The probability of drawing a copied hyperparameter afresh from its range instead.
    resample: float = declared(float, 0.25, Interval(float, 0, 1))


def interval_for(epochs: int, interval: int | None) -> int:
    """Epochs between exploits: ``[pbt].interval``, else 8 exploits over the run (Jaderberg
    et al. exploit every few thousand of tens of thousands of steps)."""
    return interval or max(1, epochs // 8)


@functools.cache
def mutable() -> tuple[str, ...]:
    """The hyperparameters PBT changes while a member trains (``Hyperparameter.changes``)."""
    return tuple(name for name, hp in HYPERPARAMETERS.items() if hp.changes)


def refusal(name: str, spec: ParamSpec) -> str | None:
    """Why PBT cannot take ``[params].name = spec``, or None. The learning rate, momentum
    and weight decay change in place in the batched optimizer (``[K, 1, 1]`` tensors): as a
    range they are perturbed, as one value they are kept; the optimizer (and Nesterov)
    travels with the copied state. A schedule would fight the discovered one: PBT trains
    with the constant schedule, so neither a schedule nor a schedule's option nor a warm-up
    can be asked for."""
    hp = HYPERPARAMETERS[name]
    if hp.changes:
        if isinstance(spec, Choices):
            return (
                "expected a range { low, high } or one value for sampler 'pbt' (it perturbs a value within its range)"
            )
        return None
    if name == "schedule":
        if isinstance(spec, Fixed) and spec.value == "constant":
            return None
        return (
            "expected no schedule (or \"constant\") for sampler 'pbt': the schedule is what it discovers, "
            "by changing lr as the members train"
        )
    if hp.owner == "schedule":
        return f"expected no {name} for sampler 'pbt': it trains with the constant schedule, which takes none"
    if name == "warmup_epochs":
        if isinstance(spec, Fixed) and spec.value == 0:
            return None
        return "expected no warm-up for sampler 'pbt': the schedule, warm-up included, is what it discovers"
    return None


def changeable(space: Mapping[str, ParamSpec]) -> list[str]:
    """The hyperparameters of ``space`` PBT can change: ranges of those that change, for an
    optimizer the study may use that takes them (a momentum range with Adam alone never
    applies)."""
    from lrsearch.choices.optimizers import OPTIMIZERS

    spec = space.get("optimizer")
    optimizers = (
        spec.values
        if isinstance(spec, Choices)
        else (spec.value,)
        if isinstance(spec, Fixed)
        else (HYPERPARAMETERS["optimizer"].default,)
    )
    out = []
    for name in mutable():
        if not isinstance(space.get(name), (Range, Find)):
            continue
        if HYPERPARAMETERS[name].owner == "optimizer" and not any(name in OPTIMIZERS[o].options for o in optimizers):
            continue
        out.append(name)
    return out


def role(name: str) -> str:
    """What population-based training does with ``[params].name`` (the docs' table of
    hyperparameters says it; ``refusal`` enforces it)."""
    hp = HYPERPARAMETERS[name]
    if hp.changes:
        return "changes as the members train (a range), or kept (one value)"
    if name == "schedule":
        return "`constant` only"
    if hp.owner == "schedule" or name == "warmup_epochs":
        return "not with `pbt`"
    return "copied with its member's state"


def explore(
    hp: Mapping[str, Any], space: Mapping[str, ParamSpec], config: PopulationConfig, rng: random.Random
) -> dict[str, Any]:
    """A copied member's hyperparameters: its source's ``hp``, each one that may change and
    is searched over a range drawn afresh (probability ``resample``) or multiplied by a
    ``perturb`` factor, and kept inside its range."""
    new = dict(hp)
    for name in mutable():
        spec = space.get(name)
        if name not in hp or not isinstance(spec, (Range, Find)):
            continue
        assert isinstance(spec, Range), "lr = { find = true } is resolved when the study is created"
        if rng.random() < config.resample:
            value = _draw(spec, rng)
        else:
            value = hp[name] * rng.choice(config.perturb)
        new[name] = _on_grid(min(max(value, spec.low), spec.high), spec)
    if new.get("nesterov") and not new.get("momentum"):  # Nesterov needs a momentum (space.py's rule)
        new["nesterov"] = False
    return new


def _on_grid(value: float, spec: Range) -> float:
    """``value`` on the range's step, if it has one (inside the range)."""
    if not spec.step:
        return value
    steps = round((value - spec.low) / spec.step)
    return min(spec.low + steps * spec.step, spec.high)


def _draw(spec: Range, rng: random.Random) -> float:
    if spec.log:
        return math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
    return rng.uniform(spec.low, spec.high)


def pairs(values: Sequence[float], direction: str, quantile: float, rng: random.Random) -> list[tuple[int, int]]:
    """``(copier, source)`` indices into ``values`` (the members' metric at one epoch, in
    their trials' order): each of the bottom ``quantile`` copies one of the top ``quantile``,
    drawn at random; ties go to the earlier member, and a non-finite value ranks last. As
    Ray Tune's PBT: ceil(K × quantile) each side, at most half the population."""
    order = _ranked(values, direction)
    n = min(math.ceil(len(values) * quantile), len(values) // 2)
    if n == 0:
        return []
    top, bottom = order[:n], order[-n:]
    return [(i, rng.choice(top)) for i in bottom]


def sources(
    values: Sequence[float], broken: Sequence[int], direction: str, quantile: float, rng: random.Random
) -> list[tuple[int, int]]:
    """``(copier, source)`` for the members that diverged (``broken``), replaced at once by
    a copy of a member of the top ``quantile`` of the others (none if every member broke)."""
    fine = [i for i in _ranked(values, direction) if i not in broken and math.isfinite(values[i])]
    if not fine:
        return []
    top = fine[: max(1, math.ceil(len(values) * quantile))]
    return [(i, rng.choice(top)) for i in broken]


def _ranked(values: Sequence[float], direction: str) -> list[int]:
    """Indices into ``values``, best first in ``direction``; ties to the earlier, a
    non-finite value last."""
    sign = -1.0 if direction == "maximize" else 1.0
    return sorted(
        range(len(values)),
        key=lambda i: (not math.isfinite(values[i]), sign * values[i] if math.isfinite(values[i]) else 0, i),
    )


def seeded(study_seed: int | None, epoch: int, keys: Sequence[str]) -> random.Random:
    """The random stream of one exploit step: from the study's seed, the epoch and the
    members, so a study with a seed exploits the same way on every run and worker."""
    if study_seed is None:
        return random.Random()
    return random.Random(f"pbt:{study_seed}:{epoch}:{','.join(keys)}")
