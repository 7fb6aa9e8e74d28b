"""What a study's and a trial's MLflow runs say about themselves in the MLflow UI.

- A run's description: MLflow renders the tag ``mlflow.note.content`` as Markdown on the run
  page. The study's parent run gets its outcome, a table of the top trials linked to their
  runs and the report's figures; each trial's run gets one line (its hyperparameters and how
  it ended), because the runs table shows a pruned trial only as "Killed".
- The trials table: an MLflow *shared view* (an experiment tag
  ``mlflow.sharedViewState.<key>`` holding the runs table's state as JSON; MLflow 3.17's UI
  reads it for ``…/runs?viewStateShareKey=<key>``) filters the experiment to the study's
  trials, ranks them by the one ranking (each COMPLETE trial's ``rank_key`` tag; the others,
  without one, come after) and shows the objective, the searched hyperparameters, the state
  and the pruning reason as columns.

Links inside descriptions are relative to the UI (``#/experiments/…``, ``get-artifact?…``),
so they work whatever host and port serve it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from lrsearch.core import attrs
from lrsearch.core.names import (
    NOTE_FIGURES,
    OBJECTIVE_METRIC,
    PREVIEW_DIR,
    RANK_TAG,
    model_version_path,
    run_path,
    trials_path,
)
from lrsearch.core.phase import explain
from lrsearch.core.study_record import StudyRecord
from lrsearch.core.text import count, exploits_text, fmt, params_text

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lrsearch.track.outbox import Outbox
    from lrsearch.track.process import TrackerLike
    from lrsearch.track.tracking import Tracker

TOP_TRIALS = 10
# MLflow 3.17's run page draws a description's tables with neither cell padding nor borders
# (its sanitizer drops style and class attributes), so neighbouring columns ran together
# (`val/accepochs`). Each cell but a row's last ends in this gap: an entity, not a space
# character, which the Markdown renderer would trim from the cell.
CELL_GAP = "&emsp;&ensp;"  # 1.5 em
_MAX_NOTE = 8000  # MLflow's limit on a tag value


def trial_note(
    state: str,
    reason: str | None,
    metric: str,
    value: float | None,
    epochs: int,
    params: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
) -> str:
    """One line for a trial's run: how it ended, then its sampled hyperparameters (a member
    of population-based training: those it ended with, from which draw, and its copies)."""
    if state == "COMPLETE" and value is not None:
        ended = f"COMPLETE: {metric} {fmt(value)} after {count(epochs, 'epoch')}"
    else:
        ended = f"{state}: {reason or 'no reason recorded'}"
    if lineage is not None:
        return (
            f"{ended} · ended with {params_text(lineage['final'])} · drawn with {params_text(params)} · "
            f"{exploits_text(lineage['exploits'], limit=20)}"
        )
    return f"{ended} · {params_text(params)}" if params else ended


def trials_view(study_name: str, direction: str, metric: str, params: Sequence[str]) -> str:
    """The shared view's state (JSON): the study's trials, best first, with the columns that
    explain them. Column keys are the UI's own (``metrics.`val/acc```)."""
    columns = [
        f"metrics.`{OBJECTIVE_METRIC}`",
        f"metrics.`{metric}`",
        *(f"params.`{p}`" for p in params),
        "tags.`state`",
        "tags.`reason`",
    ]
    return json.dumps(
        {
            "searchFilter": f"tags.study = '{study_name}'",
            "orderByKey": f"tags.`{RANK_TAG}`",
            "orderByAsc": True,  # best first in the study's direction: see ranking.rank_key
            "selectedColumns": columns,
        }
    )


