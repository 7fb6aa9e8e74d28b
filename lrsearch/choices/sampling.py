"""Samplers and pruners a study can name: one registry entry each (its Optuna factory and
docs line). Optuna is imported when a factory is called, so reading a study file does not."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lrsearch.choices.space import grid_space
from lrsearch.core.registry import Registry

if TYPE_CHECKING:
    import optuna

    from lrsearch.choices.space import ParamSpec


@dataclass(frozen=True)
class Sampler:
    name: str
    doc: str
    make: Callable[[Mapping[str, ParamSpec], int | None], optuna.samplers.BaseSampler]  # ([params], seed)
    learns: bool = False  # proposes from the trials that finished (so arrays delay what it learns)


@dataclass(frozen=True)
class Pruner:
    name: str
    doc: str
    make: Callable[[int, int], optuna.pruners.BasePruner]  # (epochs, epochs between checks)
    verdict: str = ""  # why it stops a trial, as a pruning reason says it


# Pruning checks per trial when the study file does not set [study].prune_every. The first
# check (epoch epochs/5 - 1) is the first after the median pruner's warm-up of epochs/10:
# a check inside the warm-up would cost a write and a read to decide nothing.
CHECKS_PER_TRIAL = 5


def check_interval(epochs: int, prune_every: int | None = None) -> int:
    """Epochs between pruning checks: ``[study].prune_every``, else about 5 checks a trial.

    Each check is a write to Optuna's storage and, for the median pruner, a read of every
    trial of the study (about ten SQL statements): checking every epoch would cost more
    than the epoch itself.
    """
    return prune_every or max(1, epochs // CHECKS_PER_TRIAL)


def _tpe(params: Mapping[str, ParamSpec], seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    # multivariate + group: TPE models the parameters that occur together (momentum only
    # with sgd and rmsprop, decay only with time_decay, …) jointly, as Optuna advises for
    # define-by-run spaces; constant liar keeps parallel workers apart.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def _random(params: Mapping[str, ParamSpec], seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(params: Mapping[str, ParamSpec], seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, minus its only ``after_trial`` work: calling ``Study.stop``
        once the grid is done, which ends ``study.optimize`` but fails outside it. The worker
        loop asks and tells trials itself and ends at the study's total, the grid's size."""

        def after_trial(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            state: optuna.trial.TrialState,
            values: Sequence[float] | None,
        ) -> None:
            pass

    return GridSampler(grid_space(params), seed=seed)


def _qmc(params: Mapping[str, ParamSpec], seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def _pbt(params: Mapping[str, ParamSpec], seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)  # the first draw; the population does the rest


SAMPLERS: Registry[Sampler] = Registry(
    "sampler",
    [
        Sampler(
            "tpe", "Optuna's TPE: multivariate, grouped, with constant liar for parallel workers", _tpe, learns=True
        ),
        Sampler("random", "independent uniform (or log-uniform) draws", _random),
        Sampler("grid", "every combination of the [params] choices (fixed values and choices lists only)", _grid),
        Sampler("qmc", "quasi-Monte Carlo (Sobol) points, spread more evenly than random ones", _qmc),
        Sampler(
            "pbt",
            "population-based training: a population (drawn at random) trains together; every "
            "[pbt].interval epochs its worst members copy its best and perturb their lr, momentum and "
            "weight decay",
            _pbt,
        ),
    ],
)


def _median(epochs: int, every: int) -> optuna.pruners.BasePruner:
    from lrsearch.choices.pruners import PeerPercentilePruner

    return PeerPercentilePruner(50.0, n_startup_trials=5, n_warmup_steps=max(1, epochs // 10))


def _hyperband(epochs: int, every: int) -> optuna.pruners.BasePruner:
    from lrsearch.choices.pruners import ArrayHyperbandPruner

    return ArrayHyperbandPruner(min_resource=every, max_resource=epochs, reduction_factor=3)


def _successive_halving(epochs: int, every: int) -> optuna.pruners.BasePruner:
    from lrsearch.choices.pruners import ArrayHalvingPruner

    return ArrayHalvingPruner(min_resource=every, reduction_factor=4)


def _none(epochs: int, every: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: Registry[Pruner] = Registry(
    "pruner",
    [
        Pruner("none", "every trial trains all its epochs (nothing is reported to Optuna while it trains)", _none),
        Pruner(
            "median",
            "stop a trial below the median of the complete and running trials at the same epoch "
            "(once 5 have reached it, after epochs/10 epochs)",
            _median,
            "worse than the median of the other trials at that epoch",
        ),
        Pruner(
            "hyperband",
            "Hyperband over successive-halving brackets, from one check interval to all epochs",
            _hyperband,
            "not in the top third of its Hyperband bracket at that epoch",
        ),
        Pruner(
            "successive_halving",
            "asynchronous successive halving, rungs from one check interval up, each "
            "4 times the last (Optuna's reduction factor)",
            _successive_halving,
            "not in the top quarter of its rung at that epoch",
        ),
    ],
)


# Measured on studies/search.toml (20 seeds, time from the first trial to 0.840): arrays
# of 8 that grow to a quarter of the finished trials reached it soonest with fixed 12 and
# "16, then a quarter" within the spread, and arrays of 4 a third later (docs/arrays.md).
FIRST_ARRAY = 8
TRIALS_PER_MEMBER = 4


def array_target(sampler: str, size: int, finished: int) -> int:
    """How many trials an ``auto`` array trains at once, ``size`` being the fastest per trial
    on this machine (``training.choose_array_size``) and ``finished`` the study's COMPLETE
    and PRUNED trials. A sampler that learns from finished trials proposes each trial
    knowing none of the array's other running trials (TPE counts them as bad: constant
    liar): the array grows with the study (docs/arrays.md, "How big")."""
    if not SAMPLERS[sampler].learns:
        return size
    return max(1, min(size, max(FIRST_ARRAY, finished // TRIALS_PER_MEMBER)))


def make_sampler(
    name: str, params: Mapping[str, ParamSpec], study_seed: int | None, n_existing: int = 0, worker: int = 0
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` over ``params`` (a study file's [study].sampler, [params] and
    seed). A seeded sampler's seed is derived from the study seed, the trials already run
    and the worker's index: a resumed study continues its sequence instead of proposing its
    first trials again, and parallel workers never share a seed (which would make them
    propose the same trials)."""
    seed = None
    if study_seed is not None:
        seed = (study_seed + 7919 * n_existing + 104729 * worker) % 2**31
    return SAMPLERS[name].make(params, seed)


def make_pruner(name: str, epochs: int, prune_every: int | None = None) -> optuna.pruners.BasePruner:
    """The pruner ``name`` for trials of ``epochs`` epochs (its steps), checked every
    ``check_interval(epochs, prune_every)`` epochs."""
    return PRUNERS[name].make(epochs, check_interval(epochs, prune_every))
