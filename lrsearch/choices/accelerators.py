"""Where a study trains: Lightning's accelerators, as ``[train] accelerator`` and
``--accelerator`` name them. Lightning picks the device; lrsearch's tensors follow the
module's (``fit/model.py``), and a trained network is kept, saved and served on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

from lrsearch.core.registry import Registry


@dataclass(frozen=True)
class Accelerator:
    name: str  # Lightning's name for it (Trainer(accelerator=...))
    doc: str


ACCELERATORS: Registry[Accelerator] = Registry(
    "accelerator",
    [
        Accelerator("auto", "what Lightning picks: a GPU where torch sees one (CUDA, or Apple's MPS), else the CPU"),
        Accelerator("cpu", "the CPU, even where a GPU is present"),
        Accelerator("gpu", "a GPU (CUDA, or Apple's MPS); a host without one cannot train the study"),
    ],
)


def unavailable(name: str) -> str | None:
    """Why this host cannot train on accelerator ``name``, or None: it can. (Lightning's own
    check, its ``gpu`` being CUDA or MPS, answers the same later, with a longer message.)"""
    if name != "gpu":
        return None
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return None
    return "'gpu' asked for, but torch sees no GPU on this host (no CUDA or MPS device): use 'auto' or 'cpu'"