def study_note(
    study: optuna.Study,
    *,
    phase: str,
    experiment_id: str,
    figures: Sequence[str] = (),
    parent_run_id: str | None = None,
    pruner: str | None = None,
    user_attrs: Mapping[str, Any] | None = None,
) -> str:
    """The parent run's description: the study's outcome, its top trials linked to their runs,
    and ``figures`` (artifact paths of this run, e.g. ``report/optimization_history.png``).
    ``phase``: what the study is doing (a phase of ``phase.py``: "running", "done", …). ``user_attrs``: the
    study's, if already read (each ``study.user_attrs`` is a query)."""
    from optuna.trial import TrialState

    from lrsearch.choices.space import in_sampling_order
    from lrsearch.results.lineage import final_params, line, schedule_text
    from lrsearch.results.ranking import by_state, direction, duration_s, ranking, state_text

    trials = study.get_trials(deepcopy=False)
    record = StudyRecord.from_attrs(study.user_attrs if user_attrs is None else user_attrs)
    metric = record.metric or "value"
    target = record.target
    counts = by_state(trials)
    finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    counted = state_text(counts) or "no trials yet"
    way = direction(study)
    lines = [
        f"**{study.study_name}** · {phase} · {finished} of "
        f"{count(target, 'trial') if target is not None else '? trials'} ({counted}) · {way} {metric}",
        "",
    ]
    why = explain(phase, record.unrunnable, record.interrupted)
    if why:
        lines += [f"{phase.capitalize()}: {why}.", ""]
    best = ranking(trials, way)
    if best:
        b = best[0]
        lines += [
            f"Best {metric}: **{fmt(b.value)}**, [trial {b.number}]({_trial_link(experiment_id, b)}): "
            f"{params_text(in_sampling_order(final_params(b)))}",
            "",
        ]
        if attrs.PBT in b.user_attrs:  # population-based training: what it found, and how
            lines += [
                f"Its discovered schedule (population-based training; the trials that trained its network, "
                f"in turn): {schedule_text(line(trials, b))}. Drawn with "
                f"{params_text(in_sampling_order(b.params))}; "
                f"{exploits_text(b.user_attrs[attrs.PBT]['exploits'])}.",
                "",
            ]
        model = record.model
        if model:  # registered when the study finished (or by `lrsearch best --register`)
            lines += [
                f"Model: [`{model.uri}`]({model_version_path(model.name, model.version)}) "
                f"(version {model.version}, trial {model.trial}): "
                f'`mlflow.pyfunc.load_model("{model.uri}")` takes the data\'s feature columns and '
                f"returns each row's label and class probabilities.",
                "",
            ]
        lines += [_table_row(["rank", "trial", metric, "epochs", "s", "params"]), "|---|---|---|---|---|---|"]
        for rank, t in enumerate(best[:TOP_TRIALS], 1):
            seconds = duration_s(t)
            # The trial's number alone: "trial-10" broke at its hyphen in a narrow box.
            lines.append(
                _table_row(
                    [
                        str(rank),
                        f"[{t.number}]({_trial_link(experiment_id, t)})",
                        fmt(t.value),
                        str(t.user_attrs.get(attrs.EPOCHS_TRAINED, "")),
                        "" if seconds is None else f"{seconds:.1f}",
                        params_text(in_sampling_order(final_params(t))),
                    ]
                )
            )
        lines.append("")
    pruned = counts.get("PRUNED", 0)
    if pruned:
        lines += [
            f"{count(pruned, 'trial')} {'was' if pruned == 1 else 'were'} stopped early "
            f"(PRUNED{f', by the {pruner} pruner' if pruner else ''}; "
            f"the reason is each trial run's description and `reason` tag). "
            f"[All trials, best first]({trials_path(experiment_id)})",
            "",
        ]
    elif trials:
        lines += [f"[All trials, best first]({trials_path(experiment_id)})", ""]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        last = failed[-1]
        lines += [
            f"{count(len(failed), 'trial')} failed (retried: they do not count); the last, trial {last.number}: "
            f"{last.user_attrs.get(attrs.REASON, 'no reason recorded')}",
            "",
        ]
    return with_figures("\n".join(lines), figures, parent_run_id)


