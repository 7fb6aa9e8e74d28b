"""An Optuna storage whose every call survives a dropped connection or a database restart.

Each call goes through a :class:`lrsearch.store.retry.Retry`; the two that would not be safe to
repeat as they are (creating a trial, changing a trial's state) are made safe here, as the
docstring of ``retry.py`` explains. lrsearch's own statements, which Optuna's storage has no
call for, are in ``array_writes.py``, ``atomic_writes.py`` and ``trial_reads.py``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import threading
import uuid
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from typing import Any, cast

from optuna import Study
from optuna._typing import JSONSerializable
from optuna.distributions import BaseDistribution
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the interface fail_stale_trials checks
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import Engine

from lrsearch.core.errors import LrsearchError
from lrsearch.store import array_writes, atomic_writes, trial_reads
from lrsearch.store.retry import Retry, T, reason

CLAIM_ATTR = "lrsearch_claim"  # a new trial's token: see RetryingStorage.create_new_trial


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """An Optuna storage (``inner``, an RDB storage) whose every call is repeated through
    ``retry`` while its database cannot be reached."""

    def __init__(self, inner: BaseStorage, retry: Retry, engine: Engine | None = None) -> None:
        self._inner = inner
        self.retry = retry
        self._engine = engine
        self._window: dict[int, list[FrozenTrial]] | None = None  # see sampling()
        self._window_thread: int | None = None
        self._behind: dict[int, list[array_writes.Write]] = {}  # trial id -> its writes held back

    @contextlib.contextmanager
    def sampling(self, study_id: int | None = None, new: Sequence[int] = ()) -> Iterator[set[int]]:
        """Sampling the parameters of several new trials in a row (an array's): the study's
        trials are read once, at the first read, and what is set meanwhile (parameters, TPE's
        relative parameters and the other attributes) goes into that copy. TPE with
        ``constant_liar`` reads every RUNNING trial at each ``suggest`` (Optuna's cache keeps
        finished trials only): an array of 16 runs 16. The writes to the ``new`` trials (just
        claimed: no other worker writes to them) are held back and made at the end in one
        transaction, instead of one transaction each; writes
        to other trials go to the database at once (``study_id``: the new trials' study, read
        now). Only the thread that opened the window reads and writes through it. It yields
        the set of new trials found ended at the end (another worker failed them meanwhile,
        finding no heartbeat): nothing is written to those."""
        self._window, self._window_thread = {}, threading.get_ident()
        self._behind = {trial_id: [] for trial_id in new}
        ended: set[int] = set()
        if study_id is not None:
            self._window[study_id] = self._do("get_all_trials", study_id, True, None)  # a copy to patch
        try:
            yield ended
        finally:
            behind, self._behind = self._behind, {}
            self._window = self._window_thread = None
            rdb = self._rdb
            while behind:
                try:
                    self._call(array_writes.write_claimed, rdb, behind)
                    break
                except UpdateFinishedTrialError:  # which: read, and write the others' alone
                    gone = {t for t in behind if self._inner.get_trial(t).state.is_finished()}
                    ended |= gone
                    behind = {t: writes for t, writes in behind.items() if t not in gone}

    def _held_back(self, trial_id: int, *write: Any) -> bool:
        """Hold back a write to a new trial of the sampling window (see :meth:`sampling`)."""
        if trial_id not in self._behind or self._window_thread != threading.get_ident():
            return False
        self._behind[trial_id].append(write)
        return True

    def __getstate__(self) -> dict[str, Any]:
        """Picklable, as Optuna's RDB storage is: the inner storage drops its engine (and
        makes a new one when unpickled); this one's engine is the inner storage's, found again."""
        state = self.__dict__.copy()
        state.update(_engine=None, _window=None, _window_thread=None, _behind={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._engine = getattr(self._rdb, "engine", None)

    @property
    def _rdb(self) -> RDBStorage:
        """The RDB storage under Optuna's cache, for the statements written here."""
        # An RDB storage wherever lrsearch's own statements run (an in-memory one has no engine).
        return cast(RDBStorage, getattr(self._inner, "_backend", self._inner))

    def close(self) -> None:
        """Close the storage's database connections (before this process execs another)."""
        if self._engine is not None:
            self._engine.dispose()

    def _do(self, name: str, *args: Any) -> Any:
        return self._call(getattr(self._inner, name), *args)

    def _call(self, fn: Callable[..., T], *args: Any, recover: Callable[[], T | None] | None = None) -> T:
        """``retry.call``, with a database's refusal (a full disk, say) in one line of its own
        words instead of Optuna's guess ("… e.g. exceeding max length")."""
        try:
            return self.retry.call(fn, *args, recover=recover)
        except StorageInternalError as e:
            raise LrsearchError(f"{self.retry.what} refused a write: {reason(e)}") from e

    # -- made safe to repeat -----------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Create the trial with a token among its system attributes; before trying again,
        look for that token, so a trial is never created twice. The token goes once the trial
        is found: no lrsearch attribute stays on it (``study.trials``, ``trials_dataframe``
        and optuna-dashboard show what Optuna's own storage would)."""
        import optuna
        from optuna.trial import TrialState

        token = uuid.uuid4().hex
        if template_trial is None:
            template = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={CLAIM_ATTR: token})
        else:
            template = copy.deepcopy(template_trial)
            template.system_attrs = {**template.system_attrs, CLAIM_ATTR: token}

        def created() -> int | None:
            for t in self._inner.get_all_trials(study_id, deepcopy=False, states=(template.state,)):
                if t.system_attrs.get(CLAIM_ATTR) == token:
                    return t._trial_id
            return None

        trial_id = self._call(self._inner.create_new_trial, study_id, template, recover=created)
        if hasattr(self._rdb, "engine"):  # an RDB storage (the token's row, deleted: safe to repeat)
            self._call(array_writes.drop_system_attr, self._rdb, trial_id, CLAIM_ATTR)
            cached = getattr(self._inner, "_studies", {}).get(study_id)  # Optuna's cache keeps the trial made
            with getattr(self._inner, "_lock", contextlib.nullcontext()):
                for frozen in cached.trials.values() if cached is not None else ():
                    if frozen._trial_id == trial_id:
                        frozen.system_attrs.pop(CLAIM_ATTR, None)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Before trying again, read the trial: if it has the state (and values) asked for,
        the earlier try committed. (A queued trial taken by this worker, WAITING -> RUNNING,
        is taken under the store lock, so no other lrsearch worker took it meanwhile.)"""

        def done() -> bool | None:
            current = self._inner.get_trial(trial_id)
            if current.state == state and (values is None or current.values == list(values)):
                return True
            return None

        return self._call(self._inner.set_trial_state_values, trial_id, state, values, recover=done)

    # -- idempotent: repeated as they are ----------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._do("create_new_study", directions, study_name)  # a repeat: DuplicatedStudyError

    def delete_study(self, study_id: int) -> None:
        self._do("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._do("set_study_user_attr", study_id, key, value)

    def set_study_user_attrs(self, study_id: int, values: dict[str, Any]) -> None:
        """Several study user attributes in one transaction (Optuna writes one per call):
        a submitted study is queued with all of its attributes or none, in one commit."""
        self._call(atomic_writes.set_study_user_attrs, self._rdb, study_id, values)

    def set_trial_user_attrs(self, trial_id: int, values: dict[str, Any]) -> None:
        """Several user attributes of a running trial in one transaction (a trial's end:
        epochs trained, training time, reason), where Optuna commits one per call."""
        self.set_trials_user_attrs({trial_id: values})

    def set_trials_user_attrs(self, values: dict[int, dict[str, Any]]) -> None:
        """User attributes of several running trials (trial id -> attributes) in one transaction."""
        self._call(array_writes.set_user_attrs, self._rdb, values)

    def fail_trial(self, trial_id: int, user_attrs: dict[str, Any]) -> bool:
        """End a RUNNING trial FAIL with ``user_attrs`` (its reason), in one transaction that
        holds the trial's row: False, and nothing written, if it ended meanwhile (its own
        worker told it first). Optuna writes the attributes and the state one commit each,
        with the trial's own worker free to tell it between them."""

        def done() -> bool | None:
            current = self._inner.get_trial(trial_id)
            if not current.state.is_finished():
                return None
            return current.state.name == "FAIL" and all(current.user_attrs.get(k) == v for k, v in user_attrs.items())

        return self._call(atomic_writes.fail_trial, self._rdb, trial_id, user_attrs, recover=done)

    def report_trials(
        self, values: dict[int, tuple[int, float]], system_attrs: dict[int, dict[str, Any]] | None = None
    ) -> None:
        """One intermediate value (step, value) for each of several running trials, and
        system attributes of some of them (what their pruner records), in one transaction:
        the pruning check of an array's members at one epoch."""
        self._call(array_writes.report, self._rdb, values, system_attrs or {})

    def heartbeat_ages(self, study_id: int, trial_ids: Sequence[int]) -> dict[int, float]:
        """Seconds since each trial's last heartbeat, on the database's clock (trials that
        never beat are left out). A finished trial's worker keeps beating until its MLflow
        record is sent (see ``array_host.py``), so this tells a record on its way from a lost one."""
        return self._call(trial_reads.heartbeat_ages, self._rdb, list(trial_ids)) if trial_ids else {}

    def set_study_system_attr(self, study_id: int, key: str, value: JSONSerializable) -> None:
        self._do("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._do("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._do("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._do("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._do("get_all_studies")

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        if self._held_back(trial_id, "param", param_name, param_value_internal, distribution):
            self._check_distribution(trial_id, param_name, distribution)
        else:
            self._do("set_trial_param", trial_id, param_name, param_value_internal, distribution)
        for trial in self._windowed(trial_id):
            trial.params = {**trial.params, param_name: distribution.to_external_repr(param_value_internal)}
            trial.distributions = {**trial.distributions, param_name: distribution}

    def _check_distribution(self, trial_id: int, name: str, distribution: BaseDistribution) -> None:
        """What Optuna checks as it stores a parameter: the same name has a compatible
        distribution in every trial of the study (the window's copy holds them all)."""
        from optuna.distributions import check_distribution_compatibility

        study_id = next(
            sid for sid, trials in (self._window or {}).items() if any(t._trial_id == trial_id for t in trials)
        )
        for trial in self.get_all_trials(study_id, deepcopy=False):
            if name in trial.distributions:
                check_distribution_compatibility(trial.distributions[name], distribution)
                return

    def _windowed(self, trial_id: int) -> list[FrozenTrial]:
        """The sampling window's copy of a trial (see :meth:`sampling`), to write into."""
        return [t for trials in (self._window or {}).values() for t in trials if t._trial_id == trial_id]

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._do("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._do("get_best_trial", study_id)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._do("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._held_back(trial_id, "user", key, value):
            self._do("set_trial_user_attr", trial_id, key, value)
        for trial in self._windowed(trial_id):
            trial.user_attrs = {**trial.user_attrs, key: value}

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        if not self._held_back(trial_id, "system", key, value):
            self._do("set_trial_system_attr", trial_id, key, value)
        for trial in self._windowed(trial_id):  # TPE's relative params, shared with the liars
            trial.system_attrs = {**trial.system_attrs, key: value}

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._behind and self._window_thread == threading.get_ident():
            found = self._windowed(trial_id)
            if found:  # with what is held back so far
                return copy.deepcopy(found[0])
        return self._do("get_trial", trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self._window is None or self._window_thread != threading.get_ident():
            return self._do("get_all_trials", study_id, deepcopy, states)
        if study_id not in self._window:
            self._window[study_id] = self._do("get_all_trials", study_id, True, None)  # a copy to patch
        trials = [t for t in self._window[study_id] if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def record_heartbeat(self, trial_id: int) -> None:
        """Tried once: a heartbeat repeats on its own, every interval, so a live worker's
        beats resume within an interval of the database's return (a retry's backoff would
        hold them back for up to ``MAX_RETRY_DELAY_S``)."""
        self.retry.once(cast(BaseHeartbeat, self._inner).record_heartbeat, trial_id)  # asked only with heartbeats on

    def record_heartbeats(self, trial_ids: Sequence[int]) -> None:
        """A heartbeat for each of ``trial_ids``, in one transaction, tried once (see
        :meth:`record_heartbeat`)."""
        self.retry.once(array_writes.beat, self._rdb, list(trial_ids))

    def end_trials(self, endings: Mapping[int, tuple[TrialState, Sequence[float] | None, dict[str, Any]]]) -> set[int]:
        """End several running trials in one transaction, each (trial id -> state, values,
        user attributes) as ``study.tell`` stores it after its attributes: the trials of an
        array that end at one epoch boundary. Returns the trials that had ended already
        (another worker failed them, finding no heartbeat): left as they were."""

        def done() -> set[int] | None:
            taken = set()
            for trial_id, (state, values, _) in endings.items():
                current = self._inner.get_trial(trial_id)
                if not current.state.is_finished():
                    return None  # not committed: try again
                if current.state != state or (values is not None and current.values != list(values)):
                    taken.add(trial_id)
            return taken

        return self._call(array_writes.end, self._rdb, endings, recover=done)

    def claim_trials(self, study_id: int, count: int) -> list[int]:
        """Up to ``count`` trials of the study to run, RUNNING from now: its queued ones first
        (WAITING: retries of lost trials), as Optuna's ``ask`` takes them, then new ones, all
        made in one transaction. Their ids, in order."""

        rdb = self._rdb
        taken = []
        for trial_id in self._waiting(study_id)[:count]:
            if self._call(
                array_writes.take_waiting,
                rdb,
                trial_id,
                recover=functools.partial(array_writes.taken, rdb, trial_id),
            ):
                taken.append(trial_id)
        if len(taken) < count:
            start = array_writes.local_now()
            taken += self._call(
                array_writes.create_trials,
                rdb,
                study_id,
                count - len(taken),
                start,
                recover=lambda: array_writes.created_at(rdb, study_id, start),
            )
        return taken

    def _waiting(self, study_id: int) -> list[int]:
        return self._call(trial_reads.waiting, self._rdb, study_id)

    def values_at(self, study_id: int, step: int) -> list[tuple[int, float]]:
        """(trial number, value) of the study's COMPLETE, RUNNING and PRUNED trials at
        ``step``: the value reported there, or for a trial pruned before it, its last
        (``pruners._at``'s rule), in one query."""
        return self._call(array_writes.values_at, self._rdb, study_id, step)

    def count_states(self, study_id: int) -> dict[str, int]:
        """The study's trials by state (its name): one query, where ``study.get_trials`` reads
        every unfinished trial whole."""
        return self._call(trial_reads.count_states, self._rdb, study_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # BaseHeartbeat's interface
        return list(self.stale_heartbeats(study_id))

    def stale_heartbeats(self, study_id: int) -> dict[int, datetime.datetime]:
        """RUNNING trials whose last heartbeat is older than the grace period, each with that
        heartbeat: Optuna's rule, on the database's clock. A trial that never beat is left
        alone, as Optuna leaves it: another client's (``study.ask()`` on the same store), not
        a worker's. lrsearch's own trials all beat from their claim, in its transaction
        (``array_writes.create_trials``, ``take_waiting``)."""
        rdb = self._rdb
        assert rdb.heartbeat_interval is not None  # as Optuna's own check asserts: heartbeats are on
        return self._call(trial_reads.stale_heartbeats, rdb, study_id, rdb.grace_period or 2 * rdb.heartbeat_interval)

    def get_heartbeat_interval(self) -> int | None:  # None: no heartbeats (an in-memory storage)
        return getattr(self._inner, "get_heartbeat_interval", lambda: None)()

    def get_heartbeat_stale_trial_callback(self) -> Callable[[Study, FrozenTrial], None] | None:
        return getattr(self._inner, "get_heartbeat_stale_trial_callback", lambda: None)()

    def remove_session(self) -> None:
        self._inner.remove_session()
