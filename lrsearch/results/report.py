"""Plots and tables drawn from stored results (Optuna's trials, MLflow's metric histories);
nothing is trained again."""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.choices.space import in_sampling_order
from lrsearch.core import attrs
from lrsearch.core.names import DEFAULT_UI_PORT, NOTE_FIGURES, PREVIEW_DIR
from lrsearch.core.study_record import StudyRecord
from lrsearch.core.text import exploits_text, params_text
from lrsearch.results.descriptions import write_study_note
from lrsearch.results.lineage import is_population, plot_schedule
from lrsearch.results.ranking import best_so_far, direction, duration_s, load_study, ranking, wall_s
from lrsearch.store.folders import report_dir
from lrsearch.store.urls import is_server, storage_url, tracking_uri
from lrsearch.track.tracking import History, Tracker


def write_report(
    name: str,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    out: Path | None = None,
    study: Any = None,
    tracker: Any = None,
) -> list[Path]:
    """Draw the study's report from the stores into ``out`` (default: see
    ``folders.report_dir``) and log it under ``report/`` on the parent MLflow run.
    ``study``: the study already open (as at the end of ``run``), read through its storage;
    ``tracker``: the MLflow client to use (as ``run``'s tracking process)."""
    study = study or load_study(name, storage)
    tracker = tracker or Tracker(tracking_uri(tracking))
    out = out or report_dir(storage_url(storage), name)
    grid = any(attrs.GRID_ID in t.system_attrs for t in study.get_trials(deepcopy=False))
    paths = build_report(study, tracker, out, grid=grid)
    parent = StudyRecord.from_attrs(study.user_attrs).parent_run_id
    if parent:
        tracker.log_dir(parent, out, "report")
        write_study_note(study, tracker)  # the description shows the figures just logged
    return paths


def results_table(name: str, *, storage: str | None = None, tracking: str | None = None) -> str:
    """The Markdown results table of a (grid) study, from the stores."""
    trials = load_study(name, storage).get_trials(deepcopy=False)
    return experiment_table(collect(trials, Tracker(tracking_uri(tracking))))


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


def _line(ax: Any, history: History, key: str, label: str) -> None:
    points = history.get(key)
    if points:
        ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=label)


# -- a study's report ---------------------------------------------------------------------

CURVE_KEYS = ("train/acc", "val/acc", "lr")
DPI = 200  # hi-dpi PNGs: sharp when the page shows them at full width
TOP_CURVES = 5  # trials whose learning-rate curves the report draws
FEW_TRIALS = 20  # below this many complete trials, parameter importances are noise
# The report's figures that the parent run's description shows (names.NOTE_FIGURES; the others
# are in report.html), as copies PREVIEW_WIDTH pixels wide in names.PREVIEW_DIR: MLflow shows a description's images at
# their
# own size (its Markdown drops width attributes), and at the UI's default width (a 1280-pixel
# window, its assistant panel open) the box is 714 pixels wide: a wider image (780 before)
# pushed the whole description past the box's right edge, cutting off lines of text too.
# The figures it shows are NOTE_FIGURE_WIDTH inches wide, so their text keeps its size there.
PREVIEW_WIDTH = 680
NOTE_FIGURE_WIDTH = 8.0  # 10-point text: ~12 pixels in the copy


