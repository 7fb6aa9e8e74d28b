"""The report's own figures (matplotlib, no pyplot): learning curves, the grid, the learning
rate per epoch, the optimization history, the objective against the learning rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.core.text import count, params_text
from lrsearch.results.ranking import best_so_far
from lrsearch.results.trial_curves import TrialCurves, varied_params
from lrsearch.track.records import History

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    fig.savefig(path, dpi=80)  # one per trial (opt-in): small files
    return path


def _line(ax: Axes, history: History, key: str, label: str) -> None:
    points = history.get(key)
    if points:
        ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=label)


# -- a study's report ---------------------------------------------------------------------

DPI = 270  # hi-dpi PNGs: sharp when the page shows them at full width (a 6-inch figure: 1,620 pixels)

# The report's figures that the parent run's description shows (names.NOTE_FIGURES; the others
# are in report.html), as copies PREVIEW_WIDTH pixels wide in names.PREVIEW_DIR: MLflow shows a
# description's images at their own size (its Markdown drops width attributes). From a window
# about 1240 pixels wide (MLflow 3.18, its assistant panel shut) the run page sets its 464-pixel
# "About this run" column beside the description, which leaves the description 514 pixels
# there (554 at 1280): a wider image (680 before) pushed that column past the page's edge.
# The figures it shows are NOTE_FIGURE_WIDTH inches wide, so their text keeps its size there.
PREVIEW_WIDTH = 500

NOTE_FIGURE_WIDTH = 6.0  # 10-point text: ~12 pixels in the copy


def _previews(figures: Sequence[Path], folder: Path) -> None:
    """Copies of ``figures`` scaled down to PREVIEW_WIDTH pixels (for MLflow's description box)."""
    from PIL import Image  # matplotlib's own dependency

    folder.mkdir(exist_ok=True)
    for path in figures:
        with Image.open(path) as image:
            height = round(image.height * PREVIEW_WIDTH / image.width)
            image.resize((PREVIEW_WIDTH, height), Image.Resampling.LANCZOS).save(folder / path.name)


def _label(t: TrialCurves, axes: Sequence[str]) -> str:
    keys = axes or list(t.params)
    return ", ".join(f"{k}={_fmt(t.hyperparameters.get(k, t.params.get(k)))}" for k in keys)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# fig: a matplotlib Figure, as Any: savefig's stub types each keyword apart, and they come here as a dict.
def _save(fig: Any, path: Path, tight: bool = False) -> Path:
    """``tight``: cropped to what is drawn (Optuna's figures place their colour bars themselves)."""
    fig.savefig(path, dpi=DPI, **({"bbox_inches": "tight"} if tight else {}))
    return path


def _grid_order(trials: Sequence[TrialCurves], axes: Sequence[str]) -> list[TrialCurves]:
    def key(t: TrialCurves) -> tuple:
        return tuple((0, -v) if isinstance(v, (int, float)) else (1, str(v)) for v in (t.params.get(a) for a in axes))

    return sorted(trials, key=key)


def plot_grid(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The classic figure grid: one panel per grid value, train and validation accuracy per epoch."""
    from matplotlib.figure import Figure

    axes_names = varied_params(trials)
    ordered = _grid_order(trials, axes_names)
    cols = min(4, len(ordered))
    rows = math.ceil(len(ordered) / cols)
    # 2.1 inches a panel: four across, copied PREVIEW_WIDTH pixels wide for the description,
    # keep their text as large as 2.8-inch panels had it in the 680-pixel copies before.
    fig = Figure(figsize=(2.1 * cols, 2.0 * rows + 0.6))
    panels = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, t in zip(panels, ordered):
        for key, label in (("train/acc", "train"), ("val/acc", "validation")):
            points = t.curves.get(key, [])
            ax.plot([s for s, _ in points], [v for _, v in points], label=label)
        ax.set_title(_label(t, axes_names), fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in panels[len(ordered) :]:
        ax.set_visible(False)
    for ax in panels[(rows - 1) * cols :]:
        ax.set_xlabel("epoch")
    for ax in panels[::cols]:
        ax.set_ylabel("accuracy")
    panels[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{name}: accuracy per epoch, one panel per value")
    fig.tight_layout()
    return _save(fig, path)


def plot_grid_lr(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The learning rate per epoch of every trial, overlaid, on a log axis."""
    return _lr_figure(
        _grid_order(trials, varied_params(trials)), varied_params(trials), f"{name}: learning rate per epoch", path
    )


def plot_lr_curves(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The learning rate per epoch (``lr`` from MLflow) of the top trials, best first."""
    return _lr_figure(
        trials, [], f"{name}: learning rate per epoch of the top {count(len(trials), 'trial')}", path, rank=True
    )


# The lr curves' legend: in the description's PREVIEW_WIDTH-pixel copy of a NOTE_FIGURE_WIDTH
# figure, at about the size of the description's own text (12 pt at 500/432 pixels a point:
# ~14 px; "small" in the 10-inch figure it was, copied 780 pixels wide, was ~9 px).
LEGEND_PT = 12.0

_LEGEND_CHARS = 55  # a legend line's characters at LEGEND_PT in NOTE_FIGURE_WIDTH inches; longer labels wrap


def _lr_figure(trials: Sequence[TrialCurves], axes: Sequence[str], title: str, path: Path, rank: bool = False) -> Path:
    return _save(lr_figure(trials, axes, title, rank), path)


def lr_figure(trials: Sequence[TrialCurves], axes: Sequence[str], title: str, rank: bool = False) -> Figure:
    """The learning rate per epoch of ``trials``, labelled by rank and params (``rank``) or by
    the grid's ``axes``; the legend below the curves (they fill the axes)."""
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = [
        textwrap.fill(
            f"#{i}, trial {t.number} ({t.value:.4g}): {params_text(t.params)}" if rank else _label(t, axes),
            _LEGEND_CHARS,
            subsequent_indent="    ",
        )
        for i, t in enumerate(trials, 1)
    ]
    columns = 1 if rank or len(trials) <= 6 else 2  # a grid's short labels: two columns
    legend_lines = sum(label.count("\n") + 1 for label in labels) / columns
    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 3.0 + 0.26 * legend_lines))
    ax = fig.subplots()
    for i, (t, label) in enumerate(zip(trials, labels), 1):
        points = t.curves.get("lr", [])
        ax.plot(
            [s for s, _ in points], [v for _, v in points], label=label, linestyle=("-", "--", ":")[(i - 1) // 10 % 3]
        )  # colours repeat after ten
    if any(v > 0 for t in trials for _, v in t.curves.get("lr", [])):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    ax.set(title=title, xlabel="epoch", ylabel="learning rate (at epoch start)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_PT, ncols=columns, loc="upper center", bbox_to_anchor=(0.5, -0.17))
    fig.tight_layout()
    return fig


def plot_history(trials: Sequence[TrialCurves], name: str, direction: str, objective: str, path: Path) -> Path:
    """Objective per trial (pruned trials hollow, at their last report), and the best so far
    (of COMPLETE trials) carried to the last trial."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 3.0))
    ax = fig.subplots()
    ordered = sorted(trials, key=lambda t: t.number)
    done = [t for t in ordered if t.state == "COMPLETE" and t.value is not None]
    pruned = [t for t in ordered if t.state == "PRUNED" and t.value is not None and math.isfinite(t.value)]
    ax.scatter([t.number for t in done], [_value(t) for t in done], label="complete", s=22, color="tab:blue")
    ax.scatter(
        [t.number for t in pruned],
        [_value(t) for t in pruned],
        label="pruned (the value the pruner judged)",
        s=22,
        facecolors="none",
        edgecolors="grey",
    )
    xs, ys = best_line(ordered, direction)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"{name}: optimization history", xlabel="trial number", ylabel=objective)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _value(t: TrialCurves) -> float:
    """A trial's value, where only trials with one are drawn."""
    assert t.value is not None
    return t.value


def best_line(trials: Sequence[TrialCurves], direction: str) -> tuple[list[int], list[float]]:
    """The "best so far" steps over ``trials`` (in trial order): the best COMPLETE value at each
    COMPLETE trial, carried on to the last trial, whatever its state."""
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not done:
        return [], []
    best = best_so_far(done, direction)
    return [t.number for t in done] + [trials[-1].number], [_value(t) for t in best] + [_value(best[-1])]


def plot_objective_vs_lr(trials: Sequence[TrialCurves], name: str, objective: str, path: Path) -> Path:
    """Objective against learning rate (log axis), coloured by optimizer; pruned trials hollow."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 3.0))
    ax = fig.subplots()
    by_optimizer: dict[str, list[TrialCurves]] = {}
    for t in trials:
        if t.value is not None and math.isfinite(t.value) and t.hyperparameters.get("lr"):
            by_optimizer.setdefault(str(t.hyperparameters.get("optimizer", "?")), []).append(t)
    handles = []
    for optimizer, group in sorted(by_optimizer.items()):
        colour = OPTIMIZERS[optimizer].colour if optimizer in OPTIMIZERS else None
        for state, face in (("COMPLETE", colour), ("PRUNED", "none")):
            points = [t for t in group if t.state == state]
            if points:
                ax.scatter(
                    [t.hyperparameters["lr"] for t in points],
                    [_value(t) for t in points],
                    s=28,
                    facecolors=face,
                    edgecolors=colour,
                    color=colour if face != "none" else None,
                )
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=optimizer))
    if any(t.state == "PRUNED" for group in by_optimizer.values() for t in group):
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markerfacecolor="none",
                markeredgecolor="grey",
                label="hollow: pruned (the value the pruner judged)",
            )
        )
    ax.set_xscale("log")
    ax.set(title=f"{name}: objective against learning rate", xlabel="learning rate (log scale)", ylabel=objective)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, title="optimizer", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
