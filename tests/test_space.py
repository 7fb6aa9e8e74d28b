"""Define-by-run sampling, checked without training through optuna.trial.FixedTrial."""

from __future__ import annotations

import optuna
import pytest

from lrsearch.choices.space import Choices, Fixed, Range, grid_size, grid_space, sample_params
from lrsearch.config import parse_config

SPACE = {
    "optimizer": Choices(("sgd", "adam", "rmsprop")),
    "lr": Range(1e-4, 1.0, log=True),
    "momentum": Range(0.0, 0.99),
    "schedule": Choices(("constant", "time_decay", "plateau", "step")),
    "decay": Range(1e-4, 1e-1, log=True),
    "patience": Choices((2, 5)),
}


def test_momentum_only_for_optimizers_that_have_one():
    sgd = sample_params(
        optuna.trial.FixedTrial({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "constant"}), SPACE, 10
    )
    adam = sample_params(optuna.trial.FixedTrial({"optimizer": "adam", "lr": 0.1, "schedule": "constant"}), SPACE, 10)
    assert sgd == {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "schedule": "constant"}
    assert adam == {"optimizer": "adam", "lr": 0.1, "schedule": "constant"}


def test_nesterov_only_for_sgd_with_momentum_and_weight_decay_only_for_adamw():
    space = {
        "optimizer": Choices(("sgd", "adamw")),
        "lr": Fixed(0.1),
        "momentum": Choices((0.0, 0.9)),
        "nesterov": Choices((True, False)),
        "weight_decay": Range(1e-4, 1e-1, log=True),
    }

    def sampled(params):
        return sample_params(optuna.trial.FixedTrial({"schedule": "constant", **params}), space, 10)

    assert sampled({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}) == {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "schedule": "constant",
    }
    assert "nesterov" not in sampled({"optimizer": "sgd", "lr": 0.1, "momentum": 0.0})  # torch refuses it there
    assert sampled({"optimizer": "adamw", "lr": 0.1, "weight_decay": 0.01}) == {
        "optimizer": "adamw",
        "lr": 0.1,
        "weight_decay": 0.01,
        "schedule": "constant",
    }
    # Undeclared: the optimizer's own defaults (PyTorch's AdamW decay, plain momentum).
    assert (
        sample_params(optuna.trial.FixedTrial({"optimizer": "adamw"}), {"optimizer": Fixed("adamw")}, 10)[
            "weight_decay"
        ]
        == 0.01
    )
    assert sample_params(optuna.trial.FixedTrial({"momentum": 0.5}), {"momentum": Fixed(0.5)}, 10)["nesterov"] is False


def test_schedule_parameters_only_with_their_schedule():
    trial = optuna.trial.FixedTrial({"optimizer": "adam", "lr": 0.1, "schedule": "plateau", "patience": 5})
    assert sample_params(trial, SPACE, 10) == {
        "optimizer": "adam",
        "lr": 0.1,
        "schedule": "plateau",
        "patience": 5,
        "factor": 0.1,
    }
    trial = optuna.trial.FixedTrial({"optimizer": "adam", "lr": 0.1, "schedule": "time_decay", "decay": 0.01})
    assert sample_params(trial, SPACE, 10)["decay"] == 0.01


def test_undeclared_parameters_take_defaults_and_are_not_suggested():
    study = optuna.create_study()
    trial = study.ask()
    hp = sample_params(trial, {"lr": Fixed(0.05), "schedule": Fixed("step")}, epochs=40)
    assert hp == {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "schedule": "step", "step_size": 10, "gamma": 0.5}
    assert trial.params == {"lr": 0.05, "schedule": "step"}  # fixed values are recorded


def test_real_study_never_records_a_parameter_that_does_not_apply():
    space = {
        **SPACE,
        "optimizer": Choices(("sgd", "adam", "rmsprop", "adamw")),
        "momentum": Choices((0.0, 0.9)),
        "nesterov": Choices((True, False)),
        "weight_decay": Range(1e-4, 1e-1, log=True),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        trial = study.ask()
        hp = sample_params(trial, space, 10)
        assert ("momentum" in trial.params) == (hp["optimizer"] in ("sgd", "rmsprop"))
        assert ("decay" in trial.params) == (hp["schedule"] == "time_decay")
        assert ("patience" in trial.params) == (hp["schedule"] == "plateau")
        assert ("nesterov" in trial.params) == (hp["optimizer"] == "sgd" and hp["momentum"] > 0)
        assert ("weight_decay" in trial.params) == (hp["optimizer"] == "adamw")
        assert 1e-4 <= hp["lr"] <= 1.0
        study.tell(trial, 0.0)


def test_grid_space_and_size():
    space = {"lr": Choices((1.0, 0.1, 0.01)), "optimizer": Fixed("sgd"), "momentum": Choices((0.0, 0.9))}
    assert grid_space(space) == {"lr": [1.0, 0.1, 0.01], "optimizer": ["sgd"], "momentum": [0.0, 0.9]}
    assert grid_size(space) == 6
    with pytest.raises(ValueError, match="lr is a range"):
        grid_space({"lr": Range(0.1, 1.0)})


def test_grid_study_visits_every_point_once():
    cfg = parse_config(
        {
            "study": {"name": "g", "sampler": "grid"},
            "params": {"lr": {"choices": [0.1, 0.01, 0.001]}, "optimizer": "sgd"},
        },
        "g.toml",
    )
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid_space(cfg.params), seed=0))
    seen = []
    study.optimize(lambda trial: seen.append(sample_params(trial, cfg.params, 5)["lr"]) or 0.0, n_trials=10)
    assert sorted(seen) == [0.001, 0.01, 0.1]  # the grid stops the study once exhausted
