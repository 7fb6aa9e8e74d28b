"""How lrsearch writes numbers and hyperparameters for people: one rule for the CLI's tables,
the runs' descriptions and the params MLflow shows."""

from __future__ import annotations

from typing import Any, Mapping


def fmt(value: Any) -> str:
    """A number as people read it (4 significant digits), anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(params: Mapping[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{k}={fmt(v)}" for k, v in params.items())
