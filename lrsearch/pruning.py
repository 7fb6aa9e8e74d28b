"""Reports each trial's objective to Optuna every few epochs and ends the trials the pruner
gives up on."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

from lrsearch.member import Member


class Pruning:
    """Like optuna-integration's Lightning callback, for every member of a trial array, with
    three differences:

    - it checks every ``every`` epochs (at epochs every-1, 2*every-1, …; the step reported
      is the member's epoch), never at a member's last epoch, when it is about to end anyway;
    - the check (a storage write, and the pruner's reads) runs on a helper thread while the
      next epoch trains, and its verdict is applied at the end of that epoch: a pruned trial
      trains one epoch past the check that pruned it, always exactly one, so results stay
      reproducible;
    - it never raises inside ``fit`` (which Lightning would record as a crash): the member
      leaves the array, and the caller ends its trial PRUNED.

    Call :meth:`close` once ``fit`` returns or raises.
    """

    def __init__(self, metric: str, every: int = 1) -> None:
        self.metric = metric
        self.every = every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsearch-pruning")

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
        member.pending = (epoch, self._executor.submit(_check, member, value, epoch))

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
        epoch, verdict = member.pending
        member.pending = None
        if verdict.result():  # waits if the check is still running; re-raises its error
            member.result.pruned_at = epoch


def _check(member: Member, value: float, epoch: int) -> bool:
    assert member.trial is not None
    member.trial.report(value, epoch)
    return member.trial.should_prune()
