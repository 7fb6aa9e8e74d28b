"""Optimizer and schedule factories, checked numerically on real torch optimizers."""

from __future__ import annotations

import pytest
import torch

from lrsearch.choices.optimizers import make_optimizer
from lrsearch.choices.schedules import make_schedule


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("rmsprop", torch.optim.RMSprop),
        ("adagrad", torch.optim.Adagrad),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_optimizers(name, cls):
    opt = make_optimizer(_params(), {"optimizer": name, "lr": 0.05, "momentum": 0.5})
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.05
    if name in ("sgd", "rmsprop"):
        assert opt.param_groups[0]["momentum"] == 0.5


def _one_step(hp: dict, grad: float, start: float = 0.0) -> float:
    p = torch.nn.Parameter(torch.tensor([start]))
    opt = make_optimizer([p], hp)
    for _ in range(2):
        opt.zero_grad()
        (grad * p).sum().backward()
        opt.step()
    return p.item()


def test_nesterov_looks_ahead_along_the_momentum():
    # Constant gradient 1, lr 0.1, momentum 0.9: the buffer is 1, then 1.9. Plain momentum
    # moves 0.1 then 0.19; Nesterov's step uses grad + momentum * buffer: 0.19, then 0.271.
    sgd = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
    assert _one_step(sgd, 1.0) == pytest.approx(-0.29)
    assert _one_step({**sgd, "nesterov": True}, 1.0) == pytest.approx(-0.461)


def test_adamw_decays_weights_apart_from_the_gradient():
    # Zero gradient: Adam's step is 0, so only the decoupled decay moves the weight:
    # w <- w * (1 - lr * weight_decay), twice.
    hp = {"optimizer": "adamw", "lr": 0.1, "weight_decay": 0.5}
    assert _one_step(hp, 0.0, start=1.0) == pytest.approx(0.95**2)
    assert _one_step({**hp, "optimizer": "adam"}, 0.0, start=1.0) == 1.0


def test_time_decay_follows_the_classic_formula_per_update():
    opt = make_optimizer(_params(), {"optimizer": "sgd", "lr": 0.01})
    schedule = make_schedule(opt, {"schedule": "time_decay", "decay": 0.1})
    assert schedule.interval == "step"
    for t in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / (1 + 0.1 * t), rel=1e-12)
        opt.step()
        schedule.scheduler.step()


def test_plateau_lowers_the_rate_after_patience_flat_epochs():
    opt = make_optimizer(_params(), {"optimizer": "sgd", "lr": 0.01})
    schedule = make_schedule(opt, {"schedule": "plateau", "patience": 2, "factor": 0.1})
    assert (schedule.interval, schedule.monitor) == ("epoch", "val/loss")
    lrs = []
    for loss in (1.0, 0.5, 0.5, 0.5, 0.5 + 1e-9, 0.5):  # best at epoch 1, then flat
        schedule.step_epoch({"val/loss": loss})
        lrs.append(opt.param_groups[0]["lr"])
    # Epochs 2 and 3 are the two allowed bad epochs; the third flat one (epoch 4) cuts the rate.
    assert lrs[:4] == [0.01] * 4
    assert lrs[4] == pytest.approx(0.001)


def test_epoch_schedules():
    for hp, expected in (
        ({"schedule": "step", "step_size": 2, "gamma": 0.5}, [0.1, 0.05, 0.05, 0.025]),
        ({"schedule": "exponential", "gamma": 0.5}, [0.05, 0.025, 0.0125, 0.00625]),
        ({"schedule": "constant"}, [0.1] * 4),
    ):
        opt = make_optimizer(_params(), {"optimizer": "sgd", "lr": 0.1})
        schedule = make_schedule(opt, hp)
        got = []
        for _ in range(4):
            opt.step()
            schedule.step_epoch({})
            got.append(opt.param_groups[0]["lr"])
        assert got == pytest.approx(expected), hp


