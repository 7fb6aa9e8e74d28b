"""The objective: a trial's params, a trained model, a metric, and the MLflow run that records it
(how the trial ended, before it is stored: ``ending.py``)."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from lrsearch.choices.data import Dataset
from lrsearch.choices.network import ACTIVATIONS
from lrsearch.choices.sampling import PRUNERS
from lrsearch.choices.space import in_sampling_order, sample_params
from lrsearch.config import Config
from lrsearch.core import attrs
from lrsearch.core.errors import first_line
from lrsearch.core.names import NETWORK_FILE
from lrsearch.core.stopping import Cancelled, Interrupted, StopFlag, TrialStop
from lrsearch.fit.member import Member, TrainResult
from lrsearch.fit.training import fit_array
from lrsearch.results.descriptions import trial_note
from lrsearch.results.figures import plot_learning_curves
from lrsearch.results.ranking import rank_key
from lrsearch.service.ending import Ending, TakenOver, outcome
from lrsearch.track.models import network_bytes
from lrsearch.track.outbox import Drawing, Outbox, TrialRecord, json_bytes, outbox_for

if TYPE_CHECKING:
    from lrsearch.track.process import TrackerLike


@dataclass
class Objective:
    """Called once per trial, by the worker loop (``worker.py``) or ``study.optimize``.

    A trial's MLflow calls run in the background: the run is created while the trial
    trains, and its metrics, artifacts and status are sent while the next trial trains.
    Call :meth:`drain` before reading them or ending the study.
    """

    cfg: Config
    data: Dataset
    tracker: TrackerLike
    experiment_id: str
    parent_run_id: str
    stop: StopFlag = field(default_factory=StopFlag)
    outbox: Outbox | None = None  # where the records go: the tracker's (its tracking process's) by default

    def __post_init__(self) -> None:
        if self.outbox is None:
            self.outbox = outbox_for(self.tracker)

    @property
    def records(self) -> Outbox:
        """Where the trials' MLflow records go (``outbox``, made when not given)."""
        assert self.outbox is not None
        return self.outbox

    def drain(self) -> list[str]:
        """Wait until every trial's MLflow record is written; one line per record that failed."""
        return [f"MLflow record lost for {error}" for error in self.records.drain()]

    def __call__(
        self,
        trial: optuna.trial.Trial,
        cancelled: threading.Event | None = None,
        recorded: Callable[[], None] | None = None,
    ) -> float:
        """Train ``trial`` alone (an array of one); ``cancelled``, once set, stops it at the
        next epoch boundary and raises :class:`Cancelled` (the trial ends FAIL, its run
        KILLED). ``recorded()`` is called once the trial's MLflow record is sent (or has
        failed), in the background."""
        member = self.begin(trial, recorded)
        stop = TrialStop(self.stop, cancelled)
        try:
            with self.stop.interruptible():  # a second signal stops training at once
                fit_array(self.cfg, self.data, [member], stop=stop)
        except BaseException as e:
            self.end(member, stop, e)
            raise
        return self.end(member, stop)

    def begin(
        self, trial: optuna.trial.Trial, recorded: Callable[[], None] | None = None, array: str | None = None
    ) -> Member:
        """A claimed trial's parameters sampled and its MLflow run started (in the
        background): the member of an array that trains it (``array``: that array's id)."""
        cfg = self.cfg
        record = _Record(trial, recorded or (lambda: None), array=array)
        try:
            hp = sample_params(trial, cfg.params, cfg.train.epochs)
            seed = trial_seed(cfg.study.seed, trial.number)
            trial.set_user_attr(attrs.HYPERPARAMETERS, hp)
            record.run = TrialRecord(trial.number)
            record.run.start(
                self.records,
                self.experiment_id,
                self.parent_run_id,
                cfg.study.name,
                {**hp, **_fixed_settings(cfg, seed)},
                self.data.inputs,
            )
        except BaseException:
            record.recorded()  # nothing for the tracking thread to send
            raise
        return Member(
            str(trial.number), hp, seed, cfg.train.epochs, trial if cfg.study.pruner != "none" else None, context=record
        )

    def run_attrs(self, member: Member) -> dict[str, Any]:
        """The attributes the member's MLflow run gives its trial (its id, or why there is
        none), once the run is made and only once: written at an epoch boundary, so a running
        trial links to its run (empty until then, and after)."""
        record: _Record = member.context
        if record.linked or record.run is None:
            return {}
        run_id, error = record.run.opened(wait=False)
        if run_id is None and error is None:
            return {}
        record.linked = True
        return record.run.attrs()

    def end(self, member: Member, stop: TrialStop, error: BaseException | None = None) -> float:
        """Record how the member's trial ended (its attributes, its MLflow run closed in the
        background) and return its objective value; raise ``TrialPruned``,
        :class:`Interrupted` or :class:`Cancelled` as the trial ended. After ``error`` (out of
        the fit: the trial ends FAIL) the caller raises. (A trial alone: an array's trials end
        together, ``array_host._Array``, through :meth:`ending` and :meth:`record`.)"""
        ending = self.ending(member, stop, error)
        trial = ending.trial
        try:
            if hasattr(trial.storage, "set_trial_user_attrs"):
                trial.storage.set_trial_user_attrs(trial._trial_id, ending.attrs)
            else:  # a storage of Optuna's own (tests): one transaction each
                for key, item in ending.attrs.items():
                    trial.storage.set_trial_user_attr(trial._trial_id, key, item)
        except UpdateFinishedTrialError:
            ending = self.taken(ending)
        except BaseException:
            self.record(ending)  # the run must not stay RUNNING
            raise
        self.record(ending)
        if ending.taken is not None:
            raise ending.taken
        if ending.raises is not None:
            raise ending.raises
        if ending.state == "PRUNED":
            raise optuna.TrialPruned(ending.reason)
        return math.nan if ending.value is None else ending.value

    def ending(self, member: Member, stop: TrialStop, error: BaseException | None = None) -> Ending:
        """How the member's trial ended, before anything is stored: its state and value, why,
        what it measured, and what follows (an interruption raised, the trial queued again).
        After ``error`` (out of the fit) it ends FAIL with what was measured before."""
        record: _Record = member.context
        result = member.result
        run_attrs = {} if record.linked else record.run.attrs() if record.run is not None else {}
        if record.array is not None:  # stored with its end, in the same transaction as the array's others
            run_attrs[attrs.ARRAY_ID] = record.array
        if error is not None:
            interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
            reason = "interrupted" if interrupted else f"{type(error).__name__}: {first_line(error)}"
            return Ending(
                member,
                "FAIL",
                None,
                reason,
                {attrs.REASON: reason, **run_attrs},
                status="KILLED" if interrupted else None,
                requeue=interrupted,
            )
        measured = {
            attrs.EPOCHS_TRAINED: result.epochs,
            attrs.TRAIN_SECONDS: round(result.seconds, 3),
            **run_attrs,  # ms: as results.duration_s shows it
            **({attrs.PBT: self.lineage(member)} if self.cfg.population else {}),
        }
        cut_short = result.epochs < member.epochs and not member.ended_early
        if self.stop.requested and cut_short:  # one that trained all its epochs keeps its result
            reason = (
                f"interrupted at epoch {result.epochs - 1}" if result.epochs else "interrupted before its first epoch"
            )
            return Ending(
                member,
                "FAIL",
                None,
                reason,
                {**measured, attrs.REASON: reason},
                status="KILLED",
                requeue=True,
                raises=Interrupted(self.stop.signum or 0),
            )
        if stop.cancelled.is_set() and cut_short:  # a trial that ended on its own keeps its result
            return Ending(
                member,
                "FAIL",
                None,
                "cancelled",
                {**measured, attrs.REASON: "cancelled"},
                status="KILLED",
                requeue=True,
                raises=Cancelled(),
            )
        state, value, why = outcome(result, self.cfg.study.metric, PRUNERS[self.cfg.study.pruner].verdict)
        return Ending(
            member,
            state,
            value if state == "COMPLETE" else None,
            why,
            {**measured, **({attrs.REASON: why} if why else {})},
        )

    def lineage(self, member: Member) -> dict[str, Any]:
        """A population member's ``pbt`` attribute: the declared hyperparameters it ended with
        (its params are its first draw) and each copy that got it there."""
        # Its declared hyperparameters, and those the views show (an undeclared lr is the
        # optimizer's default: another if it copied a member of another optimizer).
        shown = {*self.cfg.params, "optimizer", "lr", "momentum"}
        final = in_sampling_order({k: v for k, v in member.hp.items() if k in shown})
        return {"final": final, "exploits": member.result.exploits}

    def taken(self, ending: Ending) -> Ending:
        """``ending`` for a trial another worker ended meanwhile (finding no heartbeat of it:
        this process paused past the grace period, say): its run records what was trained,
        KILLED as that worker left it, and the trial stays as that worker left it."""
        trial = ending.trial
        try:
            why = trial.storage.get_trial(trial._trial_id).user_attrs.get(attrs.REASON)
        except Exception:  # its reason unread: the run still says how the trial ended
            why = None
        taken = TakenOver(why)
        return dataclasses.replace(
            ending,
            state="FAIL",
            value=None,
            reason=f"ended by another worker: {taken.reason}",
            status="KILLED",
            requeue=False,
            raises=None,
            taken=taken,
        )

    def record(self, ending: Ending) -> None:
        """Close the trial's MLflow run in the background (once), as ``ending`` says, with its
        one-line description; the trial's heartbeat stops once it is sent."""
        record: _Record = ending.member.context
        if record.handed:
            return
        record.handed = True
        run, result, trial = record.run, ending.member.result, ending.trial
        if run is None:
            record.recorded()
            return
        value = ending.value if ending.state == "COMPLETE" else None
        lineage = self.lineage(ending.member) if self.cfg.population else None
        note = trial_note(
            ending.state,
            ending.reason,
            self.cfg.study.metric,
            value,
            result.epochs,
            in_sampling_order(trial.params),
            lineage,
        )
        try:
            run.finish(
                self.records,
                *self._artifacts(trial, dict(ending.member.hp), ending.member.seed, result, ending.member),
                result.history,
                ending.state,
                ending.reason,
                ending.status,
                note=note,
                # Its value and place in the one ranking, for MLflow's trials view (which, as the
                # ranking, leaves out a value that is not finite).
                objective=(value, rank_key(value, trial.number, self.cfg.study.direction))
                if value is not None and math.isfinite(value)
                else None,
                then=record.recorded,
            )
        except BaseException:
            record.recorded()
            raise

    def _artifacts(
        self, trial: optuna.trial.Trial, hp: dict[str, Any], seed: int, result: TrainResult, member: Member
    ) -> tuple[dict[str, bytes], list[Drawing]]:
        """The trial run's artifacts: files made here (its configuration, its network), and
        drawings made where the record is sent (its learning curves, opt-in)."""
        config = self.cfg.to_dict()
        files = {
            "trial_config.json": json_bytes(
                {
                    "study": self.cfg.study.name,
                    "trial": trial.number,
                    "seed": seed,
                    attrs.HYPERPARAMETERS: hp,
                    **{k: config[k] for k in ("data", "model", "train")},
                }
            )
        }
        if self.cfg.population:  # where each change of its lr came from
            files["pbt.json"] = json_bytes(self.lineage(member))
        if result.weights is not None and self.cfg.tracking.register_model:  # the study's model, if best
            files[NETWORK_FILE] = network_bytes(
                self.data, ACTIVATIONS[self.cfg.model.activation].torch_class, result.weights
            )
        drawings: list[Drawing] = []
        if self.cfg.tracking.trial_plots and result.history:
            drawings.append(
                (
                    plot_learning_curves,
                    (result.history, f"{self.cfg.study.name} trial {trial.number}: {_describe(hp)}"),
                    "learning_curves.png",
                )
            )
        return files, drawings


@dataclass
class _Record:
    """A trial's record in the making: its MLflow run, when it started, and who to tell once
    the record is sent."""

    trial: optuna.trial.Trial
    recorded: Callable[[], None]
    run: TrialRecord | None = None
    linked: bool = False  # its run's id (or why there is none) stored with the trial
    handed: bool = False  # to the tracking thread, which calls `recorded` once it is sent
    started: float = field(default_factory=time.perf_counter)
    array: str | None = None  # the id of the array (one fit) it trains in


def trial_seed(study_seed: int | None, number: int) -> int:
    """The seed for a trial's weights and shuffling: reproducible when the study has a seed."""
    if study_seed is None:
        return random.randrange(2**31)
    return (study_seed * 1_000_003 + number) % 2**31


def _fixed_settings(cfg: Config, seed: int) -> dict[str, Any]:
    return {
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "hidden": list(cfg.model.hidden),
        "activation": cfg.model.activation,
        "init": cfg.model.init,
        "data": cfg.data.source,
        "seed": seed,
    }


def _describe(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
