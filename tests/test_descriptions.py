"""What the MLflow UI shows of a study and its trials: run descriptions and the trials view,
from real (in-memory) Optuna studies; and the report's "best so far" line."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lrsearch.core import attrs
from lrsearch.results.descriptions import CELL_GAP, phase_of, study_note, trial_note, trials_view
from lrsearch.results.figures import best_line
from lrsearch.results.trial_curves import TrialCurves

DISTS = {"optimizer": CategoricalDistribution(["sgd", "adam"]), "lr": FloatDistribution(1e-4, 1.0, log=True)}


def _study(direction: str, trials: list[tuple[TrialState, float | None, dict]]) -> optuna.Study:
    study = optuna.create_study(study_name="demo", direction=direction)
    for key, value in (
        (attrs.METRIC, "val/loss" if direction == "minimize" else "val/acc"),
        (attrs.TARGET, 6),
        (attrs.PARENT_RUN, "p" * 32),
        (attrs.EXPERIMENT, "3"),
    ):
        study.set_user_attr(key, value)
    for i, (state, value, extra) in enumerate(trials):
        study.add_trial(
            create_trial(
                state=state,
                value=value if state == TrialState.COMPLETE else None,
                params={"optimizer": "sgd", "lr": 0.001 * (i % 900 + 1)},
                distributions=DISTS,
                user_attrs={attrs.MLFLOW_RUN: f"{i:032d}", attrs.EPOCHS_TRAINED: 10, **extra},
            )
        )
    return study


def test_a_trial_says_how_it_ended_then_its_params():
    params = {"optimizer": "sgd", "lr": 0.071587, "momentum": 0.4889}
    assert (
        trial_note("COMPLETE", None, "val/acc", 0.83812, 200, params)
        == "COMPLETE: val/acc 0.8381 after 200 epochs · optimizer=sgd, lr=0.07159, momentum=0.4889"
    )
    reason = "pruned at epoch 11: val/acc=0.41, worse than the median of the other trials at that epoch"
    assert trial_note("PRUNED", reason, "val/acc", None, 13, params).startswith(f"PRUNED: {reason} · optimizer=sgd")
    assert trial_note("FAIL", None, "val/acc", None, 0, {}) == "FAIL: no reason recorded"
    assert trial_note("COMPLETE", None, "val/acc", 0.5, 1, {}) == "COMPLETE: val/acc 0.5 after 1 epoch"


def test_a_study_of_one_trial_counts_it_in_the_singular():
    study = _study("maximize", [(TrialState.PRUNED, None, {attrs.REASON: "pruned at epoch 0: …"})])
    study.set_user_attr(attrs.TARGET, 1)
    note = study_note(study, phase="done", experiment_id="3", pruner="median")
    assert note.splitlines()[0] == "**demo** · done · 1 of 1 trial (1 PRUNED) · maximize val/acc"
    assert "1 trial was stopped early (PRUNED, by the median pruner;" in note


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_study_note_ranks_links_and_counts(direction):
    values = [0.5, 0.9, 0.7, 0.9]  # a tie: the earlier trial first
    trials = [(TrialState.COMPLETE, v, {}) for v in values]
    trials.append((TrialState.PRUNED, None, {attrs.REASON: "pruned at epoch 3: …"}))
    trials.append((TrialState.FAIL, None, {attrs.REASON: "RuntimeError: boom"}))
    study = _study(direction, trials)
    note = study_note(
        study,
        phase="done",
        experiment_id="3",
        figures=["report/preview/optimization_history.png"],
        parent_run_id="p" * 32,
        pruner="median",
    )
    lines = note.splitlines()
    metric = study.user_attrs[attrs.METRIC]
    assert lines[0] == f"**demo** · done · 5 of 6 trials (4 COMPLETE, 1 FAIL, 1 PRUNED) · {direction} {metric}"
    order = [1, 3, 2, 0] if direction == "maximize" else [0, 2, 1, 3]
    header = lines.index(next(line for line in lines if line.startswith("| rank")))
    rows = lines[header + 2 : lines.index("", header)]
    # Cells end in a visible gap (MLflow's page pads no cell), the last, params, excepted.
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in [lines[header], *rows]]
    assert cells[0] == [
        f"rank{CELL_GAP}",
        f"trial{CELL_GAP}",
        f"{metric}{CELL_GAP}",
        f"epochs{CELL_GAP}",
        f"s{CELL_GAP}",
        "params",
    ]
    assert all(c.endswith(CELL_GAP) for row in cells for c in row[:-1])
    assert all(row[-1].startswith("optimizer=sgd, lr=") for row in cells[1:])
    assert [int(r[1].split("]")[0].lstrip("[")) for r in cells[1:]] == order
    best = order[0]
    assert lines[2].startswith(
        f"Best {metric}: **{values[best]:.4g}**, [trial {best}](#/experiments/3/runs/"
        f"{best:032d}?workflowType=machine_learning): optimizer=sgd, lr="
    )
    assert cells[1][:4] == [
        f"1{CELL_GAP}",
        f"[{best}](#/experiments/3/runs/{best:032d}?workflowType=machine_learning){CELL_GAP}",
        f"{values[best]:.4g}{CELL_GAP}",
        f"10{CELL_GAP}",
    ]
    assert "1 trial was stopped early (PRUNED, by the median pruner;" in note  # one noun, singular
    assert "1 trial failed (retried: they do not count); the last, trial 5: RuntimeError: boom" in note
    assert (
        f"![optimization history](get-artifact?path=report%2Fpreview%2Foptimization_history.png&run_uuid={'p' * 32})"
    ) in note


def test_a_long_study_note_stays_within_mlflows_tag_limit():
    study = _study("maximize", [(TrialState.COMPLETE, i / 1000, {}) for i in range(300)])
    note = study_note(study, phase="running", experiment_id="3")
    assert len(note) < 8000 and note.count("](#/experiments/3/runs/") == 11  # the best trial, the top 10


def test_phase_follows_the_study():
    study = _study("maximize", [(TrialState.COMPLETE, 0.5, {})])
    study.set_user_attr(attrs.TARGET, 2)
    assert phase_of(study) == "queued"
    study.set_user_attr(attrs.INTERRUPTED, {"at": "2026-11-26T00:00:00", "signal": "SIGINT"})
    assert phase_of(study) == "interrupted"
    study.set_user_attr(attrs.CANCELLED, "2026-11-26T00:00:00")
    assert phase_of(study) == "cancelled"
    study.set_user_attr(attrs.TARGET, 1)
    assert phase_of(study) == "done"  # a cancelled study whose total was reached is done


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_trials_view_filters_the_study_and_ranks_by_objective(direction):
    state = json.loads(trials_view("demo", direction, "val/loss", ["optimizer", "lr"]))
    assert state == {
        "searchFilter": "tags.study = 'demo'",
        "orderByKey": "tags.`rank_key`",
        "orderByAsc": True,  # rank_key sorts best first in either direction (test_results.py)
        "selectedColumns": [
            "metrics.`objective`",
            "metrics.`val/loss`",
            "params.`optimizer`",
            "params.`lr`",
            "tags.`state`",
            "tags.`reason`",
        ],
    }


def test_best_so_far_runs_to_the_last_trial_whatever_its_state():
    def t(number, state, value):
        return TrialCurves(number, state, value, {}, {})

    trials = [
        t(0, "COMPLETE", 0.5),
        t(1, "PRUNED", 0.9),
        t(2, "COMPLETE", 0.7),
        t(3, "COMPLETE", 0.6),
        t(4, "PRUNED", 0.2),
    ]
    assert best_line(trials, "maximize") == ([0, 2, 3, 4], [0.5, 0.7, 0.7, 0.7])
    assert best_line(trials, "minimize") == ([0, 2, 3, 4], [0.5, 0.5, 0.5, 0.5])
    assert best_line(trials[1:2], "maximize") == ([], [])
