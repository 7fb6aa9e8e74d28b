"""The names lrsearch gives things in MLflow, one home each: the tags and metrics it writes,
the study's trials view, the UI's paths and port, and the report figures a study's
description shows. Writers (``tracking.py``, ``report.py``) and readers (``descriptions.py``,
the CLI, the tests) import them from here."""

from __future__ import annotations

from urllib.parse import quote

NOTE_TAG = "mlflow.note.content"  # MLflow's run page renders it as Markdown: a run's description
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
TRIALS_VIEW = "lrsearch-trials"  # one experiment per study: one key is enough
OBJECTIVE_METRIC = "objective"  # a COMPLETE trial's value, logged once at its end
RANK_TAG = "rank_key"  # a COMPLETE trial's place in the study's one ranking, as text (ranking.rank_key)
UI_QUERY = "workflowType=machine_learning"  # MLflow 3 opens on its GenAI views otherwise
DEFAULT_UI_PORT = 5000  # where `lrsearch ui` serves the UI unless told --port
# The MLflow app `lrsearch ui` and `lrsearch server` run (`mlflow server --app-name`): pyproject.toml's
# mlflow.app entry point, track/ui_app.py.
UI_APP = "lrsearch"

# The model a study registers: each trial run's network file, the model's alias.
NETWORK_FILE = "network.pt"
MODEL_ALIAS = "best"


def model_uri(name: str) -> str:
    """Where MLflow finds a study's registered model: its newest version, the best trial's."""
    return f"models:/{name}@{MODEL_ALIAS}"


# The report's figures a study's description shows, as copies PREVIEW_WIDTH pixels wide in
# PREVIEW_DIR (report.py draws them).
NOTE_FIGURES = (
    "grid_accuracy.png",
    "pbt_schedule.png",
    "optimization_history.png",
    "objective_vs_lr.png",
    "lr_curves.png",
)
PREVIEW_DIR = "preview"


def run_path(experiment_id: str, run_id: str) -> str:
    """A run's page, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_QUERY}"


def model_version_path(name: str, version: str) -> str:
    """A registered model version's page, relative to the UI's root."""
    return f"#/models/{quote(name)}/versions/{version}"


def trials_path(experiment_id: str) -> str:
    """The study's trials in the runs table (its shared view), relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={TRIALS_VIEW}&{UI_QUERY}"
