"""Population-based training inside one fit: at an epoch boundary, the members of a trial
array that are due exploit and explore (``choices/population.py`` decides who copies whom
and what it changes; the array copies the slices). An exploit is a slice copy of the
stacked weights and of the batched optimizer's state: no checkpoint is written or read."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrsearch.choices.population import PopulationConfig, explore, interval_for, pairs, seeded, sources
from lrsearch.choices.space import in_sampling_order

if TYPE_CHECKING:
    from lrsearch.choices.space import ParamSpec
    from lrsearch.fit.member import Member
    from lrsearch.fit.model import ArrayClassifier

# The metric a member's run logs at each exploit: the trial it copied (its number).
COPIED_FROM = "pbt/copied_from"


class Population:
    """The exploit-and-explore step of a population's members (an array's members at the
    same epoch: a study trains one population after another in the same fit)."""

    def __init__(
        self,
        config: PopulationConfig,
        space: Mapping[str, ParamSpec],
        metric: str,
        direction: str,
        epochs: int,
        seed: int | None,
    ) -> None:
        self.config = config
        self.space = space
        self.metric = metric
        self.direction = direction
        self.every = interval_for(epochs, config.interval)
        self.seed = seed
        self.seconds = 0.0  # spent in exploits (bench/pbt.py compares it with the training time)

    def step(self, array: ArrayClassifier, values: Sequence[Mapping[str, float]]) -> None:
        """After epoch boundary metrics (``values[slot]``, the array's members in slot order):
        every member that diverged copies a good one now; at every ``interval`` epochs but the
        last, the bottom of each population copies its top. Each copy is recorded on the
        copier's result (``exploits``) and history (``COPIED_FROM``)."""
        members = array.members
        # A member at its last epoch is about to end: no copy would train.
        going_on = [m.epoch + 1 < m.epochs for m in members]
        due = {
            m.epoch
            for m, on in zip(members, going_on)
            if on and (self._exploits_after(m.epoch) or m.result.diverged_at is not None)
        }
        if not due:
            return  # the common case, every boundary
        started = time.perf_counter()
        by_epoch: dict[int, list[int]] = {}
        for slot, (m, on) in enumerate(zip(members, going_on)):
            if on and m.epoch in due:
                by_epoch.setdefault(m.epoch, []).append(slot)
        copies: list[tuple[Member, Member, dict[str, Any], str]] = []
        for epoch, slots in by_epoch.items():
            numbers = {s: _number(members[s].key) for s in slots}
            peers = sorted(slots, key=numbers.__getitem__)
            scores = [values[s].get(self.metric, math.nan) for s in peers]
            rng = seeded(self.seed, epoch, [members[s].key for s in peers])
            broken = [i for i, s in enumerate(peers) if members[s].result.diverged_at is not None]
            chosen = sources(scores, broken, self.direction, self.config.quantile, rng) if broken else []
            why = {i: f"diverged (non-finite {members[peers[i]].result.diverged_on})" for i, _ in chosen}
            if self._exploits_after(epoch):  # ranked among the members that did not diverge
                fine = [i for i in range(len(peers)) if i not in broken]
                for i, source in pairs([scores[i] for i in fine], self.direction, self.config.quantile, rng):
                    chosen.append((fine[i], fine[source]))
                    why[fine[i]] = f"{self.metric} {scores[fine[i]]:.4g} in the bottom {self.config.quantile:g}"
            for i, source in chosen:
                copier, original = members[peers[i]], members[peers[source]]
                copies.append((copier, original, explore(original.hp, self.space, self.config, rng), why[i]))
        for copier, original, hp, reason in copies:
            epoch = copier.epoch
            copier.result.exploits.append(
                {
                    "epoch": epoch,
                    "source": _number(original.key),
                    "reason": reason,
                    "before": in_sampling_order(dict(copier.hp)),
                    "after": in_sampling_order(hp),
                }
            )
            copier.result.logger.log_metrics({COPIED_FROM: float(_number(original.key))}, step=epoch)
            copier.result.diverged_at = copier.result.diverged_on = None
        if copies:
            array.copy_members([(copier, original, hp) for copier, original, hp, _ in copies])
        self.seconds += time.perf_counter() - started

    def _exploits_after(self, epoch: int) -> bool:
        """Whether the members that finish ``epoch`` are ranked and the bottom copy the top."""
        return (epoch + 1) % self.every == 0


def _number(key: str) -> int:
    """A member's trial number (its key in a study's array)."""
    return int(key) if key.isdigit() else -1
