"""The report's page (one self-contained HTML file: the figures inline and the trials' table)
and the experiments' Markdown table."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lrsearch.core.names import DEFAULT_UI_PORT
from lrsearch.results.figures import _fmt, _grid_order, _label
from lrsearch.results.trial_curves import TrialCurves, varied_params
from lrsearch.store.urls import is_server

if TYPE_CHECKING:
    from lrsearch.track.process import TrackerLike


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.3f}"  # whole milliseconds, as run, best and the views show them


def write_html(
    name: str,
    rows: Sequence[TrialCurves],
    figures: Sequence[Path],
    path: Path,
    tracker: TrackerLike | None = None,
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
