"""Reading a study's results: its trials counted, ranked and shown as records.

One ranking serves every view of the trials (``run``'s summary, the progress bar, the
parent run's metrics, the report, the registered model): best first in the study's
direction, ties to the earlier trial. ``sql/views.sql`` ranks ``best_trials`` by the same
rule in SQL, for ``lrsearch best`` and SQL users, and MLflow's trials view by each run's
:func:`rank_key`; ``tests/test_results.py`` holds them together.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch.choices.space import in_sampling_order
from lrsearch.core import attrs
from lrsearch.core.errors import unknown_study
from lrsearch.core.text import count, shown_params
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import redact, storage_url

# Trials that count towards a study's total: a FAIL is retried, a PRUNED one is an answer.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class Ranked(Protocol):
    """What :func:`ranking` reads of a trial (an Optuna FrozenTrial, a report's row, a view's)."""

    @property
    def number(self) -> int: ...

    @property
    def state(self) -> TrialState | str: ...  # a TrialState, or its name

    @property
    def value(self) -> float | None: ...


T = TypeVar("T", bound=Ranked)


def ranking(trials: Iterable[T], direction: str, states: Sequence[str] = ("COMPLETE",)) -> list[T]:
    """The trials in ``states`` that have a finite value, best first in ``direction``
    ("maximize" or "minimize"), ties to the earlier trial; states in the order given
    (COMPLETE before PRUNED: a pruned trial's value is its last report, not its result).
    Trials are anything with ``number``, ``state`` (a TrialState or its name) and ``value``."""
    sign = -1.0 if direction == "maximize" else 1.0
    order = {state: i for i, state in enumerate(states)}

    def state(t: Any) -> str:
        return getattr(t.state, "name", t.state)

    kept = [t for t in trials if state(t) in order and t.value is not None and math.isfinite(t.value)]
    return sorted(kept, key=lambda t: (order[state(t)], sign * float(t.value or 0.0), t.number))


def rank_key(value: float, number: int, direction: str) -> str:
    """A COMPLETE trial's place in :func:`ranking`, as text that sorts the same way (ascending:
    best first, ties to the earlier trial) and depends on the trial alone, so that it is
    written once, at the trial's end: MLflow's trials view orders the runs by it (their tag
    ``rank_key``), as MLflow orders a view by one key only, its ties by start time."""
    bits = struct.unpack(">Q", struct.pack(">d", value + 0.0))[0]  # + 0.0: -0.0 ranks as 0.0
    ordered = bits ^ 0xFFFF_FFFF_FFFF_FFFF if bits >> 63 else bits | 1 << 63  # as the floats order
    if direction == "maximize":
        ordered ^= 0xFFFF_FFFF_FFFF_FFFF
    return f"{ordered:016x}.{number:010d}"


def best_so_far(trials: Sequence[T], direction: str) -> list[T]:
    """For each trial of ``trials`` (in trial order), the best of it and those before it,
    by :func:`ranking`'s rule."""
    out: list[T] = []
    for t in trials:
        out.append(t if not out else ranking([out[-1], t], direction, (str(getattr(t.state, "name", t.state)),))[0])
    return out


def direction(study: optuna.Study) -> str:
    return study.direction.name.lower()


def best_trials(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` COMPLETE trials, best first, as :func:`trial_record` shows them."""
    return [trial_record(t) for t in ranking(study.get_trials(deepcopy=False), direction(study))[:top]]


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as ``run`` and ``best`` show it. ``params`` are the values Optuna sampled
    (fixed values included: they are suggested too), in sampling order, as in the SQL
    views' ``params``; the defaults a trial also trained with are in its
    ``hyperparameters`` attribute and its MLflow run's params. A member of population-based
    training shows what it ended with, and how (``core.text.shown_params``)."""
    return {
        "number": t.number,
        "value": t.value,
        "state": t.state.name,
        **shown_params(in_sampling_order(t.params), t.user_attrs.get(attrs.PBT)),
        "duration_s": duration_s(t),
        "wall_s": wall_s(t),
        "mlflow_run_id": t.user_attrs.get(attrs.MLFLOW_RUN),
    }


def duration_s(t: FrozenTrial) -> float | None:
    """A trial's duration as every view shows it (``run``, ``best``, the SQL views, the
    description, the report): the time it trained, which for a trial of an array is its
    share of the array's (each epoch's time divided among the members that trained it, the
    ``train_seconds`` attribute: what it would have taken alone in an array of one, roughly,
    divided by the array's speed-up), so that trials compare whatever array they ran in; a
    trial without it (stored before, or failed early), :func:`wall_s`. The views read the
    same."""
    seconds = t.user_attrs.get(attrs.TRAIN_SECONDS)
    return float(seconds) if isinstance(seconds, (int, float)) else wall_s(t)


def wall_s(t: FrozenTrial) -> float | None:
    """A trial's wall time: from its stored start (its claim) to its stored completion, in
    whole milliseconds (rounded half away from zero), in seconds; the arrays' trials all
    share their array's wall time. The views compute the same from the stored times (the
    ``seconds`` macro in sql/schema.py), so one trial shows one number."""
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    micro = (t.datetime_complete - t.datetime_start) // timedelta(microseconds=1)  # exact
    milli = (abs(micro) + 500) // 1000
    return (milli if micro >= 0 else -milli) / 1000


def counts(study: optuna.Study) -> tuple[int, int]:
    """Trials that count towards the total (COMPLETE + PRUNED), and trials RUNNING."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def count_finished(study: optuna.Study) -> int:
    return counts(study)[0]


def by_state(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """``{"COMPLETE": 12, "PRUNED": 8}``: how many trials are in each state, by name."""
    counted: dict[str, int] = {}
    for t in trials:
        counted[t.state.name] = counted.get(t.state.name, 0) + 1
    return counted


def state_text(counted: Mapping[str, int]) -> str:
    """``12 COMPLETE, 8 PRUNED``, states in alphabetical order (every view of a study's counts)."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counted.items()))


def state_counts(study: optuna.Study) -> str:
    """``12 COMPLETE, 8 PRUNED``: the study's trials by state."""
    return state_text(by_state(study.get_trials(deepcopy=False)))


def summary(study: optuna.Study) -> dict[str, float]:
    """The parent run's closing metrics: trials by state, the best value and trial."""
    trials = study.get_trials(deepcopy=False)
    out = {
        f"n_{s.name.lower()}": float(sum(t.state == s for t in trials))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    best = ranking(trials, direction(study))
    if best:
        out["best_value"] = float(best[0].value or 0.0)  # (ranked: finite)
        out["best_trial"] = float(best[0].number)
    return out


def tracking_warnings(study: optuna.Study) -> list[str]:
    """One line for trials whose MLflow record was lost (the tracking store stopped answering)."""
    lost = [t.number for t in study.get_trials(deepcopy=False) if attrs.TRACKING_ERROR in t.user_attrs]
    if not lost:
        return []
    shown = ", ".join(map(str, lost[:10])) + (", …" if len(lost) > 10 else "")
    return [
        f"MLflow tracking was lost for {count(len(lost), 'trial')} ({shown}); they are complete in Optuna, "
        f"with the error in their {attrs.TRACKING_ERROR!r} user attribute"
    ]


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    """An existing study, or :class:`UsageError` naming the studies that do exist."""
    url = storage_url(storage)
    store = open_storage(url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if name not in names:
        raise unknown_study(name, redact(url), names)
    return optuna.load_study(study_name=name, storage=store)
