"""The MLflow UI's addresses: a run's page, a study's trials best first, and the links ``run``
and ``submit`` print. A tracking server serves its own UI; an embedded store's is ``lrsearch
ui``'s, at its default port."""

from __future__ import annotations

from lrsearch.core.names import DEFAULT_UI_PORT, run_path, trials_path
from lrsearch.store.urls import is_server, without_credentials

DEFAULT_UI = f"http://127.0.0.1:{DEFAULT_UI_PORT}"


def ui_base(uri: str) -> str:
    """Where the MLflow UI of tracking store ``uri`` is: the tracking server itself (without
    any credentials the URI carries), or for an embedded store ``lrsearch ui``'s default."""
    return without_credentials(uri).rstrip("/") if is_server(uri) else DEFAULT_UI


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run."""
    return f"{ui_base(uri)}/{run_path(experiment_id, run_id)}"


def trials_url(uri: str, experiment_id: str) -> str:
    """The study's trials in MLflow's runs table, best first (descriptions.trials_view)."""
    return f"{ui_base(uri)}/{trials_path(experiment_id)}"


def links(uri: str, experiment_id: str, parent_run_id: str) -> list[str]:
    """What ``run`` and ``submit`` print: the study's run page and its trials table, and for
    an embedded store where its UI will be."""
    lines = [
        f"MLflow: {run_url(uri, experiment_id, parent_run_id)}  (the study: outcome, top trials, figures)",
        f"        {trials_url(uri, experiment_id)}  (its trials, best first)",
    ]
    if not is_server(uri):
        lines.append(
            f"        (served by `lrsearch ui`, on its default port {DEFAULT_UI_PORT}; with --port P, use port P)"
        )
    return lines


def trial_link(uri: str, experiment_id: str, run_id: str | None) -> str | None:
    """What a trial's row shows for its run: the page's URL on a tracking server; the run's
    id on an embedded store, whose UI runs only while ``lrsearch ui`` does."""
    if run_id is None:
        return None
    return run_url(uri, experiment_id, run_id) if is_server(uri) else run_id