def test_cosine_reaches_zero_at_t_max():
    opt = make_optimizer(_params(), {"optimizer": "sgd", "lr": 0.1})
    schedule = make_schedule(opt, {"schedule": "cosine", "t_max": 4})
    for _ in range(4):
        opt.step()
        schedule.step_epoch({})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _rates(hp: dict, epochs: int, steps_per_epoch: int, metrics=lambda epoch: {}) -> list[list[float]]:
    """The learning rate before each update, epoch by epoch, as the training loop steps it."""
    opt = make_optimizer(_params(), {"optimizer": "sgd", **hp})
    schedule = make_schedule(opt, hp, epochs, steps_per_epoch)
    out = []
    for epoch in range(epochs):
        row = []
        for _ in range(steps_per_epoch):
            row.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step_update()
        schedule.step_epoch(metrics(epoch))
        out.append(row)
    return out


def test_one_cycle_rises_to_lr_then_anneals_far_below():
    hp = {"lr": 0.1, "schedule": "one_cycle", "pct_start": 0.3, "anneal": "linear"}
    flat = [lr for row in _rates(hp, 10, 4) for lr in row]  # 40 updates
    peak = flat.index(max(flat))
    assert flat[0] == pytest.approx(0.1 / 25) and max(flat) == pytest.approx(0.1)
    assert peak == round(0.3 * 40) - 1  # PyTorch's phase end: pct_start · total - 1
    assert all(a < b for a, b in zip(flat[:peak], flat[1 : peak + 1]))  # up, then down
    assert all(a > b for a, b in zip(flat[peak:], flat[peak + 1 :]))
    assert flat[-1] == pytest.approx(0.1 / 25 / 1e4, rel=0.05) or flat[-1] < 0.1 / 25 / 10


@pytest.mark.parametrize("mode", ["triangular", "triangular2"])
def test_cyclic_draws_triangles_between_a_fraction_of_lr_and_lr(mode):
    hp = {"lr": 0.1, "schedule": "cyclic", "mode": mode, "base_fraction": 0.2, "half_cycle": 2}
    flat = [lr for row in _rates(hp, 8, 5) for lr in row]  # half cycle: 2 epochs = 10 updates
    assert flat[0] == pytest.approx(0.02) and flat[10] == pytest.approx(0.1) and flat[20] == pytest.approx(0.02)
    assert flat[5] == pytest.approx(0.06)  # linear in between
    second_peak = 0.1 if mode == "triangular" else 0.02 + (0.1 - 0.02) / 2
    assert flat[30] == pytest.approx(second_peak)


def test_warmup_rises_linearly_then_the_schedule_runs_whole():
    # 2 warm-up epochs of 3 updates: lr/6, 2lr/6, … lr; then step's halving every epoch.
    hp = {"lr": 0.06, "schedule": "step", "step_size": 1, "gamma": 0.5, "warmup_epochs": 2}
    rates = _rates(hp, 5, 3)
    assert [lr for row in rates[:2] for lr in row] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert [row[0] for row in rates[2:]] == pytest.approx([0.06, 0.03, 0.015])


def test_warmup_before_plateau_and_one_cycle():
    # Plateau counts no epoch while warming up: with a loss rising every epoch, its first
    # epoch is epoch 2 (the best so far), epoch 3 the one bad epoch allowed, and epoch 4's
    # cut shows from epoch 5.
    hp = {"lr": 0.1, "schedule": "plateau", "patience": 1, "factor": 0.1, "warmup_epochs": 2}
    rates = _rates(hp, 6, 2, metrics=lambda epoch: {"val/loss": 1.0 + epoch})
    assert [row[0] for row in rates] == pytest.approx([0.025, 0.075, 0.1, 0.1, 0.1, 0.01])
    # One-cycle after a warm-up spans the remaining epochs: it must not run out of steps.
    hp = {"lr": 0.1, "schedule": "one_cycle", "pct_start": 0.3, "anneal": "cos", "warmup_epochs": 3}
    rates = _rates(hp, 13, 2)  # 10 epochs of one-cycle: 20 updates, the peak at update 5
    assert rates[0][0] == pytest.approx(0.1 / 25 / 6)  # 1/W of the rate one-cycle starts at
    assert rates[3][0] == pytest.approx(0.1 / 25) and max(lr for row in rates for lr in row) == pytest.approx(0.1)
