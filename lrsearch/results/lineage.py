"""A population-based training member's discovered schedule and family tree, read back from
its trials' ``pbt`` attributes (``choices/population.py``).

A member that copies another at epoch ``e`` continues from the weights its source trained
up to ``e``: the network it ends with was trained by a line of ancestors, each for a
stretch of epochs, each with its own learning rate. That line, and the learning rate along
it, is the schedule the population discovered (what the member's own ``lr`` curve in MLflow
shows only from its last copy on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core import attrs

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial


@dataclass(frozen=True)
class Stretch:
    """Epochs ``first``..``last`` (inclusive) of the line, trained by trial ``trial``, at
    learning rate ``lr`` (and ``momentum``, if it has one)."""

    trial: int
    first: int
    last: int
    lr: float | None
    momentum: float | None
    optimizer: str | None = None


def values_by_epoch(trial: FrozenTrial, key: str, epochs: int) -> list[Any]:
    """``key``'s value (lr, momentum) at each epoch of ``trial``: its first draw, then what
    each copy gave it from the epoch after the copy."""
    hp = trial.user_attrs.get(attrs.HYPERPARAMETERS) or trial.params
    value = hp.get(key)
    changes = {e["epoch"] + 1: e["after"].get(key) for e in (trial.user_attrs.get(attrs.PBT) or {}).get("exploits", [])}
    out = []
    for epoch in range(epochs):
        if epoch in changes:
            value = changes[epoch]
        out.append(value)
    return out


def line(trials: Sequence[FrozenTrial], member: FrozenTrial) -> list[Stretch]:
    """The stretches of ``member``'s line, earliest first: who trained its network when."""
    by_number = {t.number: t for t in trials}
    last = int(member.user_attrs.get(attrs.EPOCHS_TRAINED) or 0) - 1
    stretches: list[Stretch] = []
    holder: FrozenTrial | None
    holder, end = member, last
    while holder is not None and end >= 0:
        exploits = [e for e in (holder.user_attrs.get(attrs.PBT) or {}).get("exploits", []) if e["epoch"] < end]
        start = exploits[-1]["epoch"] + 1 if exploits else 0
        lrs = values_by_epoch(holder, "lr", end + 1)
        momenta = values_by_epoch(holder, "momentum", end + 1)
        optimizers = values_by_epoch(holder, "optimizer", end + 1)
        # One stretch per run of equal values within the holder's epochs.
        first = start
        for epoch in range(start, end + 1):
            if epoch == end or (lrs[epoch + 1], momenta[epoch + 1]) != (lrs[epoch], momenta[epoch]):
                stretches.append(Stretch(holder.number, first, epoch, lrs[epoch], momenta[epoch], optimizers[epoch]))
                first = epoch + 1
        if not exploits:
            break
        holder, end = by_number.get(exploits[-1]["source"]), exploits[-1]["epoch"]
    return sorted(stretches, key=lambda s: s.first)


def schedule_text(stretches: Sequence[Stretch], limit: int = 12) -> str:
    """``lr 0.01 (epochs 0–4, trial 3) → 0.008 (5–9, trial 7) → …``."""
    from lrsearch.core.text import fmt

    parts = []
    for s in stretches[:limit]:
        momentum = f", momentum {fmt(s.momentum)}" if s.momentum is not None else ""
        epochs = f"epoch {s.first}" if s.first == s.last else f"epochs {s.first}–{s.last}"
        parts.append(f"{fmt(s.lr)}{momentum} ({s.optimizer}, {epochs}, trial {s.trial})")
    more = f" → … {len(stretches) - limit} more" if len(stretches) > limit else ""
    return "lr " + " → ".join(parts) + more


def is_population(trials: Sequence[FrozenTrial]) -> bool:
    return any(attrs.PBT in t.user_attrs for t in trials)


def final_params(trial: FrozenTrial) -> Mapping[str, Any]:
    """What the trial ended with: a population member's final values, else its params."""
    pbt = trial.user_attrs.get(attrs.PBT)
    return pbt["final"] if pbt else trial.params


def plot_schedule(trials: Sequence[FrozenTrial], member: FrozenTrial, title: str, path: Path) -> Path:
    """The report's ``pbt_schedule.png``: left, the learning rate along ``member``'s line
    (bold, each stretch coloured by the trial that trained it) over every member's own
    (faint); right, its family tree: which trial trained the network at each epoch, and
    where it was copied (arrows)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    stretches = line(trials, member)
    epochs = max((int(t.user_attrs.get(attrs.EPOCHS_TRAINED) or 0) for t in trials), default=0)
    fig = Figure(figsize=(8.0, 3.9))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for t in trials:
        lrs = values_by_epoch(t, "lr", int(t.user_attrs.get(attrs.EPOCHS_TRAINED) or 0))
        if lrs:
            left.step(range(len(lrs)), lrs, where="post", color="0.8", linewidth=0.8)
    holders = list(dict.fromkeys(s.trial for s in stretches))
    kinds = {s.trial: s.optimizer for s in stretches}  # (a holder's optimizer in its stretch)
    colours = {trial: f"C{i % 10}" for i, trial in enumerate(holders)}
    for s in stretches:
        left.step([s.first, s.last + 1], [s.lr, s.lr], where="post", color=colours[s.trial], linewidth=2.5)
        right.plot([s.first, s.last + 1], [s.trial, s.trial], color=colours[s.trial], linewidth=3)
    for before, after in zip(stretches, stretches[1:]):
        if before.trial != after.trial:
            right.annotate(
                "",
                xy=(after.first, after.trial),
                xytext=(after.first, before.trial),
                arrowprops={"arrowstyle": "->", "color": "0.3"},
            )
    if any(s.lr and s.lr > 0 for s in stretches):
        left.set_yscale("log")
    left.set(title=f"{title}: the schedule trial {member.number} found", xlabel="epoch", ylabel="learning rate")
    right.set(title="who trained its network", xlabel="epoch", ylabel="trial")
    right.set_yticks(holders, [f"{trial} ({kinds[trial]})" for trial in holders])
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, max(epochs, 1))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
