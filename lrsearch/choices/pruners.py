"""Optuna pruners that judge a trial against every trial that reached its step, running
ones included: the trials of an array train in lockstep, so at a check every member's
value at that step is known together, and the first array of a study is judged among
itself instead of waiting for trials to complete.

Each is an ordinary Optuna pruner (``study.optimize`` can use it) that reads what other
workers stored: intermediate values, and successive halving's rung records
(``completed_rung_<k>``, as Optuna's own pruner names them). A pruner that records something
for a trial before judging it says what in :meth:`records`, so that the trials checked at
one epoch boundary are all recorded first and judged together (``fit/pruning.py``).

Resources are epochs trained: a trial that reported at step ``s`` (its epoch, counted from
0) has trained ``s + 1``.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Collection, Container
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# The trials the percentile pruner compares with.
PEER_STATES = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)


def rung_key(rung: int) -> str:
    """A trial's record of its value at rung ``rung`` (a system attribute), as Optuna's
    ``SuccessiveHalvingPruner`` names it."""
    return f"completed_rung_{rung}"


class PeerPercentilePruner(BasePruner):
    """Optuna's percentile pruner (the median pruner at 50), over the values the COMPLETE
    trials, the other RUNNING ones and the PRUNED ones reported at the same step (a PRUNED
    trial that stopped before it: its last value): prune a trial whose best
    value so far is worse than the ``percentile`` of theirs, once ``n_startup_trials`` of
    them have reached that step and after ``n_warmup_steps``. One trial at a time, it is
    Optuna's own; in an array, the members judge each other as they go. (Optuna's reads
    COMPLETE trials only: a study's first array runs before any trial completes, and none
    of its trials could be pruned.)"""

    def __init__(self, percentile: float = 50.0, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> None:
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        peers = [v for number, v in peer_values(study, step) if number != trial.number and not math.isnan(v)]
        if len(peers) < max(1, self.n_startup_trials):
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        mine = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        if not mine:
            return True
        best = max(mine) if maximize else min(mine)
        cut = float(np.percentile(peers, 100 - self.percentile if maximize else self.percentile))
        return best < cut if maximize else best > cut


# study (Any, here and below): an Optuna study, or a view of one that answers get_trials (a
# pruning check's snapshot, fit/pruning.py; a Hyperband bracket): they share no class.
def peer_values(study: Any, step: int) -> list[tuple[int, float]]:
    """(trial number, value at ``step``) of every trial that has one (see :func:`_at`): from
    the study's ``values_at`` where it has one (a pruning check's snapshot: one query), else
    from its trials."""
    fast = getattr(study, "values_at", None)
    if fast is not None:
        return fast(step)
    return [
        (t.number, v) for t in study.get_trials(deepcopy=False, states=PEER_STATES) if (v := _at(t, step)) is not None
    ]


def _at(trial: FrozenTrial, step: int) -> float | None:
    """A trial's value at ``step``: reported there, or for a trial pruned before it, its last
    report (it stopped because it was behind: it counts as behind still)."""
    values = trial.intermediate_values
    if step in values:
        return values[step]
    if trial.state == TrialState.PRUNED and values and max(values) < step:
        return values[max(values)]
    return None


class ArrayHalvingPruner(BasePruner):
    """Asynchronous successive halving (ASHA, Li et al. 2020), as Optuna's
    ``SuccessiveHalvingPruner``: rung ``k`` is reached after ``min_resource *
    reduction_factor ** (min_early_stopping_rate + k)`` epochs; there a trial records its
    value, and goes on only if it is in the top ``1 / reduction_factor`` of the values
    recorded at that rung (the first ones, while fewer than ``reduction_factor`` are there,
    only if best so far). With explicit resources (Optuna's ``"auto"`` waits for a trial to
    complete) and each value counted once, the trial's own included: the members of an
    array record theirs first (:meth:`records`) and are then ranked together."""

    def __init__(self, min_resource: int, reduction_factor: int = 4, min_early_stopping_rate: int = 0) -> None:
        if min_resource < 1 or reduction_factor < 2 or min_early_stopping_rate < 0:
            raise ValueError(
                f"bad successive halving: min_resource={min_resource}, reduction_factor="
                f"{reduction_factor}, min_early_stopping_rate={min_early_stopping_rate}"
            )
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.min_early_stopping_rate = min_early_stopping_rate

    def rung_resource(self, rung: int) -> int:
        """Epochs a trial has trained when it reaches ``rung``."""
        return self.min_resource * self.reduction_factor ** (self.min_early_stopping_rate + rung)

    def records(self, trial: FrozenTrial) -> dict[str, float]:
        """What the trial records at its last step before it is judged: its value at the
        first rung it reaches there (none if it reaches none)."""
        step = trial.last_step
        if step is None:
            return {}
        rung = _rungs_done(trial)
        if step + 1 < self.rung_resource(rung):
            return {}
        return {rung_key(rung): trial.intermediate_values[step]}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.judge(study, trial)

    def judge(self, study: Any, trial: FrozenTrial, recorded: Collection[str] = ()) -> bool:
        """:meth:`prune`, for a trial whose :meth:`records` (their keys: ``recorded``) were
        stored just before."""
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        rung = _rungs_done(trial, recorded)
        trials: list[FrozenTrial] | None = None
        while step + 1 >= self.rung_resource(rung):
            if math.isnan(value):
                return True
            if trials is None:
                trials = study.get_trials(deepcopy=False)
            key = rung_key(rung)
            if trial.system_attrs.get(key) != value:  # not recorded before (trained alone, or a rung more)
                study._storage.set_trial_system_attr(trial._trial_id, key, value)
            others = [t.system_attrs[key] for t in trials if t.number != trial.number and key in t.system_attrs]
            if not _promoted(value, others, self.reduction_factor, study.direction):
                return True
            rung += 1
        return False


class ArrayHyperbandPruner(BasePruner):
    """Hyperband (Li et al., JMLR 2018) as Optuna's ``HyperbandPruner`` runs it: trials are
    spread over brackets of successive halving that start to halve at different rungs, each
    trial's bracket drawn from its study's name and number, and a trial competes only with
    its bracket's. Its brackets are :class:`ArrayHalvingPruner`s (explicit resources, members
    ranked together)."""

    def __init__(self, min_resource: int, max_resource: int, reduction_factor: int = 3) -> None:
        if max_resource < min_resource:
            raise ValueError(f"bad Hyperband: max_resource={max_resource} < min_resource={min_resource}")
        self.reduction_factor = reduction_factor
        n = math.floor(math.log(max_resource / min_resource, reduction_factor)) + 1
        self.brackets = [ArrayHalvingPruner(min_resource, reduction_factor, s) for s in range(n)]
        # Trials per bracket, as the paper's n (Algorithm 1), in proportion.
        self.budgets = [math.ceil(n * reduction_factor ** (n - 1 - s) / (n - s)) for s in range(n)]

    def bracket(self, study_name: str, number: int) -> int:
        draw = binascii.crc32(f"{study_name}_{number}".encode()) % sum(self.budgets)
        for s, budget in enumerate(self.budgets):
            draw -= budget
            if draw < 0:
                return s
        raise AssertionError("unreachable")

    def records(self, trial: FrozenTrial, study_name: str) -> dict[str, float]:
        return self.brackets[self.bracket(study_name, trial.number)].records(trial)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.judge(study, trial)

    def judge(self, study: Any, trial: FrozenTrial, recorded: Collection[str] = ()) -> bool:
        s = self.bracket(study.study_name, trial.number)
        return self.brackets[s].judge(_Bracket(study, self, s), trial, recorded)


class _Bracket:
    """A study seen through one Hyperband bracket: its trials only."""

    def __init__(self, study: Any, pruner: ArrayHyperbandPruner, bracket: int) -> None:
        self._study = study
        self._pruner = pruner
        self._bracket = bracket

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        name = self._study.study_name
        return [
            t
            for t in self._study.get_trials(deepcopy=deepcopy, states=states)
            if self._pruner.bracket(name, t.number) == self._bracket
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def records(pruner: BasePruner, trial: FrozenTrial, study_name: str) -> dict[str, float]:
    """What ``pruner`` records for ``trial`` before judging it (system attributes), if anything."""
    if isinstance(pruner, ArrayHyperbandPruner):
        return pruner.records(trial, study_name)
    if isinstance(pruner, ArrayHalvingPruner):
        return pruner.records(trial)
    return {}


def judge(pruner: BasePruner, study: Any, trial: FrozenTrial, recorded: Collection[str] = ()) -> bool:
    """Whether ``pruner`` stops ``trial``, its :func:`records` (keys ``recorded``) stored just before."""
    if isinstance(pruner, (ArrayHalvingPruner, ArrayHyperbandPruner)):
        return pruner.judge(study, trial, recorded)
    return pruner.prune(study, trial)


def _rungs_done(trial: FrozenTrial, recorded: Collection[str] = ()) -> int:
    """The rungs the trial recorded before now (those in ``recorded`` were recorded now)."""
    rung = 0
    while rung_key(rung) in trial.system_attrs and rung_key(rung) not in recorded:
        rung += 1
    return rung


def _promoted(value: float, others: list[float], reduction_factor: int, direction: StudyDirection) -> bool:
    """Whether ``value`` is in the top 1/``reduction_factor`` of the rung's values (``others``
    and itself); while fewer than ``reduction_factor`` are there, whether it is the best."""
    values = sorted([*others, value], reverse=direction == StudyDirection.MAXIMIZE)
    cut = max(len(values) // reduction_factor - 1, 0)
    return value >= values[cut] if direction == StudyDirection.MAXIMIZE else value <= values[cut]
