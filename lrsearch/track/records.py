"""A trial's records in the form MLflow takes them: its metric history's points as metrics (each
once), params as text within MLflow's limit, and ``log_batch`` requests within MLflow's
per-request limits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lrsearch.core.text import fmt

# log_batch limits (MLflow REST API): per request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS, _MAX_ENTITIES = 1000, 100, 100, 1000

# (step, value, timestamp_ms) per metric key, as MemoryLogger records a trial's metrics.
History = Mapping[str, Sequence[tuple[int, float, int]]]


def _metrics(history: History) -> list[Any]:
    """The history's points as MLflow metrics, each once: a point logged twice in one
    millisecond (same key, step, value and time) is one row of MLflow's, and sending it twice
    in a batch would fail the batch's insert (MLflow then inserts the rows one by one)."""
    from mlflow.entities import Metric

    points = dict.fromkeys((key, value, ts, step) for key, points in history.items() for step, value, ts in points)
    return [Metric(*point) for point in points]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit for a param value


def _trial_param_value(value: Any) -> Any:
    """A trial's param as its run shows it: a float as the descriptions write numbers
    (``8.261e-05``, 4 significant digits), because MLflow's runs table cuts a long one
    (``8.26080839…``) in its narrow columns; anything else as :func:`_param_value` logs it.
    The exact value stays in Optuna, the SQL views and the run's ``trial_config.json``."""
    return fmt(value) if isinstance(value, float) else value


def _batches(params: list[Any], tags: list[Any], metrics: list[Any]) -> Iterable[dict[str, Any]]:
    """``log_batch`` arguments within MLflow's per-request limits (params, tags, total)."""
    while params or tags or metrics:
        batch = {"params": params[:_MAX_PARAMS], "tags": tags[:_MAX_TAGS]}
        room = _MAX_ENTITIES - len(batch["params"]) - len(batch["tags"])
        batch["metrics"] = metrics[: min(room, _MAX_METRICS)]
        params, tags, metrics = params[_MAX_PARAMS:], tags[_MAX_TAGS:], metrics[len(batch["metrics"]) :]
        yield batch


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
