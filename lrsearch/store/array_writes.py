"""An array's writes to Optuna's tables, one transaction for each array event: its new
trials claimed, their parameters and attributes, their reports at a pruning check, their
ends, their heartbeats.

Optuna's storage writes one trial at a time through its ORM, a transaction (and several
statements) per value: for an array of 16 that is hundreds of statements per epoch boundary.
These write the same rows, as Optuna writes them (its models' tables and their stored forms of
values, times and JSON), with one statement per kind of row. Every write here is safe to
repeat (an upsert, or a state changed only from RUNNING), as ``retry.py`` requires.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from optuna.distributions import distribution_to_json
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.orm import Session

# What a held-back write to a new trial is: ("param", name, internal value, distribution),
# ("user", key, value) or ("system", key, value).
Write = tuple[Any, ...]
# Optuna's model of a trial's user attributes, or of its system attributes (the same columns).
AttributeModel = type[models.TrialUserAttributeModel] | type[models.TrialSystemAttributeModel]


def local_now() -> datetime.datetime:
    """Now, as Optuna stores a trial's start and end: this host's naive local time."""
    return datetime.datetime.now()


def create_trials(rdb: RDBStorage, study_id: int, count: int, start: datetime.datetime) -> list[int]:
    """``count`` new RUNNING trials of the study, each numbered as Optuna numbers them (the
    study's trials before it), started at ``start`` (naive local time, as Optuna's), with a first heartbeat if
    the store keeps them; their ids. ``start`` also tells a repeat whether the first try
    committed (see :func:`created_at`)."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        # As Optuna's create_new_trial: the study's row locked while its trials are numbered.
        session.execute(
            sa.select(models.StudyModel.study_id).where(models.StudyModel.study_id == study_id).with_for_update()
        )
        ids = [
            session.execute(
                trials.insert()
                .values(study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=start)
                .returning(trials.c.trial_id)
            ).scalar_one()
            for _ in range(count)
        ]
        past = (
            sa.select(sa.func.count())
            .select_from(trials)
            .where(trials.c.study_id == study_id, trials.c.trial_id < sa.bindparam("tid"))
            .scalar_subquery()
        )
        session.execute(
            trials.update().where(trials.c.trial_id == sa.bindparam("tid")).values(number=past),
            [{"tid": trial_id} for trial_id in ids],
        )
        if rdb.heartbeat_interval is not None:
            session.execute(models.TrialHeartbeatModel.__table__.insert(), [{"trial_id": t} for t in ids])
    return ids


def _rowcount(result: Any) -> int:
    """The rows an UPDATE changed (SQLAlchemy types ``execute``'s result as a plain Result)."""
    return int(result.rowcount)


def take_waiting(rdb: RDBStorage, trial_id: int) -> bool:
    """A queued trial (WAITING) taken: RUNNING, started now, with its first heartbeat if the
    store keeps them, in one transaction (as Optuna's ``ask`` takes a queued trial, and as
    :func:`create_trials` makes new ones, so that every trial of lrsearch's beats from its
    claim). False if it is no longer WAITING."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        taken = _rowcount(
            session.execute(
                trials.update()
                .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=local_now())
            )
        )
        if taken and rdb.heartbeat_interval is not None:
            session.execute(models.TrialHeartbeatModel.__table__.insert(), [{"trial_id": trial_id}])
    return bool(taken)


def taken(rdb: RDBStorage, trial_id: int) -> bool | None:
    """Whether a :func:`take_waiting` whose answer was lost committed (its heartbeat is there:
    True; still WAITING: None, try again; anything else: another took it, False)."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        state = session.execute(sa.select(trials.c.state).where(trials.c.trial_id == trial_id)).scalar()
        if state == TrialState.WAITING:
            return None
        beat = session.execute(
            sa.select(models.TrialHeartbeatModel.trial_id).where(models.TrialHeartbeatModel.trial_id == trial_id)
        ).first()
        return state == TrialState.RUNNING and (beat is not None or rdb.heartbeat_interval is None)


def drop_system_attr(rdb: RDBStorage, trial_id: int, key: str) -> None:
    """A trial's system attribute ``key`` deleted (Optuna's storage API has no call for it)."""
    attrs = models.TrialSystemAttributeModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        session.execute(attrs.delete().where(attrs.c.trial_id == trial_id, attrs.c.key == key))


