"""How lrsearch writes numbers and hyperparameters for people: one rule for the CLI's tables,
the runs' descriptions and the params MLflow shows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def fmt(value: Any) -> str:
    """A number as people read it (4 significant digits), anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, singular for 1 (``count(1, "trial")``: "1 trial"; ``count(3, "class",
    "classes")``: "3 classes"), with thousands separated."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def params_text(params: Mapping[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{k}={fmt(v)}" for k, v in params.items())


def exploits_text(exploits: Sequence[Mapping[str, Any]], limit: int = 6) -> str:
    """How a member of population-based training got its hyperparameters, as people read
    it: ``copied trial 5 after epoch 4 (lr 0.1→0.08); …`` (the last ``limit`` copies), or
    ``never copied another member``."""
    if not exploits:
        return "never copied another member"
    parts = []
    for e in exploits[-limit:]:
        changed = [
            f"{k} {fmt(e['before'].get(k, 'none'))}→{fmt(v)}" for k, v in e["after"].items() if e["before"].get(k) != v
        ]
        parts.append(
            f"copied trial {e['source']} after epoch {e['epoch']}" + (f" ({', '.join(changed)})" if changed else "")
        )
    earlier = len(exploits) - limit
    return ("; ".join(parts) + (f"; and {earlier} earlier" if earlier > 0 else "")) if parts else ""


def shown_params(params: Mapping[str, Any], pbt: Mapping[str, Any] | None) -> dict[str, Any]:
    """A trial's hyperparameters as every view of trials shows them (``run``, ``best``): its
    ``params``; for a member of population-based training (its ``pbt`` attribute), those it
    ended with, beside ``drawn`` (its params: its first draw) and ``copies`` (the trials it
    copied, after which epochs: ``trials 6 after epoch 7, 0 after epoch 23``)."""
    if not pbt:
        return {"params": dict(params)}
    copies = ", ".join(f"{e['source']} after epoch {e['epoch']}" for e in pbt["exploits"]) or "none"
    return {
        "params": dict(pbt["final"]),
        "drawn": dict(params),
        "copies": f"trials {copies}" if pbt["exploits"] else copies,
    }
