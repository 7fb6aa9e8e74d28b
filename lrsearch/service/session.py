"""A worker's session on a submitted study: its stored configuration, a sampler of its
own, its data and MLflow records; and the parent run closed as the study stands."""

from __future__ import annotations

import datetime
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from lrsearch.choices.accelerators import unavailable
from lrsearch.choices.data import Dataset, load_data
from lrsearch.choices.sampling import make_pruner, make_sampler
from lrsearch.config import Config, stored_config
from lrsearch.core.errors import UsageError, first_line
from lrsearch.core.study_record import Interruption, StudyRecord, Unrunnable, utc_now
from lrsearch.results.descriptions import write_study_note
from lrsearch.results.ranking import counts, summary
from lrsearch.store.lock import store_lock
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import redact, tracking_uri
from lrsearch.track.models import Registered
from lrsearch.track.tracking import Tracker

if TYPE_CHECKING:
    from lrsearch.service.queue import Submission
    from lrsearch.store.retry import Retry
    from lrsearch.store.retrying_storage import RetryingStorage
    from lrsearch.track.outbox import Outbox
    from lrsearch.track.process import TrackerLike


@dataclass
class ArrayUse:
    """How a worker trained a study's trials together: the size asked for (``auto`` or a
    number), the size it came to (auto: the fastest a trial on this machine; else the one
    asked for, capped by memory), and how many trials its first array and its largest trained
    at once."""

    wanted: int | str
    size: int
    first: int
    most: int
    device: str | None = None  # where Lightning trained them ("cpu", "cuda:0", "mps:0"), once known

    def saw(self, together: int) -> None:
        self.most = max(self.most, together)


@dataclass
class Session:
    """One worker's view of an open study: the study, its MLflow records and its data."""

    cfg: Config
    study: optuna.Study
    store: RetryingStorage  # the study's storage
    study_id: int
    url: str
    tracker: TrackerLike
    experiment_id: str
    parent_run_id: str
    data: Dataset
    target: int
    warnings: list[str] = field(default_factory=list)
    started: bool = False  # this worker set the parent run RUNNING (at its first claim)
    finished: int = 0  # COMPLETE + PRUNED trials, as last counted, and told here since
    # Trials found stale at one look (claims._fail_stale_trials): id -> (last heartbeat, when seen).
    suspects: dict[int, tuple[datetime.datetime, float]] = field(default_factory=dict)
    arrays: ArrayUse | None = None  # how this worker trained the study's trials, once it has

    @property
    def mlflow_url(self) -> str:
        return self.tracker.run_url(self.experiment_id, self.parent_run_id)


def join(
    name: str,
    store: RetryingStorage,
    url: str,
    tracker: TrackerLike,
    *,
    worker: int = 0,
    study_file: Path | None = None,
    accelerator: str | None = None,
) -> Session:
    """This worker's session on a submitted study: its stored configuration, a sampler of
    this worker's own, its data, and its MLflow experiment and parent run (made by the first
    worker that joins: ``submit`` leaves MLflow alone). The parent run turns RUNNING when
    this worker claims its first trial (``worker.py``, ``claims.py``), not before: a worker that joins a
    study whose total is reached, or dies first, leaves its parent as it was."""
    study_id = store.get_study_id_from_name(name)
    record = StudyRecord.from_attrs(store.get_study_user_attrs(study_id))
    if record.config is None or record.target is None:
        raise UsageError(
            f"study {name!r} in {redact(url)} was not submitted with lrsearch (no stored "
            "configuration): run lrsearch submit FILE first"
        )
    submitted = stored_config(record.config, name)
    cfg = submitted
    if cfg.finds_lr:  # the range the test found when the study was created
        found = record.lr_range
        if found is None:
            raise UsageError(f"study {name!r} has lr = {{ find = true }} but no range stored: submit it again")
        cfg = cfg.with_lr_range(found["low"], found["high"])
    data = load_data(cfg.data)  # a CSV file this host lacks: unrunnable here, before any record
    if (why := unavailable(accelerator or cfg.train.accelerator)) is not None:  # (nor a GPU it lacks)
        raise UsageError(f"{'--accelerator' if accelerator else '[train].accelerator'}: {why}")
    # Its store opened before the lock: a new MLflow store is made under the same lock.
    tracker.ready()
    with store_lock(url, store.retry):  # one experiment and parent run, however many workers join
        experiment_id, parent_run_id = open_records(store, study_id, submitted, url, tracker, study_file, data)
        if StudyRecord.from_attrs(store.get_study_user_attrs(study_id)).unrunnable is not None:
            store.set_study_user_attrs(study_id, StudyRecord.to_attrs(unrunnable=None))  # another worker's verdict
    if cfg.tracking.register_model:
        tracker.prepare_models()
    n_existing = len(store.get_all_trials(study_id, deepcopy=False))
    sampler = make_sampler(cfg.study.sampler, cfg.params, cfg.study.seed, n_existing, worker)
    pruner = make_pruner(cfg.study.pruner, cfg.train.epochs, cfg.study.prune_every)
    study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
    return Session(cfg, study, store, study_id, url, tracker, experiment_id, parent_run_id, data, record.target)


