"""A study's report, drawn from stored results (Optuna's trials, MLflow's metric histories;
nothing is trained again): its figures (``figures.py``, ``optuna_figures.py``, and the
discovered schedule of ``lineage.py``) and its page (``page.py``), written beside the store
and logged on the study's parent run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lrsearch.core import attrs
from lrsearch.core.names import NOTE_FIGURES, PREVIEW_DIR
from lrsearch.core.study_record import StudyRecord
from lrsearch.results.descriptions import write_study_note
from lrsearch.results.figures import (
    _previews,
    plot_grid,
    plot_grid_lr,
    plot_history,
    plot_lr_curves,
    plot_objective_vs_lr,
)
from lrsearch.results.lineage import is_population, plot_schedule
from lrsearch.results.optuna_figures import _FIGURES_ELSEWHERE, _FIGURES_HERE, _OPTUNA_FIGURES, draw_optuna_figures
from lrsearch.results.page import experiment_table, write_html
from lrsearch.results.ranking import direction, load_study, ranking
from lrsearch.results.trial_curves import collect, with_curves
from lrsearch.store.folders import report_dir
from lrsearch.store.urls import storage_url, tracking_uri
from lrsearch.track.tracking import Tracker

if TYPE_CHECKING:
    import optuna

    from lrsearch.track.process import TrackerLike


def write_report(
    name: str,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    out: Path | None = None,
    study: optuna.Study | None = None,
    tracker: TrackerLike | None = None,
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


TOP_CURVES = 5  # trials whose learning-rate curves the report draws


def build_report(study: optuna.Study, tracker: TrackerLike, out: Path, grid: bool) -> list[Path]:
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
