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
from lrsearch.optimizers import OPTIMIZERS
from lrsearch.results import best_so_far, direction, load_study, ranking
from lrsearch.storage import report_dir, storage_url, tracking_uri
from lrsearch.tracking import History, Tracker


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
    fig.savefig(path, dpi=80)
    return path


def _line(ax, history: History, key: str, label: str) -> None:
    points = history.get(key)
    if points:
        ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=label)


# -- a study's report ---------------------------------------------------------------------

CURVE_KEYS = ("train/acc", "val/acc", "lr")


@dataclass
class TrialCurves:
    """One finished trial: its number, state, value, hyperparameters and per-epoch curves."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    hyperparameters: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        return next((step for step, v in self.curves.get(key, []) if v >= threshold), None)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None


def collect(study: Any, tracker: Tracker) -> list[TrialCurves]:
    """The study's COMPLETE and PRUNED trials with their MLflow metric histories."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        run_id = t.user_attrs.get(attrs.MLFLOW_RUN)
        curves = tracker.curves(run_id, CURVE_KEYS) if run_id else {}
        trials.append(TrialCurves(t.number, t.state.name, t.value, dict(t.params),
                                  dict(t.user_attrs.get(attrs.HYPERPARAMETERS, t.params)), curves))
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
    trials = collect(study, tracker)
    name = study.study_name
    figures: list[Path] = []
    if grid and trials:
        figures.append(plot_grid(trials, name, out / "grid_accuracy.png"))
        figures.append(plot_grid_lr(trials, name, out / "grid_lr.png"))
    objective = f"objective ({study.user_attrs.get(attrs.METRIC, 'value')})"
    figures.append(plot_history(trials, name, direction(study), objective,
                                out / "optimization_history.png"))
    figures.append(plot_objective_vs_lr(trials, name, objective, out / "objective_vs_lr.png"))
    importance = plot_importances(study, name, out / "param_importances.png")
    if importance is not None:
        figures.append(importance)
    figures.append(write_html(name, ranking(trials, direction(study), ("COMPLETE", "PRUNED")), figures,
                              out / "report.html"))
    return figures


def _label(t: TrialCurves, axes: Sequence[str]) -> str:
    keys = axes or list(t.params)
    return ", ".join(f"{k}={_fmt(t.hyperparameters.get(k, t.params.get(k)))}" for k in keys)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
    fig.savefig(path, dpi=90)
    return path


def plot_grid_lr(trials: Sequence[TrialCurves], name: str, path: Path) -> Path:
    """The learning rate per epoch of every trial, overlaid, on a log axis."""
    from matplotlib.figure import Figure

    axes_names = varied_params(trials)
    fig = Figure(figsize=(9.5, 4.5))
    ax = fig.subplots()
    for t in _grid_order(trials, axes_names):
        points = t.curves.get("lr", [])
        ax.plot([s for s, _ in points], [v for _, v in points], label=_label(t, axes_names))
    if any(v > 0 for t in trials for _, v in t.curves.get("lr", [])):
        ax.set_yscale("log")
    ax.set(title=f"{name}: learning rate per epoch", xlabel="epoch", ylabel="learning rate (at epoch start)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: curves fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_history(trials: Sequence[TrialCurves], name: str, direction: str, objective: str, path: Path) -> Path:
    """Objective per trial, and the best so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    done = sorted((t for t in trials if t.state == "COMPLETE" and t.value is not None), key=lambda t: t.number)
    pruned = [t for t in trials if t.state == "PRUNED" and t.value is not None]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", s=18)
    ax.scatter([t.number for t in pruned], [t.value for t in pruned], label="pruned (last reported)",
               s=18, marker="x", color="grey")
    line = [t.value for t in best_so_far(done, direction)]
    ax.step([t.number for t in done], line, where="post", color="tab:red", label="best so far")
    ax.set(title=f"{name}: optimization history", xlabel="trial number", ylabel=objective)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_objective_vs_lr(trials: Sequence[TrialCurves], name: str, objective: str, path: Path) -> Path:
    """Objective against learning rate (log axis), coloured by optimizer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    by_optimizer: dict[str, list[TrialCurves]] = {}
    for t in trials:
        if t.value is not None and t.hyperparameters.get("lr"):
            by_optimizer.setdefault(str(t.hyperparameters.get("optimizer", "?")), []).append(t)
    for optimizer, group in sorted(by_optimizer.items()):
        ax.scatter([t.hyperparameters["lr"] for t in group], [t.value for t in group], label=optimizer,
                   color=OPTIMIZERS[optimizer].colour if optimizer in OPTIMIZERS else None, s=24)
    ax.set_xscale("log")
    ax.set(title=f"{name}: objective against learning rate", xlabel="learning rate (log scale)",
           ylabel=objective)
    ax.grid(alpha=0.3)
    if by_optimizer:
        ax.legend(title="optimizer", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_importances(study: Any, name: str, path: Path) -> Path | None:
    """Optuna's parameter importances (its default evaluator: PED-ANOVA since Optuna 5), or
    None when there is nothing to rank."""
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
    fig = Figure(figsize=(8, 0.5 * len(importances) + 1.5))
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(title=f"{name}: parameter importances (Optuna, PED-ANOVA)", xlabel="importance")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def write_html(name: str, rows: Sequence[TrialCurves], figures: Sequence[Path], path: Path) -> Path:
    """One self-contained page: the figures inline and a table of the trials in ``rows``'
    order (the study's ranking)."""
    table = "".join(
        f"<tr><td>{t.number}</td><td>{t.state}</td><td>{t.value:.4f}</td>"
        f"<td>{html.escape(_label(t, []))}</td></tr>" for t in rows)
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in figures)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>lrsearch report: {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}td,th{padding:2px 10px;"
        "text-align:left}</style></head>"
        f"<body><h1>lrsearch report: {html.escape(name)}</h1>{images}"
        "<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>objective</th><th>params</th></tr>"
        f"{table}</table></body></html>")
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
