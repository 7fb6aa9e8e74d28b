"""A study's service state, as one typed record: what lrsearch keeps in Optuna's study user
attributes (the queue: its stored configuration, total, priority, submission; its
lifecycle: cancelled, done, unrunnable, interrupted; its MLflow experiment and parent run;
its registered model and range test). Every module reads and writes those attributes
through :class:`StudyRecord`; ``sql/views.sql`` reads the same keys (``attrs.SQL_NAMES``:
``tests/test_study_record.py`` holds the two together).

A new piece of state: a field here (its key in ``attrs.py``, its type, its JSON form in
``from_attrs``/``to_attrs``), the view's column if SQL users need it, and ``phase.py`` if
it changes what a study is doing.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lrsearch.core import attrs


def utc_now(timespec: str = "auto") -> str:
    """Now, as the records store a time: ISO 8601, UTC."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec=timespec)


@dataclass(frozen=True)
class Cancellation:
    """``lrsearch cancel``: when, and whether running trials stop at once (``--now``)."""

    at: str
    now: bool = False


@dataclass(frozen=True)
class Unrunnable:
    """A worker could not run the study: why, and which lrsearch on which host said so."""

    reason: str
    version: str = "?"
    host: str = "?"
    at: str = "?"


@dataclass(frozen=True)
class Interruption:
    """The study's last worker stopped with trials left: when, and on what."""

    at: str
    signal: str = "a signal"


@dataclass(frozen=True)
class ModelRecord:
    """The study's registered model: the best trial's network in MLflow's Model Registry."""

    name: str
    version: str
    trial: int
    run_id: str
    uri: str


@dataclass(frozen=True)
class StudyRecord:
    """Everything lrsearch keeps about a study in its user attributes, typed. A study
    submitted with lrsearch has a ``config`` (its stored configuration) and a ``target``."""

    metric: str | None = None  # the objective's metric name, e.g. val/acc
    config: Mapping[str, Any] | None = None  # the whole configuration: any worker runs it without the file
    target: int | None = None  # the total of COMPLETE + PRUNED trials
    priority: int = 0  # higher first; then the oldest submission
    submitted_at: str | None = None
    cancelled: Cancellation | None = None
    done: bool = False  # the total reached and the parent run closed
    unrunnable: Unrunnable | None = None
    interrupted: Interruption | None = None
    model: ModelRecord | None = None
    lr_range: Mapping[str, Any] | None = None  # lr = { find = true }: the range test's result
    experiment_id: str | None = None  # MLflow's
    parent_run_id: str | None = None

    @property
    def submitted(self) -> bool:
        """Submitted with lrsearch (it has a stored configuration): in the queue until done or cancelled."""
        return self.config is not None

    @property
    def open(self) -> bool:
        """In the queue: submitted, not done, not cancelled."""
        return self.submitted and not self.done and self.cancelled is None

    def phase(self, finished: int, running: int) -> str:
        """What the study is doing (``phase.py``'s rule)."""
        from lrsearch.core.phase import phase

        return phase(
            target=finished + 1 if self.target is None else self.target,
            finished=finished,
            running=running,
            cancelled=self.cancelled,
            unrunnable=self.unrunnable,
            interrupted=self.interrupted,
        )

    @classmethod
    def from_attrs(cls, user_attrs: Mapping[str, Any]) -> StudyRecord:
        """The record of a study's user attributes (keys it does not know are ignored)."""

        def typed(kind: type, key: str) -> Any:
            raw = user_attrs.get(key)
            if raw is None:
                return None
            if not isinstance(raw, Mapping):  # a bare value (an older lrsearch's, another tool's): its first field
                return kind(str(raw)) if kind is not ModelRecord else None
            known = {f.name for f in dataclasses.fields(kind)}
            try:
                return kind(**{k: v for k, v in raw.items() if k in known})
            except TypeError:  # a part missing: unreadable, as if absent
                return None

        return cls(
            metric=user_attrs.get(attrs.METRIC),
            config=user_attrs.get(attrs.CONFIG),
            target=user_attrs.get(attrs.TARGET),
            priority=user_attrs.get(attrs.PRIORITY) or 0,
            submitted_at=user_attrs.get(attrs.SUBMITTED_AT),
            cancelled=typed(Cancellation, attrs.CANCELLED),
            done=bool(user_attrs.get(attrs.DONE)),
            unrunnable=typed(Unrunnable, attrs.UNRUNNABLE),
            interrupted=typed(Interruption, attrs.INTERRUPTED),
            model=typed(ModelRecord, attrs.MODEL),
            lr_range=user_attrs.get(attrs.LR_RANGE),
            experiment_id=user_attrs.get(attrs.EXPERIMENT),
            parent_run_id=user_attrs.get(attrs.PARENT_RUN),
        )

    @staticmethod
    def to_attrs(**fields: Any) -> dict[str, Any]:
        """The user attributes that store ``fields`` (names of this class's fields, with their
        values: a record's part is written alone, as a worker sets one piece of state)."""
        out = {}
        for name, value in fields.items():
            if name not in _KEYS:
                raise TypeError(f"StudyRecord has no field {name!r}")
            typed = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[_KEYS[name]] = dataclasses.asdict(value) if typed else value
        return out


_KEYS = {
    "metric": attrs.METRIC,
    "config": attrs.CONFIG,
    "target": attrs.TARGET,
    "priority": attrs.PRIORITY,
    "submitted_at": attrs.SUBMITTED_AT,
    "cancelled": attrs.CANCELLED,
    "done": attrs.DONE,
    "unrunnable": attrs.UNRUNNABLE,
    "interrupted": attrs.INTERRUPTED,
    "model": attrs.MODEL,
    "lr_range": attrs.LR_RANGE,
    "experiment_id": attrs.EXPERIMENT,
    "parent_run_id": attrs.PARENT_RUN,
}
assert set(_KEYS) == {f.name for f in dataclasses.fields(StudyRecord)}, "every field has its attribute"
