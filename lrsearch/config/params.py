"""The ``[params]`` table: each hyperparameter a fixed value, ``{ choices = [...] }``, a
range ``{ low, high, log, step }`` or lr's ``{ find = true }``, checked against its entry in
``choices/space.py``; and a spec written back as a study file's value (``Config.to_toml``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lrsearch.choices.population import refusal
from lrsearch.choices.space import (
    FIND_FACTOR,
    HYPERPARAMETERS,
    Choices,
    Find,
    Fixed,
    Hyperparameter,
    ParamSpec,
    Range,
)
from lrsearch.config.table import _Table
from lrsearch.core.constraints import POSITIVE
from lrsearch.core.registry import did_you_mean


def _params(t: _Table, sampler: str) -> dict[str, ParamSpec]:
    specs: dict[str, ParamSpec] = {}
    for name, value in t.items():
        hp = HYPERPARAMETERS.get(name)
        if hp is None:
            raise t.error(
                name,
                "unknown hyperparameter; expected one of "
                + ", ".join(HYPERPARAMETERS)
                + did_you_mean(name, HYPERPARAMETERS),
                show_got=False,
            )
        specs[name] = _param(t, hp, value)
        if sampler == "pbt" and (problem := refusal(name, specs[name])) is not None:
            raise t.error(name, problem, show_got=False)
        if sampler == "grid" and isinstance(specs[name], (Range, Find)):
            raise t.error(
                name,
                "expected a fixed value or { choices = [...] } for sampler 'grid' (a grid cannot enumerate a range)",
                show_got=False,
            )
    t.consumed.update(dict.fromkeys(specs))
    return specs


def _param(t: _Table, hp: Hyperparameter, value: Any) -> ParamSpec:
    key = hp.name
    if not isinstance(value, dict):
        return Fixed(_param_value(t, key, hp, value))
    if "choices" in value:
        extra = set(value) - {"choices"}
        if extra:
            raise t.error(
                f"{key}.{sorted(extra)[0]}", "unknown key; a choices table has only 'choices'", show_got=False
            )
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise t.error(f"{key}.choices", f"expected a non-empty list of {hp.expected}", choices)
        values = tuple(_param_value(t, f"{key}.choices", hp, c) for c in choices)
        if len(set(values)) != len(values):
            raise t.error(f"{key}.choices", "expected distinct values", choices)
        return Choices(values)
    if hp.kind in ("category", "bool"):
        raise t.error(key, f"expected {hp.expected}, or {{ choices = [...] }}", value)
    if "find" in value:
        return _find(t, key, value)
    unknown = set(value) - {"low", "high", "log", "step"}
    if unknown:
        raise t.error(
            f"{key}.{sorted(unknown)[0]}", "unknown key; expected low, high, log, step (or choices)", show_got=False
        )
    for bound in ("low", "high"):
        if bound not in value:
            raise t.error(f"{key}.{bound}", f"expected a {bound} bound ({hp.expected})", show_got=False)
    low = _param_value(t, f"{key}.low", hp, value["low"])
    high = _param_value(t, f"{key}.high", hp, value["high"])
    if low > high:
        raise t.error(key, "expected low <= high", f"low={low}, high={high}", raw=True)
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise t.error(f"{key}.log", "expected true or false", log)
    if log and not POSITIVE(low):
        raise t.error(f"{key}.low", f"expected {POSITIVE.expected} when log = true", low)
    step = value.get("step")
    if step is not None:
        if _number(step, hp.kind) is None or not POSITIVE(step):
            raise t.error(f"{key}.step", f"expected {POSITIVE.expected}", step)
        if log:
            raise t.error(f"{key}.step", "expected no step when log = true", step)
    return Range(low, high, log, step)


def _find(t: _Table, key: str, value: Mapping[str, Any]) -> Find:
    """``{ find = true, factor = 10 }``: only for lr."""
    if key != "lr":
        raise t.error(f"{key}.find", "expected no find: only lr's range can come from the range test", show_got=False)
    unknown = set(value) - {"find", "factor"}
    if unknown:
        raise t.error(f"{key}.{sorted(unknown)[0]}", "unknown key; a find table has find and factor", show_got=False)
    if value["find"] is not True:
        raise t.error(f"{key}.find", "expected true", value["find"])
    factor = value.get("factor", Find.factor)
    if _number(factor, "float") is None or not FIND_FACTOR(factor):
        raise t.error(
            f"{key}.factor",
            f"expected {FIND_FACTOR.expected} (the range is the suggestion / factor to the suggestion × factor)",
            factor,
        )
    return Find(float(factor))


def _param_value(t: _Table, key: str, hp: Hyperparameter, value: Any) -> Any:
    parsed: Any
    if hp.kind in ("category", "bool"):
        parsed = value if isinstance(value, str if hp.kind == "category" else bool) else None
    else:
        parsed = _number(value, hp.kind)
    if parsed is None or not hp.valid(parsed):
        raise t.error(key, f"expected {hp.expected}", value)
    return parsed


def _spec_to_toml(spec: ParamSpec) -> Any:
    if isinstance(spec, Find):
        return {"find": True, "factor": spec.factor}
    if isinstance(spec, Fixed):
        return spec.value
    if isinstance(spec, Choices):
        return {"choices": list(spec.values)}
    table: dict[str, Any] = {"low": spec.low, "high": spec.high, "log": spec.log}
    if spec.step is not None:
        table["step"] = spec.step
    return table


# -- helpers ------------------------------------------------------------------------------


def _number(value: Any, kind: str) -> float | int | None:
    """``value`` as the hyperparameter's numeric kind, or None if it is not one (TOML's
    ``inf`` and ``nan`` are not: no hyperparameter or size is infinite)."""
    if isinstance(value, bool):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    if isinstance(value, int):
        return float(value) if abs(value) < 2**53 else None
    return value if isinstance(value, float) and math.isfinite(value) else None
