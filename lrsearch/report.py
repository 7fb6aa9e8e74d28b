"""Plots drawn from stored results: for now the per-trial learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

# (step, value, timestamp_ms) per metric key, as MemoryLogger records them.
History = Mapping[str, Sequence[tuple[int, float, int]]]


def plot_learning_curves(history: History, title: str, path: Path) -> Path:
    """Loss, accuracy and learning rate per epoch, side by side, as a PNG at ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(12, 3.6))
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.83, wspace=0.28)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split in ("train", "val"):
            _line(ax, history, f"{split}/{kind}", split)
        ax.set_xlabel("epoch")
    loss_ax.set(title="Cross-entropy loss", ylabel="loss")
    acc_ax.set(title="Accuracy", ylabel="accuracy (fraction correct)")
    _line(lr_ax, history, "lr", "lr")
    lr_ax.set(title="Learning rate (at epoch start)", xlabel="epoch", ylabel="learning rate")
    if history.get("lr") and min(v for _, v, _ in history["lr"]) > 0:
        lr_ax.set_yscale("log")
    for ax in (loss_ax, acc_ax, lr_ax):
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    return path


def _line(ax, history: History, key: str, label: str) -> None:
    points = history.get(key)
    if points:
        ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=label)
