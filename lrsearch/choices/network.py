"""The MLP: its activations and weight initializations (registries) and how it is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lrsearch.core.constraints import Satisfies, declared
from lrsearch.core.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Activation:
    name: str
    torch_class: str  # in torch.nn
    doc: str


@dataclass(frozen=True)
class Init:
    name: str
    doc: str
    # Sets a hidden layer's weights and biases; None keeps torch's own initialization.
    apply: Callable[[nn.Linear, torch.Generator], None] | None


def _he_uniform(linear: nn.Linear, generator: torch.Generator) -> None:
    from torch import nn

    nn.init.kaiming_uniform_(linear.weight, nonlinearity="relu", generator=generator)  # bound sqrt(6 / fan_in)
    nn.init.zeros_(linear.bias)


def _glorot_uniform(linear: nn.Linear, generator: torch.Generator) -> None:
    from torch import nn

    nn.init.xavier_uniform_(linear.weight, generator=generator)
    nn.init.zeros_(linear.bias)


ACTIVATIONS: Registry[Activation] = Registry(
    "activation",
    [
        Activation("relu", "ReLU", "max(0, x)"),
        Activation("tanh", "Tanh", "hyperbolic tangent"),
        Activation("sigmoid", "Sigmoid", "logistic sigmoid"),
        Activation("elu", "ELU", "exponential linear unit"),
        Activation("leaky_relu", "LeakyReLU", "ReLU with slope 0.01 below 0"),
        Activation("gelu", "GELU", "Gaussian error linear unit"),
    ],
)

INITS: Registry[Init] = Registry(
    "init",
    [
        Init("he_uniform", "He-uniform weights, zero biases (the classic Keras experiments)", _he_uniform),
        Init("glorot_uniform", "Glorot-uniform weights, zero biases", _glorot_uniform),
        Init("torch_default", "PyTorch's own initialization for every layer", None),
    ],
)


# The [model] section of a study file, beside the choices it names (config/ reads it).
MAX_LAYERS, MAX_UNITS = 8, 4096


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = declared(
        list,
        (50,),
        Satisfies(
            f"a list of 1 to {MAX_LAYERS} integers in [1, {MAX_UNITS}]",
            lambda v: 1 <= len(v) <= MAX_LAYERS and all(type(x) is int and 1 <= x <= MAX_UNITS for x in v),
        ),
    )
    activation: str = declared(str, "relu", choices=ACTIVATIONS)
    init: str = declared(str, "he_uniform", choices=INITS)


def build_mlp(n_in: int, n_out: int, cfg: ModelConfig, generator: torch.Generator) -> nn.Sequential:
    """Hidden layers with ``cfg.init``, then a Glorot-uniform output layer with zero biases
    (PyTorch's own with ``torch_default``), as in the classic Keras experiments."""
    from torch import nn

    init = INITS[cfg.init].apply
    out_init = None if init is None else _glorot_uniform
    activation = getattr(nn, ACTIVATIONS[cfg.activation].torch_class)
    layers: list[nn.Module] = []
    width = n_in
    for size in cfg.hidden:
        linear = nn.Linear(width, size, device="cpu")  # drawn on the CPU: the same weights on every device
        if init is not None:
            init(linear, generator)
        layers += [linear, activation()]
        width = size
    out = nn.Linear(width, n_out, device="cpu")
    if out_init is not None:
        out_init(out, generator)
    layers.append(out)
    return nn.Sequential(*layers)