@dataclass
class TrialCurves:
    """One finished trial: its number, state, value, hyperparameters, per-epoch curves and
    how it ran (epochs, seconds, why it stopped, its MLflow run)."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    hyperparameters: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    epochs: int | None = None
    duration_s: float | None = None
    wall_s: float | None = None
    reason: str | None = None
    run_id: str | None = None
    # A member of population-based training: its params are what it ended with; this says
    # what it was drawn with and whom it copied.
    lineage: str | None = None

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        return next((step for step, v in self.curves.get(key, []) if v >= threshold), None)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None


def collect(
    frozen: Sequence[Any], tracker: Tracker | None, states: Sequence[str] = ("COMPLETE", "PRUNED")
) -> list[TrialCurves]:
    """A study's trials (``frozen``, as Optuna gives them) in ``states``, with their MLflow
    metric histories if ``tracker`` is given (else :func:`with_curves` reads those of the
    trials that need them)."""
    trials = []
    for t in frozen:
        if t.state.name not in states:
            continue
        run_id = t.user_attrs.get(attrs.MLFLOW_RUN)
        curves: dict[str, list[tuple[int, float]]] = {}
        value = t.value
        if value is None and t.intermediate_values:  # pruned: its last report is what was judged
            value = t.intermediate_values[max(t.intermediate_values)]
        pbt = t.user_attrs.get(attrs.PBT)
        params = in_sampling_order(pbt["final"] if pbt else t.params)
        lineage = (
            f"drawn with {params_text(in_sampling_order(t.params))}; {exploits_text(pbt['exploits'])}" if pbt else None
        )
        trials.append(
            TrialCurves(
                t.number,
                t.state.name,
                value,
                params,
                {**t.user_attrs.get(attrs.HYPERPARAMETERS, t.params), **params},
                curves,
                epochs=t.user_attrs.get(attrs.EPOCHS_TRAINED),
                duration_s=duration_s(t),
                wall_s=wall_s(t),
                reason=t.user_attrs.get(attrs.REASON),
                run_id=run_id,
                lineage=lineage,
            )
        )
    return trials if tracker is None else with_curves(trials, tracker)


def with_curves(trials: Sequence[TrialCurves], tracker: Any) -> list[TrialCurves]:
    """``trials`` with their metric histories (``CURVE_KEYS``), read in one call."""
    histories = tracker.histories([t.run_id for t in trials if t.run_id], CURVE_KEYS)
    for t in trials:
        t.curves = histories.get(t.run_id, {}) if t.run_id else {}
    return list(trials)


def varied_params(trials: Sequence[TrialCurves]) -> list[str]:
    """The params that take more than one value across the trials (a grid's axes)."""
    names: dict[str, set[str]] = {}
    for t in trials:
        for k, v in t.params.items():
            names.setdefault(k, set()).add(repr(v))
    return [k for k, values in names.items() if len(values) > 1]


def build_report(study: Any, tracker: Tracker, out: Path, grid: bool) -> list[Path]:
    """Write the study's figures (PNG) and one self-contained HTML page into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    frozen = study.get_trials(deepcopy=False)  # read once: the table's and Optuna's figures' trials
    every = collect(frozen, None, ("COMPLETE", "PRUNED", "FAIL"))
    trials = [t for t in every if t.state != "FAIL"]
    name = study.study_name
    way = direction(study)
    ranked = ranking(trials, way, ("COMPLETE", "PRUNED"))
    # The table: ranked, then the trials with no value to rank (diverged at once, failed).
    unranked = sorted((t for t in every if t not in ranked), key=lambda t: (t.state == "FAIL", t.number))
    figures: list[Path] = []
    # The curves the figures draw: every trial's on a grid, else the best trials' learning rates.
    with_curves(trials if grid else [t for t in ranked if t.state == "COMPLETE"][:TOP_CURVES], tracker)
    if grid and trials:
        figures.append(plot_grid(trials, name, out / "grid_accuracy.png"))
        figures.append(plot_grid_lr(trials, name, out / "grid_lr.png"))
    record = StudyRecord.from_attrs(study.user_attrs)  # read once: each access is a query
    objective = f"objective ({record.metric or 'value'})"
    # Optuna's figures: the two slowest drawn meanwhile by the tracker's process (here, for a
    # tracker in this one), the others here after lrsearch's own (two processes, about even).
    # (Not for population-based training: Optuna's figures read a trial's params, its first
    # draw, which its copies replaced; its own figure, pbt_schedule.png, shows what it found.)
    population = is_population(frozen)
    optuna_figures = () if population else _FIGURES_ELSEWHERE
    elsewhere = tracker.start(draw_optuna_figures, name, way, frozen, str(out), optuna_figures)
    figures.append(plot_history(trials, name, way, objective, out / "optimization_history.png"))
    figures.append(plot_objective_vs_lr(trials, name, objective, out / "objective_vs_lr.png"))
    if not grid:
        top = [t for t in ranked if t.state == "COMPLETE"][:TOP_CURVES]
        if any(t.curves.get("lr") for t in top):
            figures.append(plot_lr_curves(top, name, out / "lr_curves.png"))
    if not grid and ranked and population:  # population-based training: what it discovered
        best = next(t for t in frozen if t.number == ranked[0].number)
        figures.append(plot_schedule(frozen, best, name, out / "pbt_schedule.png"))
    _previews([p for p in figures if p.name in NOTE_FIGURES], out / PREVIEW_DIR)
    here = [
        Path(p) for p in draw_optuna_figures(None, name, way, frozen, str(out), () if population else _FIGURES_HERE)
    ]
    drawn = {p.name: p for p in [*here, *(Path(p) for p in elsewhere.result())]}
    figures += [drawn[f] for f in _OPTUNA_FIGURES if f in drawn]
    figures.append(
        write_html(name, ranked + unranked, figures, out / "report.html", tracker, way, record.experiment_id)
    )
    return figures


# Optuna's figures, in the page's order (file names), and who draws which.
_OPTUNA_FIGURES = ("param_importances.png", "parallel_coordinate.png", "slices.png", "contour_lr_momentum.png")
_FIGURES_ELSEWHERE = ("parallel_coordinate", "slices")
_FIGURES_HERE = ("importances", "contour")


def draw_optuna_figures(
    tracker: Any,
    name: str,
    way: str,
    trials: Sequence[Any],
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
    # 2.8 inches a panel: four across, copied PREVIEW_WIDTH pixels wide for the description,
    # keep their text as large as 3.2-inch panels had it in the 780-pixel copies before.
    fig = Figure(figsize=(2.8 * cols, 2.6 * rows + 0.6))
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
    return _lr_figure(trials, [], f"{name}: learning rate per epoch of the top {len(trials)} trials", path, rank=True)


# The lr curves' legend: in the description's PREVIEW_WIDTH-pixel copy of a NOTE_FIGURE_WIDTH
# figure, at about the size of the description's own text (12 pt at 680/576 pixels a point:
# ~14 px; "small" in the 10-inch figure it was, copied 780 pixels wide, was ~9 px).
LEGEND_PT = 12.0
_LEGEND_CHARS = 74  # a legend line's characters at LEGEND_PT in NOTE_FIGURE_WIDTH inches; longer labels wrap


def _lr_figure(trials: Sequence[TrialCurves], axes: Sequence[str], title: str, path: Path, rank: bool = False) -> Path:
    return _save(lr_figure(trials, axes, title, rank), path)


def lr_figure(trials: Sequence[TrialCurves], axes: Sequence[str], title: str, rank: bool = False) -> Any:
    """The learning rate per epoch of ``trials``, labelled by rank and params (``rank``) or by
    the grid's ``axes``; the legend below the curves (they fill the axes)."""
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from lrsearch.core.text import params_text

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
    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 3.9 + 0.26 * legend_lines))
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

    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 4.0))
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

    fig = Figure(figsize=(NOTE_FIGURE_WIDTH, 4.0))
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


