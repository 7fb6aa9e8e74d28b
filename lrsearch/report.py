"""Plots and tables drawn from stored results (Optuna's trials, MLflow's metric histories);
nothing is trained again."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lrsearch import attrs
from lrsearch.descriptions import DEFAULT_UI_PORT, write_study_note
from lrsearch.optimizers import OPTIMIZERS
from lrsearch.results import best_so_far, direction, load_study, ranking
from lrsearch.space import in_sampling_order
from lrsearch.storage import report_dir, storage_url, tracking_uri
from lrsearch.tracking import History, Tracker, is_server


def write_report(name: str, *, storage: str | None = None, tracking: str | None = None,
                 out: Path | None = None, study: Any = None) -> list[Path]:
    """Draw the study's report from the stores into ``out`` (default: see
    ``storage.report_dir``) and log it under ``report/`` on the parent MLflow run.
    ``study``: the study already open (as at the end of ``run``), read through its storage."""
    study = study or load_study(name, storage)
    tracker = Tracker(tracking_uri(tracking))
    out = out or report_dir(storage_url(storage), name)
    grid = any(attrs.GRID_ID in t.system_attrs for t in study.get_trials(deepcopy=False))
    paths = build_report(study, tracker, out, grid=grid)
    parent = study.user_attrs.get(attrs.PARENT_RUN)
    if parent:
        tracker.log_dir(parent, out, "report")
        write_study_note(study, tracker)  # the description shows the figures just logged
    return paths


def results_table(name: str, *, storage: str | None = None, tracking: str | None = None) -> str:
    """The Markdown results table of a (grid) study, from the stores."""
    return experiment_table(collect(load_study(name, storage), Tracker(tracking_uri(tracking))))


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


def _line(ax, history: History, key: str, label: str) -> None:
    points = history.get(key)
    if points:
        ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=label)


# -- a study's report ---------------------------------------------------------------------

CURVE_KEYS = ("train/acc", "val/acc", "lr")
DPI = 200  # hi-dpi PNGs: sharp when the page shows them at full width
TOP_CURVES = 5  # trials whose learning-rate curves the report draws
FEW_TRIALS = 20  # below this many complete trials, parameter importances are noise
# The report's figures that the parent run's description shows (the others are in report.html),
# as copies PREVIEW_WIDTH pixels wide in preview/: MLflow shows a description's images at their
# own size (its Markdown drops width attributes), and the box is about 800 pixels wide.
NOTE_FIGURES = ("grid_accuracy.png", "optimization_history.png", "objective_vs_lr.png", "lr_curves.png")
PREVIEW_DIR, PREVIEW_WIDTH = "preview", 780


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
    reason: str | None = None
    run_id: str | None = None

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        return next((step for step, v in self.curves.get(key, []) if v >= threshold), None)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None


def collect(study: Any, tracker: Tracker, states: Sequence[str] = ("COMPLETE", "PRUNED")) -> list[TrialCurves]:
    """The study's trials in ``states`` with their MLflow metric histories."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in states:
            continue
        run_id = t.user_attrs.get(attrs.MLFLOW_RUN)
        curves = tracker.curves(run_id, CURVE_KEYS) if run_id else {}
        value = t.value
        if value is None and t.intermediate_values:  # pruned: its last report is what was judged
            value = t.intermediate_values[max(t.intermediate_values)]
        trials.append(TrialCurves(
            t.number, t.state.name, value, in_sampling_order(t.params),
            dict(t.user_attrs.get(attrs.HYPERPARAMETERS, t.params)), curves,
            epochs=t.user_attrs.get(attrs.EPOCHS_TRAINED),
            duration_s=t.duration.total_seconds() if t.duration is not None else None,
            reason=t.user_attrs.get(attrs.REASON), run_id=run_id))
    return trials


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
    every = collect(study, tracker, ("COMPLETE", "PRUNED", "FAIL"))
    trials = [t for t in every if t.state != "FAIL"]
    name = study.study_name
    way = direction(study)
    ranked = ranking(trials, way, ("COMPLETE", "PRUNED"))
    # The table: ranked, then the trials with no value to rank (diverged at once, failed).
    unranked = sorted((t for t in every if t not in ranked), key=lambda t: (t.state == "FAIL", t.number))
    figures: list[Path] = []
    if grid and trials:
        figures.append(plot_grid(trials, name, out / "grid_accuracy.png"))
        figures.append(plot_grid_lr(trials, name, out / "grid_lr.png"))
    user_attrs = study.user_attrs  # read once: each access is a query
    objective = f"objective ({user_attrs.get(attrs.METRIC, 'value')})"
    figures.append(plot_history(trials, name, way, objective, out / "optimization_history.png"))
    figures.append(plot_objective_vs_lr(trials, name, objective, out / "objective_vs_lr.png"))
    if not grid:
        top = [t for t in ranked if t.state == "COMPLETE"][:TOP_CURVES]
        if any(t.curves.get("lr") for t in top):
            figures.append(plot_lr_curves(top, name, out / "lr_curves.png"))
    for plot in (plot_importances, plot_parallel_coordinate, plot_slices, plot_contour):
        path = plot(study, name, out)
        if path is not None:
            figures.append(path)
    _previews([p for p in figures if p.name in NOTE_FIGURES], out / PREVIEW_DIR)
    figures.append(write_html(name, ranked + unranked, figures, out / "report.html", tracker, way,
                              user_attrs.get(attrs.EXPERIMENT)))
    return figures


