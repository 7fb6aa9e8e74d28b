"""Optuna's figures of a study (``optuna.visualization.matplotlib``), made readable: parameter
importances, parallel coordinates, slices and the lr-momentum contour; a function of plain
data, so the tracking process draws some while the worker draws the others."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core.text import count
from lrsearch.results.figures import _save
from lrsearch.results.tick_labels import _fit_tick_labels, _labels

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure
    from optuna.trial import FrozenTrial

    from lrsearch.track.tracking import Tracker

FEW_TRIALS = 20  # below this many complete trials, parameter importances are noise

# Optuna's figures, in the page's order (file names), and who draws which.
_OPTUNA_FIGURES = ("param_importances.png", "parallel_coordinate.png", "slices.png", "contour_lr_momentum.png")

_FIGURES_ELSEWHERE = ("parallel_coordinate", "slices")

_FIGURES_HERE = ("importances", "contour")


def draw_optuna_figures(
    tracker: Tracker | None,
    name: str,
    way: str,
    trials: Sequence[FrozenTrial],
    out: str,
    which: Sequence[str] = (*_FIGURES_HERE, *_FIGURES_ELSEWHERE),
) -> list[str]:
    """Optuna's figures of a study (its ``trials``) into ``out``, of ``which`` (importances,
    parallel_coordinate, slices, contour: the lr-momentum contour), those it has something to
    show in. A function of plain data, so that the tracking process draws some while the
    worker draws the others (``tracker`` is not used)."""
    if not which:
        return []
    import logging
    import warnings

    import optuna

    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)  # not "a new study created in memory"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            way_ = optuna.study.StudyDirection[way.upper()]
            study = optuna.create_study(study_name=name, direction=way_)  # in memory: a copy to draw from
            study.add_trials([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")])
    finally:
        logger.setLevel(level)
    plots = {
        "importances": plot_importances,
        "parallel_coordinate": plot_parallel_coordinate,
        "slices": plot_slices,
        "contour": plot_contour,
    }
    return [str(path) for key in which if (path := plots[key](study, name, Path(out))) is not None]


def plot_importances(study: optuna.Study, name: str, out: Path) -> Path | None:
    """Optuna's parameter importances (its default evaluator: PED-ANOVA since Optuna 5), with
    the number of complete trials they rest on; None when there is nothing to rank."""
    import warnings

    import optuna
    from matplotlib.figure import Figure

    try:
        with warnings.catch_warnings():  # "fewer than 2 trials in a regime": a small study, not news
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # fewer than two completed trials, or one param
        return None
    if not importances:
        return None
    n = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    fig = Figure(figsize=(10, 0.5 * len(importances) + 2.0))
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n_] for n_ in names])
    ax.set(
        title=f"{name}: parameter importances (Optuna, PED-ANOVA) from {count(n, 'complete trial')}",
        xlabel="importance",
    )
    ax.grid(alpha=0.3, axis="x")
    if n < FEW_TRIALS:
        fig.text(
            0.01,
            0.01,
            f"Only {count(n, 'complete trial')} (fewer than {FEW_TRIALS}): these importances can change "
            "completely from one study to the next.",
            color="tab:red",
            fontsize="small",
        )
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, out / "param_importances.png")


def plot_parallel_coordinate(study: optuna.Study, name: str, out: Path) -> Path | None:
    """Optuna's parallel coordinates of the complete trials."""
    with parallel_figure(study, name) as fig:
        return None if fig is None else _save(fig, out / "parallel_coordinate.png", tight=True)


def parallel_figure(study: optuna.Study, name: str) -> contextlib.AbstractContextManager[Figure | None]:
    """The parallel coordinates' figure (a context manager: closed after), None if nothing to
    draw. Optuna writes each parameter's tick labels beside its axis, where the trials' lines
    cross it: here on a white ground, above the lines, and the title clear of the top labels."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate as plot

    return optuna_figure(
        lambda: plot(study), f"{name}: parallel coordinates (complete trials)", (12, 5), _parallel_labels
    )


def _parallel_labels(fig: Figure, axes: list[Axes], title: str) -> None:
    (ax,) = axes
    ax.set_title(title, pad=16)  # the top tick labels reach above the axes
    twins = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]  # one per parameter
    _fit_tick_labels(fig, [twin.yaxis for twin in twins])
    for twin in twins:  # drawn after the lines: their labels are above them
        for tick in twin.yaxis.get_major_ticks() + twin.yaxis.get_minor_ticks():
            for label in (tick.label1, tick.label2):
                label.set_bbox(LABEL_GROUND)


def plot_slices(study: optuna.Study, name: str, out: Path) -> Path | None:
    """Optuna's slice plot: the objective against each parameter, one panel per parameter."""
    with slices_figure(study, name) as fig:
        return None if fig is None else _save(fig, out / "slices.png", tight=True)


# Behind the parallel coordinates' tick labels: the lines under them show only faintly.
LABEL_GROUND = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}

SLICE_COLUMNS = 3  # panels per row of the slice plot

SLICE_PANEL = (4.4, 3.3)  # inches per panel: room for a schedule's name under each of its ticks


