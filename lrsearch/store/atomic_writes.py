"""Writes that Optuna's storage makes in several commits, made here in one transaction: a
study's user attributes together, and a running trial failed with its reason under its row's
lock. ``RetryingStorage`` makes each call through its retries.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState


def set_study_user_attrs(rdb: RDBStorage, study_id: int, values: dict[str, Any]) -> None:
    """Several user attributes of a study: new ones added, the others' values replaced."""
    with _create_scoped_session(rdb.scoped_session, True) as session:
        stored = {a.key: a for a in models.StudyUserAttributeModel.where_study_id(study_id, session)}
        for key, value in values.items():
            if key in stored:
                stored[key].value_json = json.dumps(value)
            else:
                session.add(models.StudyUserAttributeModel(study_id=study_id, key=key, value_json=json.dumps(value)))


def fail_trial(rdb: RDBStorage, trial_id: int, user_attrs: dict[str, Any]) -> bool:
    """A RUNNING trial ended FAIL with ``user_attrs``, its row held meanwhile: False, and
    nothing written, if it had ended."""
    with _create_scoped_session(rdb.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if trial.state.is_finished():
            return False
        for key, value in user_attrs.items():  # Optuna's own per-attribute write, minus its commit
            rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        trial.state = TrialState.FAIL
        trial.datetime_complete = datetime.datetime.now()  # as Optuna writes it
    return True