def _previews(figures: Sequence[Path], folder: Path) -> None:
    """Copies of ``figures`` scaled down to PREVIEW_WIDTH pixels (for MLflow's description box)."""
    from PIL import Image  # matplotlib's own dependency

    folder.mkdir(exist_ok=True)
    for path in figures:
        with Image.open(path) as image:
            height = round(image.height * PREVIEW_WIDTH / image.width)
            image.resize((PREVIEW_WIDTH, height), Image.LANCZOS).save(folder / path.name, optimize=True)


def _label(t: TrialCurves, axes: Sequence[str]) -> str:
    keys = axes or list(t.params)
    return ", ".join(f"{k}={_fmt(t.hyperparameters.get(k, t.params.get(k)))}" for k in keys)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _grid_order(trials: Sequence[TrialCurves], axes: Sequence[str]) -> list[TrialCurves]:
    def key(t: TrialCurves) -> tuple:
        return tuple((0, -v) if isinstance(v, (int, float)) else (1, str(v))
                     for v in (t.params.get(a) for a in axes))
    return sorted(trials, key=key)


def plot_grid(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The classic figure grid: one panel per grid value, train and validation accuracy per epoch."""
    from matplotlib.figure import Figure

    axes_names = varied_params(trials)
    ordered = _grid_order(trials, axes_names)
    cols = min(4, len(ordered))
    rows = math.ceil(len(ordered) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows + 0.6))
    panels = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, t in zip(panels, ordered):
        for key, label in (("train/acc", "train"), ("val/acc", "validation")):
            points = t.curves.get(key, [])
            ax.plot([s for s, _ in points], [v for _, v in points], label=label)
        ax.set_title(_label(t, axes_names), fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in panels[len(ordered):]:
        ax.set_visible(False)
    for ax in panels[(rows - 1) * cols:]:
        ax.set_xlabel("epoch")
    for ax in panels[::cols]:
        ax.set_ylabel("accuracy")
    panels[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{name}: accuracy per epoch, one panel per value")
    fig.tight_layout()
    return _save(fig, path)


def plot_grid_lr(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The learning rate per epoch of every trial, overlaid, on a log axis."""
    return _lr_figure(_grid_order(trials, varied_params(trials)), varied_params(trials),
                      f"{name}: learning rate per epoch", path)


def plot_lr_curves(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The learning rate per epoch (``lr`` from MLflow) of the top trials, best first."""
    return _lr_figure(trials, [], f"{name}: learning rate per epoch of the top {len(trials)} trials", path,
                      rank=True)


def _lr_figure(trials: Sequence[TrialCurves], axes: Sequence[str], title: str, path: Path,
               rank: bool = False) -> Path:
    from matplotlib.figure import Figure

    from lrsearch.descriptions import params_text

    fig = Figure(figsize=(10, 4.5 + 0.25 * len(trials)))
    ax = fig.subplots()
    for i, t in enumerate(trials, 1):
        points = t.curves.get("lr", [])
        label = (f"#{i}, trial {t.number} ({t.value:.4g}): {params_text(t.params)}" if rank
                 else _label(t, axes))
        ax.plot([s for s, _ in points], [v for _, v in points], label=label,
                linestyle=("-", "--", ":")[(i - 1) // 10 % 3])  # colours repeat after ten
    if any(v > 0 for t in trials for _, v in t.curves.get("lr", [])):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="epoch", ylabel="learning rate (at epoch start)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: curves fill the axes
    fig.tight_layout()
    return _save(fig, path)


def plot_history(trials: Sequence[TrialCurves], name: str, direction: str, objective: str, path: Path) -> Path:
    """Objective per trial (pruned trials hollow, at their last report), and the best so far
    (of COMPLETE trials) carried to the last trial."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    ordered = sorted(trials, key=lambda t: t.number)
    done = [t for t in ordered if t.state == "COMPLETE" and t.value is not None]
    pruned = [t for t in ordered if t.state == "PRUNED" and t.value is not None and math.isfinite(t.value)]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", s=22, color="tab:blue")
    ax.scatter([t.number for t in pruned], [t.value for t in pruned], label="pruned (the value the pruner judged)",
               s=22, facecolors="none", edgecolors="grey")
    xs, ys = best_line(ordered, direction)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"{name}: optimization history", xlabel="trial number", ylabel=objective)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def best_line(trials: Sequence[TrialCurves], direction: str) -> tuple[list[int], list[float]]:
    """The "best so far" steps over ``trials`` (in trial order): the best COMPLETE value at each
    COMPLETE trial, carried on to the last trial, whatever its state."""
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not done:
        return [], []
    best = best_so_far(done, direction)
    return [t.number for t in done] + [trials[-1].number], [t.value for t in best] + [best[-1].value]


def plot_objective_vs_lr(trials: Sequence[TrialCurves], name: str, objective: str, path: Path) -> Path:
    """Objective against learning rate (log axis), coloured by optimizer; pruned trials hollow."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(10, 4.5))
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
                ax.scatter([t.hyperparameters["lr"] for t in points], [t.value for t in points], s=28,
                           facecolors=face, edgecolors=colour, color=colour if face != "none" else None)
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=optimizer))
    if any(t.state == "PRUNED" for group in by_optimizer.values() for t in group):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="grey",
                              label="hollow: pruned (the value the pruner judged)"))
    ax.set_xscale("log")
    ax.set(title=f"{name}: objective against learning rate", xlabel="learning rate (log scale)",
           ylabel=objective)
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
    ax.set(title=f"{name}: parameter importances (Optuna, PED-ANOVA) from {n} complete trials",
           xlabel="importance")
    ax.grid(alpha=0.3, axis="x")
    if n < FEW_TRIALS:
        fig.text(0.01, 0.01, f"Only {n} complete trials (fewer than {FEW_TRIALS}): these importances can change "
                 "completely from one study to the next.", color="tab:red", fontsize="small")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, out / "param_importances.png")


def plot_parallel_coordinate(study: Any, name: str, out: Path) -> Path | None:
    """Optuna's parallel coordinates of the complete trials."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate as plot

    return _optuna_figure(lambda: plot(study), f"{name}: parallel coordinates (complete trials)",
                          out / "parallel_coordinate.png", (12, 5))


def plot_slices(study: Any, name: str, out: Path) -> Path | None:
    """Optuna's slice plot: the objective against each parameter, one panel per parameter."""
    from optuna.visualization.matplotlib import plot_slice as plot

    n = len({k for t in study.get_trials(deepcopy=False) for k in t.params})
    return _optuna_figure(lambda: plot(study), f"{name}: objective against each parameter (complete trials)",
                          out / "slices.png", (min(max(3.2 * n, 10), 20), 4))


def plot_contour(study: Any, name: str, out: Path) -> Path | None:
    """Optuna's contour of lr against momentum, over the trials that have both (two or more,
    with more than one value of each)."""
    from optuna.visualization.matplotlib import plot_contour as plot

    both = [t for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and {"lr", "momentum"} <= set(t.params)]
    if len({t.params["lr"] for t in both}) < 2 or len({t.params["momentum"] for t in both}) < 2:
        return None
    return _optuna_figure(lambda: plot(study, params=["lr", "momentum"]),
                          f"{name}: objective over lr and momentum ({len(both)} trials with momentum)",
                          out / "contour_lr_momentum.png", (8, 6))


def _optuna_figure(draw: Any, title: str, path: Path, size: tuple[float, float]) -> Path | None:
    """Save one of ``optuna.visualization.matplotlib``'s plots (drawn with pyplot, on its own
    figure, closed after) at the report's size and resolution; None if it has nothing to draw."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # pyplot's figure manager without a screen
    import matplotlib.pyplot as plt
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            drawn = draw()
        except (ValueError, RuntimeError, KeyError):
            return None
    axes = list(getattr(drawn, "ravel", lambda: [drawn])())
    fig = axes[0].figure
    try:
        if not any(ax.has_data() for ax in axes):
            return None
        fig.set_size_inches(*size)
        if len(axes) == 1:
            axes[0].set_title(title)  # instead of Optuna's generic one
        else:
            fig.suptitle(title)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")  # Optuna places its colour bar itself
        return path
    finally:
        plt.close(fig)


def write_html(name: str, rows: Sequence[TrialCurves], figures: Sequence[Path], path: Path,
               tracker: Tracker | None = None, way: str = "maximize", experiment_id: str | None = None) -> Path:
    """One self-contained page: the figures inline, full width, and a table of the trials in
    ``rows``' order (the study's ranking: its direction, COMPLETE before PRUNED, then trials
    without a value) with their
    epochs, duration, why they stopped and a link to their MLflow run."""
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
        f"<td>{'' if t.duration_s is None else f'{t.duration_s:.1f}'}</td>"
        f"<td>{html.escape(_label(t, []))}</td><td>{html.escape(t.reason or '')}</td><td>{link(t)}</td></tr>"
        for rank, t in enumerate(rows, 1))
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in figures)
    where = ("" if tracker is None or is_server(tracker.uri)
             else f" (MLflow links: start the UI with <code>lrsearch ui</code>, default port {DEFAULT_UI_PORT})")
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>lrsearch report: {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}figure{margin:1em 0}"
        "img{width:100%;height:auto}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
        "tr:nth-child(even){background:#f4f4f4}</style></head>"
        f"<body><h1>lrsearch report: {html.escape(name)}</h1>{images}"
        f"<h2>Trials, best first ({way}; COMPLETE before PRUNED, then trials without a value){where}</h2>"
        "<table><tr><th>rank</th><th>trial</th><th>state</th><th>objective</th><th>epochs</th><th>s</th>"
        f"<th>params</th><th>why it stopped</th><th>MLflow run</th></tr>{table}</table></body></html>")
    return path


def experiment_table(trials: Sequence[TrialCurves], threshold: float = 0.80) -> str:
    """A Markdown table: per grid value, final validation accuracy and the first epoch
    (counted from 1) at which it reaches ``threshold``."""
    axes = varied_params(trials)
    header = " | ".join(axes or ["trial"])
    lines = [f"| {header} | final val acc | first epoch with val acc ≥ {threshold:.2f} |",
             "|" + "---|" * (len(axes or ["trial"]) + 2)]
    for t in _grid_order(trials, axes):
        cells = [_fmt(t.hyperparameters.get(a, t.params.get(a))) for a in axes] or [str(t.number)]
        epoch = t.first_epoch_reaching("val/acc", threshold)
        final = t.final("val/acc")
        lines.append(f"| {' | '.join(cells)} | {'' if final is None else f'{final:.3f}'} | "
                     f"{'never' if epoch is None else epoch + 1} |")
    return "\n".join(lines)
