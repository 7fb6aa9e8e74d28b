"""MLflow records: an experiment per study, a parent run per study, a child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (the fluent API keeps one
global active run per process), and a trial's metrics go out in a few ``log_batch`` calls
at its end rather than a round trip per value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from lrsearch.errors import TrackingError, first_line
from lrsearch.storage import artifact_root, new_sqlite_file, sqlite_path

PARENT_TAG = "mlflow.parentRunId"
# Optuna trial state -> MLflow run status. A pruned trial was stopped on purpose: KILLED.
STATUS_FOR_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
UI_QUERY = "?workflowType=machine_learning"  # MLflow 3 opens on GenAI views otherwise
DEFAULT_UI = "http://127.0.0.1:5000"
# log_batch limits (MLflow REST API): per request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS, _MAX_ENTITIES = 1000, 100, 100, 1000
# Bounds on each call to a tracking server (MLflow's defaults can stall a call for minutes);
# a variable already set in the environment wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

History = Mapping[str, Sequence[tuple[int, float, int]]]


def quiet_mlflow() -> None:
    """Keep MLflow's and Alembic's migration chatter off the terminal."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """An MLflow tracking store (SQLite file or server) seen as studies and trials."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        quiet_mlflow()
        # set_terminated would print "View run … at …" to stdout for every trial.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = uri
        path = sqlite_path(uri)
        if path is not None:
            new_sqlite_file(path)  # a new embedded store starts in WAL mode, like Optuna's
        else:
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri if path is None else None)

    def check(self) -> None:
        """Raise :class:`TrackingError` naming the URI if the store does not answer."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise TrackingError(f"cannot reach MLflow tracking at {self.uri}: {first_line(e)}") from e

    def experiment(self, name: str) -> str:
        """The id of the experiment named ``name``, created (or restored) if needed."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name, artifact_location=_experiment_artifacts(self.uri, name))
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def start_study(self, experiment_id: str, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str], study_file: Path | None, run_id: str | None = None) -> str:
        """The study's parent run: ``run_id`` reopened when resuming, else a new run with the
        study file as params (set once: MLflow params are immutable) and as an artifact."""
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self._log(run_id, tags=tags)
            return run_id
        run = self.client.create_run(experiment_id, run_name=name, tags={"lrsearch.role": "study", **tags})
        self._log(run.info.run_id, params=params)
        if study_file is not None:
            self.client.log_artifact(run.info.run_id, str(study_file))
        return run.info.run_id

    def start_trial(self, experiment_id: str, parent_run_id: str, study: str, number: int,
                    params: Mapping[str, Any]) -> str:
        """A child run named ``trial-<number>``, RUNNING, with the trial's ``params``."""
        tags = {PARENT_TAG: parent_run_id, "lrsearch.role": "trial", "study": study,
                "trial_number": str(number), "state": "RUNNING"}
        run_id = self.client.create_run(experiment_id, run_name=f"trial-{number}", tags=tags).info.run_id
        self._log(run_id, params=params)  # once: MLflow params are immutable
        return run_id

    def finish_trial(self, run_id: str, history: History, state: str, *, reason: str | None = None,
                     artifacts: Path | None = None, status: str | None = None) -> None:
        """Send the trial's metric history, its final state and artifacts, and close the run
        with the status that ``state`` maps to (or ``status``, e.g. KILLED on an interrupt)."""
        tags = {"state": state}
        if reason:
            tags["reason"] = reason
        self._log(run_id, metrics=_metrics(history), tags=tags)
        if artifacts is not None:
            self.client.log_artifacts(run_id, str(artifacts))
        self.client.set_terminated(run_id, status=status or STATUS_FOR_STATE[state])

    def kill_run(self, run_id: str, reason: str) -> None:
        """End a trial's run whose worker died: KILLED, with tag ``state=FAIL`` and the reason."""
        self._log(run_id, tags={"state": "FAIL", "reason": reason})
        self.client.set_terminated(run_id, status="KILLED")

    def end_run(self, run_id: str, status: str, metrics: Mapping[str, float] | None = None) -> None:
        """Close a run (the study's parent) with ``status``, logging summary ``metrics`` first."""
        if metrics:
            from mlflow.entities import Metric

            now = _now_ms()
            self._log(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self.client.set_terminated(run_id, status=status)

    def log_dir(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Upload every file in ``folder`` as artifacts of ``run_id``."""
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """The MLflow UI page of a run (for an embedded store: as ``lrsearch ui`` serves it)."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else DEFAULT_UI
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{UI_QUERY}"

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted by hand, or from another store
            return False

    def _log(self, run_id: str, *, metrics: Sequence[Any] = (), params: Mapping[str, Any] | None = None,
             tags: Mapping[str, str] | None = None) -> None:
        """Params, tags and metrics in as few ``log_batch`` calls as MLflow's limits allow
        (one for a trial of up to ~900 metric points): each call is a round trip."""
        from mlflow.entities import Param, RunTag

        param_list = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for batch in _batches(param_list, tag_list, list(metrics)):
            self.client.log_batch(run_id, **batch)


class Outbox:
    """Tracking calls run in order on one background thread, so a trial's records travel to
    MLflow while the next trial trains; ``drain`` waits for them all.

    At most ``limit`` jobs wait at a time (a submit past that waits for the oldest), and
    the thread is joined at interpreter exit, so nothing queued is dropped.
    """

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []
        self._errors: list[str] = []

    def submit(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in the background; ``label`` names it in errors."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsearch-tracking")
        while len(self._pending) >= self.limit:
            self._settle(*self._pending.pop(0))
        future = self._executor.submit(fn, *args, **kwargs)
        self._pending.append((label, future))
        return future

    def drain(self) -> list[str]:
        """Wait for every submitted call; one line per call that failed since the last drain."""
        while self._pending:
            self._settle(*self._pending.pop(0))
        errors, self._errors = self._errors, []
        return errors

    def _settle(self, label: str, future: Future) -> None:
        error = future.exception()  # waits
        if error is not None:
            self._errors.append(f"{label}: {first_line(error)}")


def write_json(obj: Any, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return path


def artifact_dir() -> tempfile.TemporaryDirectory:
    """A scratch folder for a run's artifacts before upload."""
    return tempfile.TemporaryDirectory(prefix="lrsearch-")


def _experiment_artifacts(uri: str, name: str) -> str | None:
    root = artifact_root(uri)
    return None if root is None else f"{root}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def _metrics(history: History) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(key, value, ts, step) for key, points in history.items() for step, value, ts in points]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit for a param value


def _batches(params: list[Any], tags: list[Any], metrics: list[Any]) -> Iterable[dict[str, list[Any]]]:
    """``log_batch`` arguments within MLflow's per-request limits (params, tags, total)."""
    while params or tags or metrics:
        batch = {"params": params[:_MAX_PARAMS], "tags": tags[:_MAX_TAGS]}
        room = _MAX_ENTITIES - len(batch["params"]) - len(batch["tags"])
        batch["metrics"] = metrics[:min(room, _MAX_METRICS)]
        params, tags, metrics = params[_MAX_PARAMS:], tags[_MAX_TAGS:], metrics[len(batch["metrics"]):]
        yield batch


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