def plot_importances(study: Any, name: str, out: Path) -> Path | None:
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
    ax.set(title=f"{name}: parameter importances (Optuna, PED-ANOVA) from {n} complete trials", xlabel="importance")
    ax.grid(alpha=0.3, axis="x")
    if n < FEW_TRIALS:
        fig.text(
            0.01,
            0.01,
            f"Only {n} complete trials (fewer than {FEW_TRIALS}): these importances can change "
            "completely from one study to the next.",
            color="tab:red",
            fontsize="small",
        )
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, out / "param_importances.png")


def plot_parallel_coordinate(study: Any, name: str, out: Path) -> Path | None:
    """Optuna's parallel coordinates of the complete trials."""
    with parallel_figure(study, name) as fig:
        return None if fig is None else _save(fig, out / "parallel_coordinate.png", tight=True)


def parallel_figure(study: Any, name: str) -> Any:
    """The parallel coordinates' figure (a context manager: closed after), None if nothing to
    draw. Optuna writes each parameter's tick labels beside its axis, where the trials' lines
    cross it: here on a white ground, above the lines, and the title clear of the top labels."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate as plot

    return optuna_figure(
        lambda: plot(study), f"{name}: parallel coordinates (complete trials)", (12, 5), _parallel_labels
    )


def _parallel_labels(fig: Any, axes: list[Any], title: str) -> None:
    (ax,) = axes
    ax.set_title(title, pad=16)  # the top tick labels reach above the axes
    twins = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]  # one per parameter
    _fit_tick_labels(fig, [twin.yaxis for twin in twins])
    for twin in twins:  # drawn after the lines: their labels are above them
        for tick in twin.yaxis.get_major_ticks() + twin.yaxis.get_minor_ticks():
            for label in (tick.label1, tick.label2):
                label.set_bbox(LABEL_GROUND)


def plot_slices(study: Any, name: str, out: Path) -> Path | None:
    """Optuna's slice plot: the objective against each parameter, one panel per parameter."""
    with slices_figure(study, name) as fig:
        return None if fig is None else _save(fig, out / "slices.png", tight=True)


# Behind the parallel coordinates' tick labels: the lines under them show only faintly.
LABEL_GROUND = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}
SLICE_COLUMNS = 3  # panels per row of the slice plot
SLICE_PANEL = (4.4, 3.3)  # inches per panel: room for a schedule's name under each of its ticks