def with_figures(text: str, figures: Sequence[str], parent_run_id: str | None) -> str:
    """A study's description ``text`` with ``figures`` (artifact paths of its parent run)
    below it, within MLflow's limit on a tag."""
    lines = [text.rstrip(), ""]
    if figures and parent_run_id:
        lines.append(
            "Figures from the study's report (this run's artifacts, `report/`: full size there, "
            "and all of them in `report.html`):"
        )
        lines.append("")
        lines += [
            f"![{_title(path)}](get-artifact?path={quote(path, safe='')}&run_uuid={parent_run_id})" for path in figures
        ]
    note = "\n".join(lines).rstrip() + "\n"
    return note if len(note) <= _MAX_NOTE else note[: _MAX_NOTE - 2] + "…\n"


def searched(params: Mapping[str, Any]) -> list[str]:
    """The hyperparameters a study searches (not fixed), in sampling order: the trials view's
    param columns. All of them when none varies."""
    from lrsearch.choices.space import Fixed, in_sampling_order

    varied = [k for k in in_sampling_order(params) if not isinstance(params[k], Fixed)]
    return varied or list(in_sampling_order(params))


def phase_of(study: optuna.Study, user_attrs: Mapping[str, Any] | None = None) -> str:
    """What a study is doing, as its description says it (the rule of ``phase.py``, which
    ``status`` and the ``studies`` view follow). ``user_attrs``: as for :func:`study_note`."""
    from lrsearch.results.ranking import counts

    return StudyRecord.from_attrs(study.user_attrs if user_attrs is None else user_attrs).phase(*counts(study))


def write_study_note(
    study: optuna.Study,
    tracker: TrackerLike,
    phase: str | None = None,
    user_attrs: Mapping[str, Any] | None = None,
    outbox: Outbox | None = None,
) -> None:
    """Set the study's parent run description (:func:`study_note`) as the study stands now
    (``phase``: as :func:`phase_of` tells, unless given), with the report's main figures if
    the run has them. ``user_attrs``: as for :func:`study_note`. Written where the tracker
    runs (its tracking process), in one round trip, or in the background through ``outbox``."""
    from lrsearch.config import stored_config

    user_attrs = study.user_attrs if user_attrs is None else user_attrs  # read once: each access is a query
    record = StudyRecord.from_attrs(user_attrs)
    parent, experiment_id = record.parent_run_id, record.experiment_id
    if not parent or not experiment_id:
        return
    pruner = stored_config(record.config, study.study_name).study.pruner if record.config is not None else None
    text = study_note(
        study,
        phase=phase or phase_of(study, user_attrs),
        experiment_id=experiment_id,
        parent_run_id=parent,
        pruner=pruner if pruner != "none" else None,
        user_attrs=user_attrs,
    )
    if outbox is not None:
        outbox.submit("the study's description", set_study_note, parent, text)
    else:
        tracker.run(set_study_note, parent, text)


def set_study_note(tracker: Tracker, parent: str, text: str) -> None:
    """The parent run's description: ``text`` (:func:`study_note` without figures), and the
    report's main figures if the run has them (a job of the tracker's: ``outbox.py``)."""
    folder = f"report/{PREVIEW_DIR}"
    logged = set(tracker.artifact_files(parent, folder))
    figures = [f"{folder}/{name}" for name in NOTE_FIGURES if f"{folder}/{name}" in logged]
    tracker.set_note(parent, with_figures(text, figures, parent))


def _table_row(cells: Sequence[str]) -> str:
    """A Markdown table row whose cells, but the last, end in CELL_GAP."""
    return "| " + " | ".join([*(f"{cell}{CELL_GAP}" for cell in cells[:-1]), cells[-1]]) + " |"


def _trial_link(experiment_id: str, trial: FrozenTrial) -> str:
    run_id = trial.user_attrs.get(attrs.MLFLOW_RUN)
    return run_path(experiment_id, run_id) if run_id else trials_path(experiment_id)


def _title(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")