def created_at(rdb: RDBStorage, study_id: int, start: datetime.datetime) -> list[int] | None:
    """The trials a :func:`create_trials` at ``start`` made, if it committed (None if not)."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        found = session.execute(
            sa.select(trials.c.trial_id)
            .where(trials.c.study_id == study_id, trials.c.datetime_start == start)
            .order_by(trials.c.trial_id)
        ).scalars()
        return list(found) or None


def write_claimed(rdb: RDBStorage, writes: dict[int, list[Write]]) -> None:
    """What sampling wrote to just-claimed trials (``RetryingStorage.sampling``): their
    parameters and attributes. Raises Optuna's ``UpdateFinishedTrialError`` if one of them
    has ended meanwhile (nothing is written)."""
    params: list[dict[str, Any]] = []
    attrs: dict[str, dict[int, dict[str, Any]]] = {"user": {}, "system": {}}
    for trial_id, held in writes.items():
        for kind, *args in held:
            if kind == "param":
                name, internal, distribution = args
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": internal,
                        "distribution_json": distribution_to_json(distribution),
                    }
                )
            else:
                key, value = args
                attrs[kind].setdefault(trial_id, {})[key] = value
    with _create_scoped_session(rdb.scoped_session) as session:
        _running_or_raise(session, list(writes))
        _upsert(
            session,
            models.TrialParamModel.__table__,
            params,
            ("trial_id", "param_name"),
            ("param_value", "distribution_json"),
        )
        _set_attrs(session, models.TrialUserAttributeModel, attrs["user"])
        _set_attrs(session, models.TrialSystemAttributeModel, attrs["system"])


def report(rdb: RDBStorage, values: dict[int, tuple[int, float]], system_attrs: dict[int, dict[str, Any]]) -> None:
    """One intermediate value (step, value) for each of several running trials, and some
    system attributes of theirs; ``UpdateFinishedTrialError`` if one has ended (nothing written)."""
    stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
    rows = []
    for trial_id, (step, value) in values.items():
        number, kind = stored(value)
        rows.append({"trial_id": trial_id, "step": step, "intermediate_value": number, "intermediate_value_type": kind})
    with _create_scoped_session(rdb.scoped_session) as session:
        _running_or_raise(session, list(values) + list(system_attrs))
        _upsert(
            session,
            models.TrialIntermediateValueModel.__table__,
            rows,
            ("trial_id", "step"),
            ("intermediate_value", "intermediate_value_type"),
        )
        _set_attrs(session, models.TrialSystemAttributeModel, system_attrs)


def set_user_attrs(rdb: RDBStorage, values: dict[int, dict[str, Any]]) -> None:
    """User attributes of several running trials; ``UpdateFinishedTrialError`` if one has ended."""
    with _create_scoped_session(rdb.scoped_session) as session:
        _running_or_raise(session, list(values))
        _set_attrs(session, models.TrialUserAttributeModel, values)


def end(rdb: RDBStorage, endings: Mapping[int, tuple[TrialState, Sequence[float] | None, dict[str, Any]]]) -> set[int]:
    """End running trials (trial id -> state, values, user attributes); the trials that had
    ended already (another worker failed them) are left as they were, and returned."""
    trials = models.TrialModel.__table__
    stored = models.TrialValueModel.value_to_stored_repr
    now = local_now()
    taken = set()
    with _create_scoped_session(rdb.scoped_session) as session:
        for trial_id, (state, _, _) in endings.items():
            changed = session.execute(
                trials.update()
                .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING)
                .values(state=state, datetime_complete=now)
            )
            if _rowcount(changed) == 0:
                taken.add(trial_id)
        ended = {t: e for t, e in endings.items() if t not in taken}
        _set_attrs(session, models.TrialUserAttributeModel, {t: a for t, (_, _, a) in ended.items()})
        values = []
        for trial_id, (_, numbers, _) in ended.items():
            for objective, value in enumerate(numbers or ()):
                number, kind = stored(value)
                values.append({"trial_id": trial_id, "objective": objective, "value": number, "value_type": kind})
        _upsert(session, models.TrialValueModel.__table__, values, ("trial_id", "objective"), ("value", "value_type"))
    return taken


def beat(rdb: RDBStorage, trial_ids: Sequence[int]) -> None:
    """A heartbeat, now (the database's clock), for each of ``trial_ids``."""
    with _create_scoped_session(rdb.scoped_session) as session:
        now = session.execute(sa.func.now()).scalar_one()
        _upsert(
            session,
            models.TrialHeartbeatModel.__table__,
            [{"trial_id": t, "heartbeat": now} for t in trial_ids],
            ("trial_id",),
            ("heartbeat",),
        )


def values_at(rdb: RDBStorage, study_id: int, step: int) -> list[tuple[int, float]]:
    """(trial number, value) of the study's COMPLETE, RUNNING and PRUNED trials at ``step``:
    reported there, or for a PRUNED trial that stopped before it, its last report."""
    trials = models.TrialModel.__table__
    values = models.TrialIntermediateValueModel.__table__
    last = (
        sa.select(values.c.trial_id, sa.func.max(values.c.step).label("step"))
        .join(trials, trials.c.trial_id == values.c.trial_id)
        .where(trials.c.study_id == study_id)
        .group_by(values.c.trial_id)
        .subquery()
    )
    stored = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    with _create_scoped_session(rdb.scoped_session) as session:
        rows = session.execute(
            sa.select(trials.c.number, values.c.intermediate_value, values.c.intermediate_value_type)
            .join(values, values.c.trial_id == trials.c.trial_id)
            .join(last, last.c.trial_id == trials.c.trial_id)
            .where(
                trials.c.study_id == study_id,
                sa.or_(
                    sa.and_(
                        values.c.step == step,
                        trials.c.state.in_([TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED]),
                    ),
                    sa.and_(trials.c.state == TrialState.PRUNED, last.c.step < step, values.c.step == last.c.step),
                ),
            )
        ).all()
    return [(number, stored(value, kind)) for number, value, kind in rows]


def _running_or_raise(session: Session, trial_ids: list[int]) -> None:
    """Optuna's check before it writes to a trial, for several: each still RUNNING."""
    if not trial_ids:
        return
    trials = models.TrialModel.__table__
    # Their rows locked, as Optuna locks a trial's before it writes (PostgreSQL; SQLite
    # serializes writers): a trial failed elsewhere meanwhile is not written to.
    states: dict[int, TrialState] = dict(
        session.execute(
            sa.select(trials.c.trial_id, trials.c.state).where(trials.c.trial_id.in_(set(trial_ids))).with_for_update()
        ).all()
    )
    for trial_id in trial_ids:
        if trial_id not in states:
            raise KeyError(f"no trial with trial_id {trial_id} exists")
        if states[trial_id].is_finished():
            raise UpdateFinishedTrialError(f"trial#{trial_id} has already finished and can not be updated")


def _set_attrs(session: Session, model: AttributeModel, values: dict[int, dict[str, Any]]) -> None:
    """Trials' user or system attributes (``model``: Optuna's model of either), trial id ->
    key -> value, stored as Optuna stores them (JSON)."""
    _upsert(
        session,
        model.__table__,
        [
            {"trial_id": t, "key": k, "value_json": json.dumps(v)}
            for t, items in values.items()
            for k, v in items.items()
        ],
        ("trial_id", "key"),
        ("value_json",),
    )


def _upsert(
    session: Session, table: sa.Table, rows: list[dict[str, Any]], keys: tuple[str, ...], updated: tuple[str, ...]
) -> None:
    """Insert ``rows``, or update ``updated`` where a row with the same ``keys`` exists."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):  # another database: Optuna's own writes, one row at a time
        _row_by_row(session, table, rows, keys, updated)
        return
    statement: postgresql.Insert | sqlite.Insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(
        table
    )
    session.execute(
        statement.on_conflict_do_update(index_elements=list(keys), set_={c: statement.excluded[c] for c in updated}),
        rows,
    )


def _row_by_row(
    session: Session, table: sa.Table, rows: list[dict[str, Any]], keys: tuple[str, ...], updated: tuple[str, ...]
) -> None:
    for row in rows:
        match = [table.c[k] == row[k] for k in keys]
        if _rowcount(session.execute(table.update().where(*match).values({c: row[c] for c in updated}))) == 0:
            session.execute(table.insert().values(row))