def slices_figure(study: Any, name: str) -> Any:
    """The slice plot's figure (a context manager: closed after), None if nothing to draw.
    Optuna draws every panel in one row, as narrow as the figure allows, so neighbouring
    panels' tick labels ran into each other (``'adagrad''constant'``): here at most
    SLICE_COLUMNS panels a row, laid out so that labels keep clear of the next panel; a
    label that would still overlap another is turned or left out (:func:`_fit_tick_labels`)."""
    from optuna.visualization.matplotlib import plot_slice as plot

    return optuna_figure(
        lambda: plot(study), f"{name}: objective against each parameter (complete trials)", SLICE_PANEL, _slices_in_rows
    )


def _slices_in_rows(fig: Any, axes: list[Any], title: str) -> None:
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


def _is_categorical(axis: Any) -> bool:
    from matplotlib.category import StrCategoryFormatter

    formatter = axis.get_major_formatter()
    return isinstance(getattr(formatter, "inner", formatter), StrCategoryFormatter)  # (inside _labels)


def plot_contour(study: Any, name: str, out: Path) -> Path | None:
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
        f"{name}: objective over lr and momentum ({len(both)} trials with momentum)",
        (8, 6),
    ) as fig:
        return None if fig is None else _save(fig, out / "contour_lr_momentum.png", tight=True)


@contextlib.contextmanager
def optuna_figure(
    draw: Any, title: str, size: tuple[float, float], finish: Callable[[Any, list[Any], str], None] | None = None
) -> Iterator[Any]:
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


def _labels(inner: Any, kept: Sequence[float] | None = None, text: Callable[[str], str] | None = None) -> Any:
    """A tick formatter that labels as ``inner`` does, but only the ticks in ``kept`` (all if
    None), each label passed through ``text``. Offsets, and what ``inner`` learns from all
    the ticks' positions (a log axis's minor labels), stay its own."""
    if isinstance(inner, _labels_class()):  # one wrapper: the new choice of ticks replaces the old
        inner, text = getattr(inner, "inner"), text or getattr(inner, "text")  # noqa: B009 (typed as a plain type)
    return _labels_class()(inner, kept, text)


@functools.cache
def _labels_class() -> type:
    from matplotlib.ticker import Formatter  # here: importing the report module draws nothing

    class Labels(Formatter):
        def __init__(self, inner: Any, kept: Sequence[float] | None, text: Callable[[str], str] | None) -> None:
            self.inner, self.kept, self.text = inner, kept, text

        def set_axis(self, axis: Any) -> None:
            super().set_axis(axis)
            self.inner.set_axis(axis)

        def set_locs(self, locs: Sequence[float]) -> None:
            super().set_locs(list(locs))
            self.inner.set_locs(locs)

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            return [self._label(v, label) for v, label in zip(values, self.inner.format_ticks(values))]

        def __call__(self, x: float, pos: int | None = None) -> str:
            return self._label(x, self.inner(x, pos))

        def get_offset(self) -> str:
            return self.inner.get_offset()

        def _label(self, x: float, label: str) -> str:
            if self.kept is not None and not any(math.isclose(x, k, rel_tol=1e-9, abs_tol=1e-12) for k in self.kept):
                return ""
            return self.text(label) if self.text else label

    return Labels


def _fit_tick_labels(fig: Any, axes: Sequence[Any], turn: Sequence[Any] = ()) -> None:
    """Leave out the tick labels of each of ``axes`` (x or y Axis objects) that would overlap
    another of its labels as the figure draws: major ticks' first, then the minor ones a log
    axis labels, each in axis order. Those in ``turn`` (categories: each label is needed)
    are first turned, 30 degrees, then 90, while their labels overlap."""
    fig.canvas.draw()
    for angle in (30, 90):
        crowded = [axis for axis in turn if _overlap(_tick_labels(fig, axis))]
        if not crowded:
            break
        for axis in crowded:
            axis.set_tick_params(labelrotation=angle)
            for label in axis.get_ticklabels():
                label.set_horizontalalignment("right" if angle == 30 else "center")
                label.set_rotation_mode("anchor" if angle == 30 else "default")
        fig.canvas.draw()
    for axis in axes:
        kept: list[Any] = []
        for minor in (False, True):
            keep = []
            for loc, box in _tick_labels(fig, axis, minor):
                if not any(box.overlaps(other) for other in kept):
                    kept.append(box)
                    keep.append(loc)
            if minor:
                axis.set_minor_formatter(_labels(axis.get_minor_formatter(), kept=keep))
            else:
                axis.set_major_formatter(_labels(axis.get_major_formatter(), kept=keep))