def slices_figure(study: optuna.Study, name: str) -> contextlib.AbstractContextManager[Figure | None]:
    """The slice plot's figure (a context manager: closed after), None if nothing to draw.
    Optuna draws every panel in one row, as narrow as the figure allows, so neighbouring
    panels' tick labels ran into each other (``'adagrad''constant'``): here at most
    SLICE_COLUMNS panels a row, laid out so that labels keep clear of the next panel; a
    label that would still overlap another is turned or left out (:func:`_fit_tick_labels`)."""
    from optuna.visualization.matplotlib import plot_slice as plot

    return optuna_figure(
        lambda: plot(study), f"{name}: objective against each parameter (complete trials)", SLICE_PANEL, _slices_in_rows
    )


# axes: Axes, as Any: matplotlib types a collection's array as optional, checked here call by call.
def _slices_in_rows(fig: Figure, axes: list[Any], title: str) -> None:
    from matplotlib.colors import Normalize

    cols = min(SLICE_COLUMNS, len(axes))
    rows = math.ceil(len(axes) / cols)
    ylabel = axes[0].get_ylabel()
    # Optuna scales each panel's colours to its own trials and shows the last panel's scale:
    # one scale for all, so a trial has one colour everywhere.
    scatters = [c for ax in axes for c in ax.collections if c.get_array() is not None and len(c.get_array())]
    for other in [a for a in fig.axes if a not in axes]:
        other.remove()  # Optuna's colour bar
    fig.set_size_inches(SLICE_PANEL[0] * cols + 1.2, SLICE_PANEL[1] * rows + 0.8)
    fig.set_layout_engine("constrained")  # keeps each panel's labels clear of its neighbours
    grid = fig.add_gridspec(rows, cols)
    for i, ax in enumerate(axes):
        row, col = divmod(i, cols)
        ax.set_subplotspec(grid[row, col])
        ax.tick_params(axis="y", labelleft=col == 0)  # shared: the first column says it
        ax.set_ylabel(ylabel if col == 0 else "")
        ax.set_title("")
        ax.xaxis.set_major_formatter(_labels(ax.xaxis.get_major_formatter(), text=_unquoted))
    if scatters:
        numbers = [n for c in scatters for n in c.get_array()]
        norm = Normalize(min(numbers), max(numbers))
        for c in scatters:
            c.set_norm(norm)
        fig.colorbar(scatters[0], ax=axes, label="trial number", shrink=min(1.0, 0.5 + 0.25 * rows))
    fig.suptitle(title)
    _fit_tick_labels(fig, [ax.xaxis for ax in axes], turn=[ax.xaxis for ax in axes if _is_categorical(ax.xaxis)])


def _unquoted(label: str) -> str:
    """``'adam'`` -> ``adam``: Optuna labels categories with their repr."""
    return label[1:-1] if len(label) >= 2 and label[0] == label[-1] and label[0] in "'\"" else label


def _is_categorical(axis: Axis) -> bool:
    from matplotlib.category import StrCategoryFormatter

    formatter = axis.get_major_formatter()
    return isinstance(getattr(formatter, "inner", formatter), StrCategoryFormatter)  # (inside _labels)


def plot_contour(study: optuna.Study, name: str, out: Path) -> Path | None:
    """Optuna's contour of lr against momentum, over the trials that have both (two or more,
    with more than one value of each)."""
    from optuna.visualization.matplotlib import plot_contour as plot

    both = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and {"lr", "momentum"} <= set(t.params)
    ]
    if len({t.params["lr"] for t in both}) < 2 or len({t.params["momentum"] for t in both}) < 2:
        return None
    with optuna_figure(
        lambda: plot(study, params=["lr", "momentum"]),
        f"{name}: objective over lr and momentum ({count(len(both), 'trial')} with momentum)",
        (8, 6),
    ) as fig:
        return None if fig is None else _save(fig, out / "contour_lr_momentum.png", tight=True)


@contextlib.contextmanager
def optuna_figure(
    draw: Callable[[], Any],
    title: str,
    size: tuple[float, float],
    finish: Callable[[Figure, list[Axes], str], None] | None = None,
) -> Iterator[Figure | None]:
    """One of ``optuna.visualization.matplotlib``'s plots (drawn with pyplot, on its own
    figure, closed after) at the report's ``size`` with ``title`` (or as ``finish(figure,
    axes, title)`` arranges it); None if it has nothing to draw."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # pyplot's figure manager without a screen
    import matplotlib.pyplot as plt
    import optuna

    # Optuna's slice plot switches pyplot to the ggplot style for the whole process: kept to
    # that figure, so the figures drawn after it (and the next report's) keep the default style.
    with matplotlib.rc_context():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                drawn = draw()
            except (ValueError, RuntimeError, KeyError):
                drawn = None
        if drawn is None:
            yield None
            return
        axes = list(getattr(drawn, "ravel", lambda: [drawn])())
        fig = axes[0].figure
        try:
            if not any(ax.has_data() for ax in axes):
                yield None
                return
            fig.set_size_inches(*size)
            if finish is not None:
                finish(fig, axes, title)
            elif len(axes) == 1:
                axes[0].set_title(title)  # instead of Optuna's generic one
            else:
                fig.suptitle(title)
            yield fig
        finally:
            plt.close(fig)
