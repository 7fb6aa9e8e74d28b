"""How a study-file key declares its constraint: its type, default and check, once, on the
dataclass field that holds it (``config/`` reads and checks every key from these; the
sections beside their registries, ``DataConfig`` in ``data.py`` and ``ModelConfig`` in
``network.py``, declare theirs here too).

A constraint is an object that is both the check and the words of the error message
(``expected …``), as scikit-learn's ``Interval`` and ``StrOptions`` are: a bound is written
once, never once as a check and again as its message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any, Protocol

from lrsearch.core.registry import Registry

MAX_SEED = 2**32 - 1  # NumPy's and PyTorch's seeds


class Constraint(Protocol):
    @property
    def expected(self) -> str:  # what a value must be, as an error message says it: "an integer in [1, 100]"
        ...

    def __call__(self, value: Any) -> bool: ...


@dataclass(frozen=True)
class Interval:
    """Numbers between ``low`` and ``high`` (either may be None: unbounded), each end
    included or not (``closed``: "both", "left", "right" or "neither")."""

    kind: type  # int or float
    low: float | None
    high: float | None
    closed: str = "both"
    unit: str = ""  # shown after the words: "an integer >= 1 (epochs)"

    def __call__(self, value: Any) -> bool:
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        return (self.low is None or (value >= self.low if left else value > self.low)) and (
            self.high is None or (value <= self.high if right else value < self.high)
        )

    @property
    def expected(self) -> str:
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        unit = f" ({self.unit})" if self.unit else ""
        if self.low is not None and self.high is not None:
            what = "an integer" if self.kind is int else "a number"
            return f"{what} in {'[' if left else '('}{self.low}, {self.high}{']' if right else ')'}{unit}"
        what = "an integer" if self.kind is int else "a finite number"  # the reader refuses inf and nan
        if self.low is not None:
            return f"{what} {'>=' if left else '>'} {self.low}{unit}"
        return f"{what} {'<=' if right else '<'} {self.high}{unit}"


POSITIVE = Interval(float, 0, None, closed="neither")  # a learning rate, a log range's low bound, a step


@dataclass(frozen=True)
class Options:
    """One of a fixed set of names (a registry's, or a tuple)."""

    names: tuple[str, ...]

    def __call__(self, value: Any) -> bool:
        return value in self.names

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(repr(n) for n in self.names)


@dataclass(frozen=True)
class Satisfies:
    """A rule that is neither an interval nor options, with its words."""

    expected: str
    check: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.check(value)


# Returns Any, as dataclasses.field does: a field of any declared type (its default, of any type).
def declared(
    kind: type,
    default: Any = MISSING,
    constraint: Constraint | None = None,
    *,
    choices: Registry | tuple[str, ...] | None = None,
    unset: str | None = None,
) -> Any:
    """A config field read from its study-file key: its type, default and constraint, declared
    once (the default is the dataclass's; the reader checks the constraint and its error
    message says the constraint's ``expected``). ``choices``: the names of a registry or tuple.
    ``unset``: what a default of None means, in words (the docs' reference says it)."""
    if choices is not None:
        constraint = Options(choices.names if isinstance(choices, Registry) else tuple(choices))
    meta = {"kind": kind, "constraint": constraint, "unset": unset}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def int_in(low: int, high: int, default: Any = MISSING, *, unset: str | None = None) -> Any:
    """An integer field in [low, high]."""
    return declared(int, default, Interval(int, low, high), unset=unset)