def open_records(
    store: RetryingStorage,
    study_id: int,
    cfg: Config,
    url: str,
    tracker: TrackerLike,
    study_file: Path | None = None,
    data: Dataset | None = None,
) -> tuple[str, str]:
    """The study's MLflow experiment, its trials view and its parent run (new: SCHEDULED
    until a worker claims a trial; one that exists keeps its status), their ids stored with
    the study; called under the store lock. The parent's params are the study file's keys
    (with the range test's result for ``lr = { find = true }``), its artifact ``study.toml``
    the file itself when this process has it, else the stored configuration written out."""
    from lrsearch.config import to_toml_text
    from lrsearch.results.descriptions import searched, trials_view

    name = cfg.study.name
    record = StudyRecord.from_attrs(store.get_study_user_attrs(study_id))
    experiment_id = tracker.experiment(name)
    lr_range = record.lr_range
    found = (
        {f"lr_find.{k}": lr_range[k] for k in ("low", "high", "suggestion", "optimizer")}
        if cfg.finds_lr and lr_range
        else {}
    )
    with tempfile.TemporaryDirectory(prefix="lrsearch-") as tmp:
        if study_file is None:
            study_file = Path(tmp) / "study.toml"
            study_file.write_text(to_toml_text(cfg))
        parent_run_id = tracker.start_study(
            experiment_id,
            name,
            params={**_study_params(cfg), **found},
            tags={
                "sampler": cfg.study.sampler,
                "pruner": cfg.study.pruner,
                "storage": redact(url),
                "direction": cfg.study.direction,
                "metric": cfg.study.metric,
            },
            study_file=study_file.resolve(),  # read by the tracking process, whose folder may differ
            run_id=record.parent_run_id,
            status="SCHEDULED",
        )
    tracker.share_trials_view(
        experiment_id, trials_view(name, cfg.study.direction, cfg.study.metric, searched(cfg.params))
    )
    if (record.experiment_id, record.parent_run_id) != (experiment_id, parent_run_id):
        store.set_study_user_attrs(
            study_id, StudyRecord.to_attrs(experiment_id=experiment_id, parent_run_id=parent_run_id)
        )
    if data is not None and record.parent_run_id != parent_run_id:  # a new parent: its datasets
        try:
            tracker.log_data(parent_run_id, data.inputs)
        except Exception:  # a description of the study: the study runs without it
            pass
    return experiment_id, parent_run_id


