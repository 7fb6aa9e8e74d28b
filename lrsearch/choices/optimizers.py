"""Optimizers a study can name: one registry entry each (its torch class, usual learning
rate, the hyperparameters it takes, its colour in the report, its docs line)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrsearch.core.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Optimizer:
    name: str
    torch_class: str  # in torch.optim
    default_lr: float  # the usual default (Keras'), when a study does not set `lr`
    doc: str
    colour: str  # in the report's figures
    # Hyperparameters passed to the torch class by name, with their defaults here.
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self, parameters: Iterable[torch.Tensor], hp: Mapping[str, Any]) -> torch.optim.Optimizer:
        """The torch optimizer with ``hp["lr"]`` and whichever of its options ``hp`` holds
        (an option that does not apply to the trial, e.g. ``nesterov`` without momentum,
        is absent from ``hp``: torch's default then)."""
        import torch

        kwargs = {name: hp[name] for name in self.options if name in hp}
        return getattr(torch.optim, self.torch_class)(parameters, lr=hp["lr"], **kwargs)


# PyTorch's defaults beyond these (RMSprop alpha 0.99 and eps 1e-8, Adagrad eps 1e-10, Adam
# betas (0.9, 0.999)); the classic Keras experiments used RMSprop rho 0.9 and eps 1e-7.
OPTIMIZERS: Registry[Optimizer] = Registry(
    "optimizer",
    [
        Optimizer(
            "sgd",
            "SGD",
            0.01,
            "stochastic gradient descent, with momentum and Nesterov's variant",
            "tab:blue",
            {"momentum": 0.0, "nesterov": False},
        ),
        Optimizer("adam", "Adam", 0.001, "Adam: adaptive moments (betas 0.9, 0.999)", "tab:orange"),
        Optimizer(
            "rmsprop",
            "RMSprop",
            0.001,
            "RMSprop: a running mean of squared gradients (alpha 0.99)",
            "tab:green",
            {"momentum": 0.0},
        ),
        Optimizer("adagrad", "Adagrad", 0.01, "Adagrad: per-weight rates from the sum of squared gradients", "tab:red"),
        Optimizer(
            "adamw",
            "AdamW",
            0.001,
            "Adam with decoupled weight decay (Loshchilov & Hutter)",
            "tab:purple",
            {"weight_decay": 0.01},
        ),
    ],
)


def make_optimizer(parameters: Iterable[torch.Tensor], hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer named by ``hp["optimizer"]``."""
    return OPTIMIZERS[hp["optimizer"]].build(parameters, hp)
