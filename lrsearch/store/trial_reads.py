"""Reads of a study's trials in one query each, where Optuna's storage reads every trial
whole: its queued trials, its trials counted by state, and its heartbeats (their ages, and the
stale ones) on the database's clock. ``RetryingStorage`` makes each call through its retries.
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState


def waiting(rdb: RDBStorage, study_id: int) -> list[int]:
    """The study's queued trials (WAITING), in order."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        return list(
            session.execute(
                sa.select(trials.c.trial_id)
                .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
                .order_by(trials.c.trial_id)
            ).scalars()
        )


def count_states(rdb: RDBStorage, study_id: int) -> dict[str, int]:
    """The study's trials by state (its name)."""
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        return {
            state.name: n
            for state, n in session.execute(
                sa.select(trials.c.state, sa.func.count()).where(trials.c.study_id == study_id).group_by(trials.c.state)
            )
        }


def heartbeat_ages(rdb: RDBStorage, trial_ids: list[int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat (trials that never beat are left out)."""
    with _create_scoped_session(rdb.scoped_session) as session:
        now = session.execute(sa.func.now()).scalar_one().replace(tzinfo=None)
        beats = (
            session.query(models.TrialHeartbeatModel).filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids)).all()
        )
        return {b.trial_id: (now - b.heartbeat).total_seconds() for b in beats}


def stale_heartbeats(rdb: RDBStorage, study_id: int, grace: float) -> dict[int, datetime.datetime]:
    """RUNNING trials whose last heartbeat is older than ``grace`` seconds, each with that heartbeat."""
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    with _create_scoped_session(rdb.scoped_session) as session:
        # Naive, like the stored heartbeats (Optuna does the same for PostgreSQL).
        now = session.execute(sa.func.now()).scalar_one().replace(tzinfo=None)
        rows = session.execute(
            sa.select(trials.c.trial_id, beats.c.heartbeat)
            .join(beats, beats.c.trial_id == trials.c.trial_id)
            .where(trials.c.study_id == study_id, trials.c.state == TrialState.RUNNING)
        )
        limit = datetime.timedelta(seconds=grace)
        return {trial_id: beat for trial_id, beat in rows if now - beat > limit}