def mark_unrunnable(store: RetryingStorage, name: str, url: str, tracker: TrackerLike, reason: str) -> None:
    """Record why this worker cannot run a submitted study, where ``status``, the ``studies``
    view and the parent run's description show it. The study stays queued for other workers
    (another version, another host with its data); the first that can run it, or submitting
    the corrected study, clears the record."""
    import socket

    from lrsearch import __version__

    study_id = store.get_study_id_from_name(name)
    record = Unrunnable(reason, __version__, socket.gethostname(), utc_now("seconds"))
    store.set_study_user_attrs(study_id, StudyRecord.to_attrs(unrunnable=record))
    tracker.ready()  # (its store opened outside the lock, which opening it may take)
    with store_lock(url, store.retry):
        parent = StudyRecord.from_attrs(store.get_study_user_attrs(study_id)).parent_run_id
        if parent is None:  # a run to carry the description; its params wait for a worker that can run it
            experiment_id = tracker.experiment(name)
            parent = tracker.start_study(
                experiment_id, name, params={}, tags={"storage": redact(url)}, study_file=None, status="FAILED"
            )
            store.set_study_user_attrs(
                study_id, StudyRecord.to_attrs(experiment_id=experiment_id, parent_run_id=parent)
            )
    if tracker.status(parent) != "RUNNING":  # else another worker runs it, and describes it
        tracker.set_note(
            parent,
            f"**{name}** · unrunnable · lrsearch {record.version} on {record.host} "
            f"cannot run it ({record.at}): {reason}\n\nSubmit the corrected study to "
            "queue it again.\n",
        )


def _study_params(cfg: Config) -> dict[str, Any]:
    """The study file's keys as the parent run's params, ``[data]``'s only those of its source
    (a CSV study's run shows no make_blobs settings)."""
    from lrsearch.choices.data import SOURCES

    other = {f"data.{k}" for s in SOURCES for k in s.keys} - {f"data.{k}" for k in SOURCES[cfg.data.source].keys}
    return {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in other}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def open_session(
    cfg: Config,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    study_file: Path | None = None,
    worker: int = 0,
    tracker: TrackerLike | None = None,
    submitted: Submission | None = None,
    accelerator: str | None = None,
) -> Session:
    """Submit the study ``cfg`` describes (or resume it; ``submitted``: already done, its
    ``queue.Submission``) and join it as a worker. ``tracker``: the worker's MLflow client
    (default: a tracking process of its own, ``track/process.py``)."""
    from lrsearch.service.queue import submit
    from lrsearch.track.process import TrackingProcess

    submission = submitted or submit(cfg, storage=storage, tracking=tracking)
    store = open_storage(submission.url, hint="; run the same command again to resume the study")
    tracker = tracker or TrackingProcess(tracking_uri(tracking), worker)
    return join(
        cfg.study.name, store, submission.url, tracker, worker=worker, study_file=study_file, accelerator=accelerator
    )


def start_parent(session: Session, outbox: Outbox) -> None:
    """The parent run RUNNING at this worker's first claim (and again after the study was
    interrupted meanwhile), with a description saying so, both sent in the background
    (``outbox``) while the trial trains."""
    outbox.submit("the study's run", Tracker.set_running, session.parent_run_id)
    session.started = True
    write_study_note(session.study, session.tracker, "running", outbox=outbox)


def close_parent(session: Session, status: str, why: str | None = None) -> None:
    """End the study's parent run as the study stands, whichever worker ends last: FINISHED
    once the total is reached (``status``, this worker's own fate, does not matter then);
    else, when no trial is running elsewhere, ``status`` (KILLED or FAILED), with the study
    marked interrupted (``why``: by which signal, or which error) unless it was cancelled;
    while trials run elsewhere, nothing (their workers close it). Trial runs whose records
    were lost are closed first (see :func:`close_lost_runs`)."""
    try:
        finished, running = counts(session.study)
        if finished >= session.target:
            status = "FINISHED"
        elif running > 0 or status == "FINISHED":
            return
        record = StudyRecord.from_attrs(session.store.get_study_user_attrs(session.study_id))
        if status != "FINISHED" and record.cancelled is None:
            session.store.set_study_user_attrs(
                session.study_id,
                StudyRecord.to_attrs(interrupted=Interruption(utc_now("seconds"), why or status.lower())),
            )
        if session.tracker.status(session.parent_run_id) == status:  # closed so by another worker
            return
        close_lost_runs(session)
        if status == "FINISHED" and session.cfg.tracking.register_model:
            _register(session)
        session.tracker.end_run(session.parent_run_id, status, summary(session.study))
        write_study_note(session.study, session.tracker)
    except Exception as e:  # the trials are safe in Optuna: report, do not fail the study
        session.warnings.append(f"could not close the study's MLflow run: {first_line(e)}")


