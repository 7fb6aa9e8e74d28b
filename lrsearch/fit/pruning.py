"""Reports each trial's objective to Optuna every few epochs and ends the trials the pruner
gives up on."""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Container, Mapping

from optuna.exceptions import UpdateFinishedTrialError

from lrsearch.fit.member import Member


class Pruning:
    """Like optuna-integration's Lightning callback, for every member of a trial array, with
    three differences:

    - it checks every ``every`` epochs (at epochs every-1, 2*every-1, …; the step reported
      is the member's epoch), never at a member's last epoch, when it is about to end anyway;
    - the check (a storage write, and the pruner's reads) runs on a helper thread while the
      next epoch trains, and its verdict is applied at the end of that epoch: a pruned trial
      trains one epoch past the check that pruned it, always exactly one, so results stay
      reproducible; the members checked at one epoch boundary are checked together: their
      values written in one transaction, the pruner deciding each on one read of the study;
    - it never raises inside ``fit`` (which Lightning would record as a crash): the member
      leaves the array, and the caller ends its trial PRUNED.

    Call :meth:`close` once ``fit`` returns or raises.
    """

    def __init__(self, metric: str, every: int = 1) -> None:
        self.metric = metric
        self.every = every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsearch-pruning")
        self._due: list[tuple[Member, float, int]] = []

    def epoch_end(self, member: Member, metrics: Mapping[str, float], *, last: bool, stopping: bool) -> None:
        """At the end of ``member``'s epoch (``member.epoch`` not yet advanced): the verdict
        of its last check, then, if due, its next check."""
        self._apply_verdict(member)
        epoch = member.epoch
        if member.ended_early or stopping or last or (epoch + 1) % self.every:
            return
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return  # a non-finite loss ends the trial through the array, not the pruner
        self._due.append((member, value, epoch))

    def submit(self) -> None:
        """Start the checks due at this epoch boundary (after every member's ``epoch_end``)."""
        if self._due:
            due, self._due = self._due, []
            checks = self._executor.submit(_check, due)
            for member, _, epoch in due:
                member.pending = (epoch, checks)

    def settle(self, member: Member) -> None:
        """Wait for a check of a leaving member still running (it writes to the trial)."""
        if member.pending is not None:
            member.pending[1].exception()
            member.pending = None

    def close(self, members: list[Member]) -> None:
        for member in members:
            self.settle(member)
        self._executor.shutdown()

    def _apply_verdict(self, member: Member) -> None:
        if member.pending is None:
            return
        epoch, checks = member.pending
        member.pending = None
        if member in checks.result():  # waits if the checks are still running; re-raises their error
            member.result.pruned_at = epoch


def _check(due: list[tuple[Member, float, int]]) -> set[Member]:
    """Report each member's value at its epoch, and return those the pruner gives up on:
    ``Trial.report`` and ``Trial.should_prune`` for each, with one transaction for all the
    writes and one read of the study's trials for all the verdicts."""
    trials = [member.trial for member, _, _ in due]
    storage = trials[0].storage
    taken: set[Member] = set()  # ended by another worker (see worker._stale_trials): they leave too
    together = hasattr(storage, "set_trial_intermediate_values")  # else a storage of Optuna's own (tests)
    if together:
        try:
            storage.set_trial_intermediate_values({t._trial_id: (epoch, value)
                                                   for t, (_, value, epoch) in zip(trials, due)})
            for trial, (_, value, epoch) in zip(trials, due):
                trial._cached_frozen_trial.intermediate_values[epoch] = value  # as Trial.report keeps it
        except UpdateFinishedTrialError:  # one of them was taken: which, one write each tells
            together = False
    if not together:
        for trial, (member, value, epoch) in zip(trials, due):
            try:
                trial.report(value, epoch)
            except UpdateFinishedTrialError:
                taken.add(member)
    study = _Snapshot(trials[0].study)
    pruned = set()
    for member, _, _ in due:
        if member in taken:
            continue
        try:
            if study.pruner.prune(study, member.trial._get_latest_trial()):  # what Trial.should_prune does
                pruned.add(member)
        except UpdateFinishedTrialError:  # successive halving writes its rung to the trial: taken since
            taken.add(member)
    return taken | pruned


class _Snapshot:
    """A study whose finished trials are read once, for the verdicts on every member of a
    check (the median pruner reads the COMPLETE trials for each). Queries that include
    running trials go to the study: successive halving writes a member's rung, and the next
    member's verdict must see it, as when each checked alone."""

    def __init__(self, study: Any) -> None:
        self._study = study
        self._read: dict[Any, Any] = {}

    def get_trials(self, deepcopy: bool = True, states: Container[Any] | None = None) -> list[Any]:
        if states is None or not all(s.is_finished() for s in states):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        key = tuple(states)
        if key not in self._read:
            self._read[key] = self._study.get_trials(deepcopy=False, states=states)
        return copy.deepcopy(self._read[key]) if deepcopy else self._read[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)
