"""Trial arrays: trials trained together, in one fit, train as each trains alone."""

from __future__ import annotations

import math

import pytest

from lrsearch.config import parse_config
from lrsearch.data import load_data
from lrsearch.member import Member
from lrsearch.optimizers import OPTIMIZERS
from lrsearch.schedules import SCHEDULES
from lrsearch.training import choose_array_size, fit_array, largest_array, member_bytes, train

CFG = parse_config({"study": {"name": "arrays", "pruner": "none"}, "train": {"epochs": 20}}, "arrays.toml")
DATA = load_data(CFG.data)
SCHEDULE_HP = {"time_decay": {"decay": 0.01}, "step": {"step_size": 3, "gamma": 0.5}, "exponential": {"gamma": 0.9},
               "cosine": {"t_max": 20}, "plateau": {"patience": 2, "factor": 0.5},
               "one_cycle": {"pct_start": 0.3, "anneal": "cos"},
               "cyclic": {"mode": "triangular2", "base_fraction": 0.1, "half_cycle": 2}}
OPTIMIZER_HP = {"sgd": {"momentum": 0.9, "nesterov": True}, "rmsprop": {"momentum": 0.5},
                "adamw": {"weight_decay": 0.05}}
LRS = (0.1, 0.03, 0.01, 0.003, 0.1, 0.05, 0.001, 0.02)


def _hp(optimizer: str, schedule: str, lr: float, warmup: int = 0) -> dict:
    hp = {"optimizer": optimizer, "lr": lr, "schedule": schedule,
          **OPTIMIZER_HP.get(optimizer, {}), **SCHEDULE_HP.get(schedule, {})}
    return {**hp, "warmup_epochs": warmup} if warmup else hp


def _curves(result) -> dict[str, list[float]]:
    return {k: [v for _, v, _ in points] for k, points in result.history.items()}


@pytest.mark.parametrize("shift", [0, 1, 2], ids=["first", "second", "third"])
def test_a_trial_in_an_array_of_8_trains_as_it_trains_alone(shift):
    """Every optimizer of the registry and every schedule, at rates up to 0.1, three pairings
    of them: per-epoch val/loss within 1e-4 over 20 epochs, the LR curve equal."""
    optimizers, schedules = list(OPTIMIZERS.names), list(SCHEDULES.names)
    hps = [_hp(optimizers[(i + shift) % len(optimizers)], schedules[i], LRS[i], warmup=2 if i % 3 == shift else 0)
           for i in range(8)]
    members = [Member(str(i), hp, 100 + i, CFG.train.epochs) for i, hp in enumerate(hps)]
    fit_array(CFG, DATA, members)
    for member in members:
        alone = _curves(train(CFG, DATA, member.hp, member.seed))
        together = _curves(member.result)
        assert len(together["val/loss"]) == 20 and member.result.epochs == 20
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], together["val/loss"])) < 1e-4, member.hp
        assert together["lr"] == alone["lr"], member.hp
        assert together["momentum"] == alone["momentum"], member.hp


def test_a_diverging_member_leaves_alone_and_the_others_train_on():
    calm = [Member(str(i), _hp("sgd", "constant", 0.05), i, 6) for i in range(3)]
    wild = Member("wild", _hp("sgd", "constant", 1e8), 9, 6)
    fit_array(CFG, DATA, [calm[0], wild, *calm[1:]])
    assert wild.result.diverged_on == "train/loss" and wild.result.epochs == wild.result.diverged_at + 1
    assert not math.isfinite(wild.result.final("train/loss"))
    for member in calm:
        alone = _curves(train(CFG.with_overrides(epochs=6), DATA, member.hp, member.seed))
        assert member.result.epochs == 6
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], _curves(member.result)["val/loss"])) < 1e-4


class _Host:
    """Fills each free slot with the next of ``queue`` and keeps who left, in order."""

    def __init__(self, queue: list[Member]) -> None:
        self.queue = queue
        self.left: list[tuple[str, int]] = []

    def leave(self, member: Member) -> None:
        self.left.append((member.key, member.result.epochs))

    def refill(self, free: int) -> list[Member]:
        taken, self.queue = self.queue[:free], self.queue[free:]
        return taken


def test_members_leave_when_they_end_and_new_ones_take_their_slots():
    """Members of different lengths leave at their own epochs; the host's new members join at
    that epoch boundary and train as they would alone (their LR curve starts at their epoch 0)."""
    first = [Member("a", _hp("adam", "cosine", 0.01), 1, 3), Member("b", _hp("sgd", "one_cycle", 0.1), 2, 7)]
    later = [Member("c", _hp("rmsprop", "step", 0.003), 3, 5), Member("d", _hp("adagrad", "time_decay", 0.05), 4, 2)]
    host = _Host(list(later))
    fit_array(CFG, DATA, first, host)
    # a leaves after 3 epochs, c takes its slot (epochs 3-7 of the fit); b leaves after 7, d takes its slot
    assert host.left == [("a", 3), ("b", 7), ("c", 5), ("d", 2)]
    for member in first + later:
        alone = _curves(train(CFG.with_overrides(epochs=member.epochs), DATA, member.hp, member.seed))
        together = _curves(member.result)
        assert [s for s, _, _ in member.result.history["lr"]] == list(range(member.epochs))
        assert together["lr"] == alone["lr"]
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], together["val/loss"])) < 1e-4


def test_auto_never_picks_an_array_larger_than_memory_or_the_study_allows():
    wide = parse_config({"study": {"name": "wide"}, "model": {"hidden": [4096, 4096]},
                         "data": {"n_samples": 20000, "n_features": 200}}, "wide.toml")
    data = load_data(wide.data)
    assert member_bytes(wide, data) > 100 * 2**20  # two 4096-wide layers and 10,000 validation rows
    assert largest_array(wide, data) <= 5
    assert largest_array(CFG, DATA) == 256
    assert choose_array_size(CFG, DATA, trials=3) == 1  # a quarter of a 3-trial TPE study: one
    assert choose_array_size(CFG, DATA, trials=64) in (4, 8, 16)
