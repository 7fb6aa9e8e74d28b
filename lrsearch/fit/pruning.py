"""Reports each trial's objective to Optuna every few epochs and ends the trials the pruner
gives up on, all the members of an array checked at one epoch boundary together."""

from __future__ import annotations

import copy
import math
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from optuna.exceptions import UpdateFinishedTrialError

from lrsearch.choices.pruners import judge, records
from lrsearch.fit.member import Member

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial, TrialState


class Pruning:
    """Like optuna-integration's Lightning callback, for every member of a trial array, with
    three differences:

    - it checks every ``every`` epochs (at epochs every-1, 2*every-1, …; the step reported
      is the member's epoch), never at a member's last epoch, when it is about to end anyway;
    - the members checked at one epoch boundary are checked together: their values (and what
      the pruner records before it judges, successive halving's rung values) are written in
      one transaction, then each is judged on one read of the study that holds them all, so
      the members of an array are ranked among each other as well as among earlier trials;
      a pruned member leaves at that boundary;
    - it never raises inside ``fit`` (which Lightning would record as a crash): the member
      leaves the array, and the caller ends its trial PRUNED.

    It runs on the training thread, between epochs: a helper thread's database work would
    take the interpreter's lock from every torch operation of the epoch it overlapped.
    """

    def __init__(self, metric: str, every: int = 1) -> None:
        self.metric = metric
        self.every = every

    def due(self, member: Member, metrics: Mapping[str, float], *, last: bool, stopping: bool) -> float | None:
        """The value ``member`` reports at the end of this epoch (``member.epoch`` not yet
        advanced), or None if it is not checked now."""
        if member.trial is None or member.ended_early or stopping or last or (member.epoch + 1) % self.every:
            return None
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return None  # a non-finite loss ends the trial through the array, not the pruner
        return value

    def check(self, due: Sequence[tuple[Member, float]]) -> None:
        """Report each member's value at its epoch and judge them all; a member the pruner
        gives up on (or whose trial another worker ended) gets ``pruned_at`` this epoch."""
        if not due:
            return
        for member in _check([(m, value, m.epoch) for m, value in due]):
            member.result.pruned_at = member.epoch


def _check(due: list[tuple[Member, float, int]]) -> set[Member]:
    """``Trial.report`` and ``Trial.should_prune`` for each member, with one transaction for
    all the writes and one read of the study's trials for all the verdicts."""
    trials = [_trial(member) for member, _, _ in due]
    study = trials[0].study
    storage: Any = trials[0].storage  # lrsearch's (report_trials), or Optuna's own in tests
    for trial, (_, value, epoch) in zip(trials, due):
        trial._cached_frozen_trial.intermediate_values[epoch] = value  # as Trial.report keeps it
    latest = {member: _trial(member)._get_latest_trial() for member, _, _ in due}
    recorded = {member: records(study.pruner, latest[member], study.study_name) for member, _, _ in due}
    taken: set[Member] = set()  # ended by another worker (see claims._stale_trials): they leave too
    together = hasattr(storage, "report_trials")  # else a storage of Optuna's own (tests)
    if together:
        try:
            storage.report_trials(
                {t._trial_id: (epoch, value) for t, (_, value, epoch) in zip(trials, due)},
                {_trial(m)._trial_id: recorded[m] for m, _, _ in due if recorded[m]},
            )
        except UpdateFinishedTrialError:  # one of them was taken: which, one write each tells
            together = False
    if not together:
        for trial, (member, value, epoch) in zip(trials, due):
            try:
                # (not Trial.report: the value is in the trial's cache already, which it would take as written)
                storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
                for key, item in recorded[member].items():
                    storage.set_trial_system_attr(trial._trial_id, key, item)
            except UpdateFinishedTrialError:
                taken.add(member)
    view = _Snapshot(study)
    pruned = set()
    for member, _, _ in due:
        if member in taken:
            continue
        try:
            if judge(study.pruner, view, _trial(member)._get_latest_trial(), recorded[member].keys()):
                pruned.add(member)
        except UpdateFinishedTrialError:  # a pruner's own write to the trial (a rung more): taken since
            taken.add(member)
    return taken | pruned


def _trial(member: Member) -> optuna.trial.Trial:
    """The Optuna trial of a member that reports (``Pruning.due`` checks only those)."""
    assert member.trial is not None
    return member.trial


class _Snapshot:
    """The study, its trials read once after the check's writes, for the verdicts on every
    member of the check (a pruner reads the study's trials for each); the values every trial
    reported at a step, read in one query where the storage can (the percentile pruner's
    need: ``pruners.peer_values``)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._trials: list[FrozenTrial] | None = None
        self._at: dict[int, list[tuple[int, float]]] = {}
        if hasattr(study._storage, "values_at"):
            self.values_at = self._values_at

    def _values_at(self, step: int) -> list[tuple[int, float]]:
        if step not in self._at:
            storage: Any = self._study._storage  # lrsearch's RetryingStorage (store/, above fit/)
            self._at[step] = storage.values_at(self._study._study_id, step)
        return self._at[step]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if self._trials is None:
            self._trials = self._study.get_trials(deepcopy=False)
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)