def _register(session: Session) -> None:
    """The finished study's model; a failure is a warning (``lrsearch best --register`` tries again)."""
    try:
        register_model(session.study, session.url, session.tracker, session.experiment_id, retry=session.store.retry)
    except Exception as e:
        session.warnings.append(
            f"could not register the study's model: {first_line(e)} (lrsearch best "
            f"{session.study.study_name} --register tries again)"
        )


def register_model(
    study: optuna.Study, url: str, tracker: TrackerLike, experiment_id: str, *, retry: Retry | None = None
) -> Registered | None:
    """The study's best COMPLETE trial with a run as its registered model (see
    :func:`~lrsearch.track.models.register_best`), kept in the study's attributes
    (``StudyRecord.model``) for ``best``, the ``studies`` view and the description (``retry``:
    how the store lock waits out a lost connection)."""
    from lrsearch.results.ranking import best_trials
    from lrsearch.track.models import Candidate, register_best

    record = StudyRecord.from_attrs(study.user_attrs)  # one read: each access is a query
    metric = record.metric or "objective"

    def best() -> Candidate | None:
        rows = best_trials(study, 1)
        if not rows or rows[0]["mlflow_run_id"] is None:
            return None
        return Candidate(rows[0]["number"], rows[0]["mlflow_run_id"], metric, rows[0]["value"])

    candidate = best()
    if candidate is None:
        return None
    result = register_best(tracker, experiment_id, study.study_name, candidate, best, store_lock(url, retry))
    if result is not None and result.run_id == candidate.run_id and record.model != result.record():
        for key, value in StudyRecord.to_attrs(model=result.record()).items():
            study.set_user_attr(key, value)
    return result


def register(name: str, *, storage: str | None = None, tracking: str | None = None) -> Registered:
    """``lrsearch best NAME --register``: :func:`register_model` for a study in the stores."""
    from lrsearch.results.ranking import load_study
    from lrsearch.store.urls import storage_url

    study = load_study(name, storage)  # UsageError naming the studies there are
    experiment_id = StudyRecord.from_attrs(study.user_attrs).experiment_id
    if experiment_id is None:
        raise UsageError(f"study {name!r} has no MLflow records yet: no worker has started it")
    tracker = Tracker(tracking_uri(tracking))
    registered = register_model(study, storage_url(storage), tracker, experiment_id)
    if registered is None:
        raise UsageError(f"study {name!r} has no COMPLETE trial with an MLflow run to register")
    if registered.new:  # the parent run's description names the model
        write_study_note(study, tracker)
    return registered


def close_lost_runs(session: Session) -> None:
    """Close the trial runs still RUNNING whose trial has ended (in Optuna) and whose worker
    stopped beating: it died before sending the run's last records (a worker keeps beating
    until they are sent). One whose worker still beats is on its way: wait for it, up to
    the grace period, then leave it to that worker."""
    from lrsearch.store.heartbeat import grace_period, heartbeat_interval

    grace = grace_period()
    deadline = time.monotonic() + grace + 2 * heartbeat_interval()
    while True:
        trials = {t.number: t for t in session.study.get_trials(deepcopy=False)}
        pending = [
            (run_id, trials[number])
            for run_id, number in session.tracker.running_trial_runs(session.experiment_id, session.parent_run_id)
            if number in trials and trials[number].state.is_finished()
        ]
        if not pending:
            return
        ages = session.store.heartbeat_ages(session.study_id, [t._trial_id for _, t in pending])
        now = datetime.datetime.now()
        waiting = 0
        for run_id, trial in pending:
            age = ages.get(trial._trial_id)
            if age is None:  # never beat (stored before heartbeats): its end is its last sign of life
                age = (now - trial.datetime_complete).total_seconds() if trial.datetime_complete else grace + 1
            if age > grace:
                session.tracker.close_lost_run(run_id, trial.state.name)
            else:
                waiting += 1
        if not waiting or time.monotonic() > deadline:
            return
        time.sleep(0.25)
