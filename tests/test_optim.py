"""Optimizer and schedule factories, checked numerically on real torch optimizers."""

from __future__ import annotations

import pytest
import torch

from lrsearch.optimizers import make_optimizer
from lrsearch.schedules import make_schedule


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad),
                                           ("adamw", torch.optim.AdamW)])
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
    assert _one_step(hp, 0.0, start=1.0) == pytest.approx(0.95 ** 2)
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
    for hp, expected in (({"schedule": "step", "step_size": 2, "gamma": 0.5}, [0.1, 0.05, 0.05, 0.025]),
                         ({"schedule": "exponential", "gamma": 0.5}, [0.05, 0.025, 0.0125, 0.00625]),
                         ({"schedule": "constant"}, [0.1] * 4)):
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
