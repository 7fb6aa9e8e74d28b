"""How a study-file key declares its constraint: its type, default and check, once, on the
dataclass field that holds it (``config.py`` reads and checks every key from these; the
sections beside their registries, ``DataConfig`` in ``data.py`` and ``ModelConfig`` in
``network.py``, declare theirs here too)."""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Callable

from lrsearch.core.registry import Registry

MAX_SEED = 2**32 - 1  # NumPy's and PyTorch's seeds


def declared(kind: type, default: Any = MISSING, *, expected: str = "", check: Callable[[Any], bool] | None = None,
        choices: Registry | tuple[str, ...] | None = None) -> Any:
    """A config field read from its study-file key: its type, default and constraint, declared
    once (the default is the dataclass's; the reader and the error message use the rest)."""
    if choices is not None:
        names = choices.names if isinstance(choices, Registry) else choices
        expected, check = "one of " + ", ".join(repr(c) for c in names), (lambda v: v in names)
    meta = {"kind": kind, "expected": expected, "check": check}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def int_in(low: int, high: int, default: Any = MISSING) -> Any:
    return declared(int, default, expected=f"an integer in [{low}, {high}]", check=lambda v: low <= v <= high)
