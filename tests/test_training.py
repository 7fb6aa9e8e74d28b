"""Tiny real Lightning fits: what is logged, per epoch, under which names."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lrsearch.choices.data import load_data
from lrsearch.config import parse_config
from lrsearch.fit.training import train
from lrsearch.service.ending import outcome

CFG = parse_config({"study": {"name": "t"}, "train": {"epochs": 4, "batch_size": 50}}, "t.toml")
DATA = load_data(CFG.data)


def test_the_classic_blobs_problem():
    assert DATA.x_train.shape == (500, 2) and DATA.x_val.shape == (500, 2)
    assert DATA.n_classes == 3


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "adagrad"])
def test_every_optimizer_logs_the_same_keys_once_per_epoch(optimizer):
    result = train(CFG, DATA, {"optimizer": optimizer, "lr": 0.01, "momentum": 0.5, "schedule": "constant"}, 0)
    assert set(result.history) == {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "momentum"}
    for key, points in result.history.items():
        assert [step for step, _, _ in points] == [0, 1, 2, 3], key
    assert [v for _, v, _ in result.history["lr"]] == [0.01] * 4
    assert result.epochs == 4 and result.pruned_at is None and result.diverged_at is None
    assert 0.0 <= result.final("val/acc") <= 1.0


def test_time_decay_is_applied_per_update_and_logged_per_epoch():
    hp = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "time_decay", "decay": 0.1}
    result = train(CFG, DATA, hp, 0)
    updates_per_epoch = math.ceil(500 / 50)
    lrs = [v for _, v, _ in result.history["lr"]]
    assert lrs == pytest.approx([0.1 / (1 + 0.1 * updates_per_epoch * e) for e in range(4)])


def test_same_seed_same_metrics():
    hp = {"optimizer": "adam", "lr": 0.01, "schedule": "constant"}
    first, second = train(CFG, DATA, hp, 3), train(CFG, DATA, hp, 3)

    def values(r):
        return {k: [v for _, v, _ in p] for k, p in r.history.items()}

    assert values(first) == values(second)
    assert values(first) != values(train(CFG, DATA, hp, 4))


def test_a_diverging_rate_stops_the_trial_at_once():
    result = train(CFG, DATA, {"optimizer": "sgd", "lr": 1e8, "momentum": 0.9, "schedule": "constant"}, 0)
    assert result.diverged_at is not None and result.epochs <= result.diverged_at + 1 < 4
    state, value, reason = outcome(result, "val/acc")
    assert state == "PRUNED" and math.isnan(value)
    assert reason == f"non-finite train/loss at epoch {result.diverged_at}"


def test_a_non_finite_validation_loss_ends_the_trial_pruned():
    x_val = DATA.x_val.clone()
    x_val[0, 0] = math.nan  # one validation row: its logits, so the mean loss, are NaN
    result = train(
        CFG,
        dataclasses.replace(DATA, x_val=x_val),
        {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "schedule": "constant"},
        0,
    )
    assert (result.diverged_at, result.diverged_on, result.epochs) == (0, "val/loss", 1)
    assert math.isfinite(result.final("train/loss")) and math.isfinite(result.final("val/acc"))
    state, value, reason = outcome(result, "val/acc")  # val/acc alone would have made it COMPLETE
    assert state == "PRUNED" and math.isnan(value)
    assert reason == "non-finite val/loss at epoch 0"
