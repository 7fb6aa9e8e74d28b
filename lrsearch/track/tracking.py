"""MLflow records: an experiment per study, a parent run per study, a child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (the fluent API keeps one
global active run per process), and a trial's metrics go out in a few ``log_batch`` calls
at its end rather than a round trip per value. A worker uses it in its tracking process
(``process.py``), through an outbox (``outbox.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core import attrs
from lrsearch.core.errors import TrackingError
from lrsearch.core.names import NOTE_TAG, OBJECTIVE_METRIC, RANK_TAG, TRIALS_VIEW, VIEW_TAG_PREFIX
from lrsearch.core.stopping import check_stop
from lrsearch.store.lock import store_lock
from lrsearch.store.retry import Retry, T, reason
from lrsearch.store.storage import MLFLOW_MARKERS, check_sqlite_owner, new_sqlite_file
from lrsearch.store.urls import is_server, redact, sqlite_path
from lrsearch.track.artifacts import _experiment_artifacts
from lrsearch.track.links import run_url, trials_url
from lrsearch.track.probe import HTTP_LIMITS, _without
from lrsearch.track.quiet import quiet_mlflow
from lrsearch.track.records import History, _batches, _metrics, _now_ms, _param_value, _trial_param_value

if TYPE_CHECKING:
    from mlflow.entities import Run

PARENT_TAG = "mlflow.parentRunId"
# A new run's token: a create_run repeated after a dropped connection first looks for it.
TOKEN_TAG = "lrsearch.token"
# Optuna trial state -> MLflow run status. A pruned trial was stopped on purpose: KILLED.
STATUS_FOR_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


class Tracker:
    """An MLflow tracking store (SQLite file or server) seen as studies and trials.

    Every call waits out a lost connection (``retry.py``), except :meth:`check`, which
    answers at once whether the store is there when a study starts.
    """

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        quiet_mlflow()
        # set_terminated would print "View run … at …" to stdout for every trial.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # Nor a progress bar on stderr for each artifact downloaded (the model's network file).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.uri = uri
        path = sqlite_path(uri)
        if path is not None:
            check_sqlite_owner(path, MLFLOW_MARKERS, "MLflow tracking store", "--tracking-uri")
            new_sqlite_file(path)  # a new embedded store starts in WAL mode, like Optuna's
        else:
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        # The client makes (or migrates) MLflow's tables as it starts: workers starting
        # together would collide ("duplicate column name"), so one at a time per store (a
        # tracking server migrates its own database).
        with contextlib.nullcontext() if is_server(uri) else store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry: the same store
        self.retry = Retry(f"MLflow tracking at {redact(uri)}", check_stop=check_stop)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(self, *args, **kwargs)``: what a tracking process's handle runs there."""
        return fn(self, *args, **kwargs)

    def ready(self) -> None:
        """Nothing to wait for (a tracking process's handle waits for its store there)."""

    def prepare_models(self) -> None:
        """Nothing here (a tracking process imports what logging a model needs ahead)."""

    def prepare_report(self) -> None:
        """Nothing here (a tracking process imports what drawing a report needs ahead)."""

    def start(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(None, *args)``, here and now (a tracking process's handle runs it there,
        meanwhile); a finished future."""
        done: Future[Any] = Future()
        try:
            done.set_result(fn(None, *args))
        except Exception as e:
            done.set_exception(e)
        return done

    def check(self) -> None:
        """Raise :class:`TrackingError` naming the URI if the store does not answer."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            if getattr(e, "error_code", "") in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise TrackingError(
                    f"MLflow tracking at {redact(self.uri)} refused the login: set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from e
            raise TrackingError(
                f"cannot reach MLflow tracking at {redact(self.uri)}: {_without(reason(e), self.uri)}"
            ) from e

    def experiment(self, name: str) -> str:
        """The id of the experiment named ``name``, created (or restored) if needed."""
        exp = self._call(self.client.get_experiment_by_name, name)
        if exp is None:

            def created() -> str | None:
                found = self.client.get_experiment_by_name(name)
                return None if found is None else found.experiment_id

            return self._call(
                self.client.create_experiment,
                name,
                artifact_location=_experiment_artifacts(self.uri, name),
                recover=created,
            )
        if exp.lifecycle_stage == "deleted":
            self._call(self.client.restore_experiment, exp.experiment_id)
        return exp.experiment_id

    def start_study(
        self,
        experiment_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        study_file: Path | None,
        run_id: str | None = None,
        status: str = "SCHEDULED",
    ) -> str:
        """The study's parent run: ``run_id`` if it still exists (its status kept: a worker
        sets RUNNING when it claims a trial), else a new run with ``status`` (SCHEDULED until a
        worker claims a trial). The study file's keys become its params and the file its
        artifact, once (MLflow params are immutable): a run made without them (a study no
        worker could run) gets them when one can."""
        run = self._run(run_id) if run_id is not None else None
        if run is not None and run_id is not None:
            self._log(run_id, params=None if run.data.params else params, tags=tags)
            if not run.data.params and study_file is not None:
                self._call(self.client.log_artifact, run_id, str(study_file))
            return run_id
        run_id = self._create_run(experiment_id, name, {"lrsearch.role": "study", **tags})
        self._log(run_id, params=params)
        if study_file is not None:
            self._call(self.client.log_artifact, run_id, str(study_file))
        if status != "RUNNING":
            self._call(self.client.update_run, run_id, status=status)
        return run_id

    def log_range_test(
        self,
        experiment_id: str,
        study: str,
        record: Mapping[str, Any],
        curve: Sequence[tuple[float, float]],
        plot: Path,
    ) -> str:
        """A finished run named ``lr-find`` in the study's experiment: the range test's
        ``record`` as params, its ``curve`` ((lr, loss) per step) as the metrics
        ``lr_find/lr`` and ``lr_find/loss`` (step = the test's step), and its ``plot``."""
        from mlflow.entities import Metric

        run_id = self._create_run(experiment_id, "lr-find", {"lrsearch.role": "lr-find", "lr_find.study": study})
        now = _now_ms()
        metrics = [
            Metric(key, value, now, step)
            for step, point in enumerate(curve)
            for key, value in zip(("lr_find/lr", "lr_find/loss"), point)
            if value == value
        ]  # no NaN
        self._log(run_id, params=dict(record), metrics=metrics)
        self._call(self.client.log_artifact, run_id, str(plot))
        self._call(self.client.set_terminated, run_id, status="FINISHED")
        return run_id

    def set_running(self, run_id: str) -> None:
        """A SCHEDULED (or closed) parent run that a worker starts on."""
        if self.status(run_id) != "RUNNING":
            self._call(self.client.update_run, run_id, status="RUNNING")

    def start_trial(
        self, experiment_id: str, parent_run_id: str, study: str, number: int, params: Mapping[str, Any]
    ) -> str:
        """A child run named ``trial-<number>``, RUNNING, with the trial's ``params`` (floats
        to 4 significant digits: :func:`_trial_param_value`)."""
        tags = {
            PARENT_TAG: parent_run_id,
            "lrsearch.role": "trial",
            "study": study,
            "trial_number": str(number),
            "state": "RUNNING",
        }
        run_id = self._create_run(experiment_id, f"trial-{number}", tags)
        # Once: MLflow params are immutable. A repeated call logs the same text (the
        # formatting is deterministic), which MLflow accepts.
        self._log(run_id, params={k: _trial_param_value(v) for k, v in params.items()})
        return run_id

    def log_data(self, run_id: str, inputs: Sequence[Mapping[str, Any]]) -> None:
        """The run's datasets, as ``mlflow.log_input`` records them (the run page's Datasets):
        ``inputs`` as ``Dataset.inputs`` describes them (name, digest, source, schema,
        profile, and the context tag: training or validation). Safe to repeat: MLflow keeps
        one record of a dataset per experiment and one input per run."""
        if not inputs:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self._call(
            self.client.log_inputs,
            run_id,
            [
                DatasetInput(
                    Dataset(i["name"], i["digest"], i["source_type"], i["source"], i["schema"], i["profile"]),
                    [InputTag("mlflow.data.context", i["context"])],
                )
                for i in inputs
            ],
        )

    def finish_trial(
        self,
        run_id: str,
        history: History,
        state: str,
        *,
        reason: str | None = None,
        artifacts: Path | None = None,
        status: str | None = None,
        note: str | None = None,
        objective: tuple[float, str] | None = None,
    ) -> None:
        """Send the trial's metric history, its final state, description (``note``) and
        artifacts, and close the run with the status that ``state`` maps to (or ``status``,
        e.g. KILLED on an interrupt). ``objective``: a COMPLETE trial's value and rank key,
        the metric and tag the study's trials view shows and ranks by (others have none)."""
        from mlflow.entities import Metric

        tags = {"state": state, **({"reason": reason} if reason else {}), **({NOTE_TAG: note} if note else {})}
        if objective is not None:
            tags[RANK_TAG] = objective[1]
        metrics = _metrics(history)
        if objective is not None:
            last = max((step for points in history.values() for step, _, _ in points), default=0)
            metrics.append(Metric(OBJECTIVE_METRIC, objective[0], _now_ms(), last))
        self._log(run_id, metrics=metrics, tags=tags)
        if artifacts is not None:
            self._call(self.client.log_artifacts, run_id, str(artifacts))
        self._call(self.client.set_terminated, run_id, status=status or STATUS_FOR_STATE[state])

    def kill_run(self, run_id: str, reason: str) -> None:
        """End a trial's run whose worker died: KILLED, with tag ``state=FAIL`` and the reason."""
        self._log(run_id, tags={"state": "FAIL", "reason": reason})
        self._call(self.client.set_terminated, run_id, status="KILLED")

    def trial_run(self, experiment_id: str, study: str, number: int) -> str | None:
        """The run of trial ``number`` of ``study``, found by its tags (for a trial whose worker
        died before storing the run's id in Optuna)."""
        runs = self._call(
            self.client.search_runs,
            [experiment_id],
            f"tags.study = '{study}' AND tags.trial_number = '{number}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def running_trial_runs(self, experiment_id: str, parent_run_id: str) -> list[tuple[str, int]]:
        """(run id, trial number) of the study's trial runs still RUNNING."""
        runs = self._call(
            self.client.search_runs,
            [experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND attributes.status = 'RUNNING'",
            max_results=1000,
        )
        return [(r.info.run_id, int(r.data.tags.get("trial_number", -1))) for r in runs]

    def close_lost_run(self, run_id: str, state: str) -> None:
        """Close a trial's run whose last records never arrived, as its trial ended."""
        self._log(
            run_id,
            tags={
                "state": state,
                attrs.TRACKING_ERROR: "the trial's last records were lost "
                "(its worker stopped, or the tracking store was unreachable)",
            },
        )
        self._call(self.client.set_terminated, run_id, status=STATUS_FOR_STATE.get(state, "FAILED"))

    def end_run(self, run_id: str, status: str, metrics: Mapping[str, float] | None = None) -> None:
        """Close a run (the study's parent) with ``status``, logging summary ``metrics`` first."""
        if metrics:
            from mlflow.entities import Metric

            now = _now_ms()
            self._log(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self._call(self.client.set_terminated, run_id, status=status)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._log(run_id, tags={k: str(v) for k, v in tags.items()})

    def set_note(self, run_id: str, text: str) -> None:
        """A run's description, shown (as Markdown) on its page in the MLflow UI."""
        self._log(run_id, tags={NOTE_TAG: text})

    def share_trials_view(self, experiment_id: str, state: str) -> None:
        """The experiment's trials view (see descriptions.py): a tag the UI reads as a shared view."""
        self._call(self.client.set_experiment_tag, experiment_id, VIEW_TAG_PREFIX + TRIALS_VIEW, state)

    def study_experiments(self) -> list[tuple[str, str]]:
        """(name, id) of the experiments that hold an lrsearch study (they have its trials view)."""
        return [
            (e.name, e.experiment_id)
            for e in self._call(self.client.search_experiments, max_results=1000)
            if VIEW_TAG_PREFIX + TRIALS_VIEW in e.tags
        ]

    def artifact_files(self, run_id: str, folder: str) -> list[str]:
        """The paths of the files in a run's artifact ``folder`` (not recursive)."""
        return [f.path for f in self._call(self.client.list_artifacts, run_id, folder) if not f.is_dir]

    def status(self, run_id: str) -> str:
        """A run's status: RUNNING, FINISHED, FAILED, KILLED."""
        return self._call(self.client.get_run, run_id).info.status

    def curves(self, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
        """A run's metric histories: (step, value) per key, in step order."""
        return {
            key: sorted((m.step, m.value) for m in self._call(self.client.get_metric_history, run_id, key))
            for key in keys
        }

    def histories(self, run_ids: Iterable[str], keys: Iterable[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """:meth:`curves` of several runs (run id -> curves), in one call (a round trip to a
        tracking process)."""
        keys = list(keys)
        return {run_id: self.curves(run_id, keys) for run_id in run_ids}

    def log_dir(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Upload every file in ``folder`` as artifacts of ``run_id``."""
        self._call(self.client.log_artifacts, run_id, str(folder), artifact_path)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return run_url(self.uri, experiment_id, run_id)

    def trials_url(self, experiment_id: str) -> str:
        return trials_url(self.uri, experiment_id)

    def _run(self, run_id: str) -> Run | None:
        """The run, or None if it was deleted (by hand) or belongs to another store."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._call(self.client.get_run, run_id)
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _call(
        self, fn: Callable[..., T], *args: Any, recover: Callable[[], T | None] | None = None, **kwargs: Any
    ) -> T:
        return self.retry.call(fn, *args, recover=recover, **kwargs)

    def _create_run(self, experiment_id: str, name: str, tags: Mapping[str, str]) -> str:
        """A new run, created once however often the call is repeated: it carries a token,
        looked for before trying again."""
        token = uuid.uuid4().hex

        def created() -> Run | None:
            runs = self.client.search_runs([experiment_id], f"tags.`{TOKEN_TAG}` = '{token}'", max_results=1)
            return runs[0] if runs else None

        run = self._call(
            self.client.create_run, experiment_id, run_name=name, tags={**tags, TOKEN_TAG: token}, recover=created
        )
        return run.info.run_id

    def _log(
        self,
        run_id: str,
        *,
        metrics: Sequence[Any] = (),
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Params, tags and metrics in as few ``log_batch`` calls as MLflow's limits allow
        (one for a trial of up to ~900 metric points): each call is a round trip."""
        from mlflow.entities import Param, RunTag

        param_list = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for batch in _batches(param_list, tag_list, list(metrics)):  # each safe to repeat: same rows
            self._call(functools.partial(self.client.log_batch, run_id, **batch))