def _tick_labels(fig: Any, axis: Any, minor: bool | None = None) -> list[tuple[float, Any]]:
    """(position, drawn extent with 2 pixels' margin) of the tick labels that ``axis`` drew:
    its major ticks', its minor ticks', or both (None)."""
    renderer = fig.canvas.get_renderer()
    low, high = sorted(axis.get_transform().transform(axis.get_view_interval()))
    slack = (high - low) * 1e-9
    out = []
    for is_minor in (False, True) if minor is None else (minor,):
        ticks = axis.get_minor_ticks() if is_minor else axis.get_major_ticks()
        for tick in ticks:
            where = axis.get_transform().transform(tick.get_loc())
            if not low - slack <= where <= high + slack:
                continue  # not drawn
            for label in (tick.label1, tick.label2):
                if label.get_visible() and label.get_text():
                    out.append((tick.get_loc(), label.get_window_extent(renderer).padded(2)))
    return out


def _overlap(labels: Sequence[tuple[float, Any]]) -> bool:
    boxes = [box for _, box in labels]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.3f}"  # whole milliseconds, as run, best and the views show them


def write_html(
    name: str,
    rows: Sequence[TrialCurves],
    figures: Sequence[Path],
    path: Path,
    tracker: Tracker | None = None,
    way: str = "maximize",
    experiment_id: str | None = None,
) -> Path:
    """One self-contained page: the figures inline, full width, and a table of the trials in
    ``rows``' order (the study's ranking: its direction, COMPLETE before PRUNED, then trials
    without a value) with their
    epochs, training seconds (its share of its array's), wall seconds, why they stopped and a link to their MLflow
    run."""

    def link(t: TrialCurves) -> str:
        if not t.run_id:
            return ""
        if tracker is None or experiment_id is None:
            return html.escape(t.run_id)
        url = html.escape(tracker.run_url(experiment_id, t.run_id))
        return f'<a href="{url}">{html.escape(t.run_id[:8])}</a>'

    def ranked(t: TrialCurves) -> bool:
        return t.state != "FAIL" and t.value is not None and math.isfinite(t.value)

    table = "".join(
        f"<tr><td>{rank if ranked(t) else ''}</td><td>{t.number}</td><td>{t.state}</td>"
        f"<td>{'' if t.value is None else f'{t.value:.4f}'}</td><td>{'' if t.epochs is None else t.epochs}</td>"
        f"<td>{_seconds(t.duration_s)}</td><td>{_seconds(t.wall_s)}</td>"
        f"<td>{html.escape(_label(t, []))}{'' if t.lineage is None else f' ({html.escape(t.lineage)})'}</td>"
        f"<td>{html.escape(t.reason or '')}</td><td>{link(t)}</td></tr>"
        for rank, t in enumerate(rows, 1)
    )
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>'
        for p in figures
    )
    where = (
        ""
        if tracker is None or is_server(tracker.uri)
        else f" (MLflow links: start the UI with <code>lrsearch ui</code>, default port {DEFAULT_UI_PORT})"
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>lrsearch report: {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}figure{margin:1em 0}"
        "img{width:100%;height:auto}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
        "tr:nth-child(even){background:#f4f4f4}</style></head>"
        f"<body><h1>lrsearch report: {html.escape(name)}</h1>{images}"
        f"<h2>Trials, best first ({way}; COMPLETE before PRUNED, then trials without a value){where}</h2>"
        "<table><tr><th>rank</th><th>trial</th><th>state</th><th>objective</th><th>epochs</th><th>training s</th>"
        "<th>wall s</th>"
        f"<th>params</th><th>why it stopped</th><th>MLflow run</th></tr>{table}</table></body></html>"
    )
    return path


def experiment_table(trials: Sequence[TrialCurves], threshold: float = 0.80) -> str:
    """A Markdown table: per grid value, final validation accuracy and the first epoch
    (counted from 1) at which it reaches ``threshold``."""
    axes = varied_params(trials)
    header = " | ".join(axes or ["trial"])
    lines = [
        f"| {header} | final val acc | first epoch with val acc ≥ {threshold:.2f} |",
        "|" + "---|" * (len(axes or ["trial"]) + 2),
    ]
    for t in _grid_order(trials, axes):
        cells = [_fmt(t.hyperparameters.get(a, t.params.get(a))) for a in axes] or [str(t.number)]
        epoch = t.first_epoch_reaching("val/acc", threshold)
        final = t.final("val/acc")
        lines.append(
            f"| {' | '.join(cells)} | {'' if final is None else f'{final:.3f}'} | "
            f"{'never' if epoch is None else epoch + 1} |"
        )
    return "\n".join(lines)
