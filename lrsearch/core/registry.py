"""Registries: the choices a study file can name, each entry with its factory, defaults and
docs line.

Each concept owns its registry (optimizers in ``optimizers.py``, schedules in
``schedules.py``, activations and initializations in ``network.py``, data sources in
``data.py``, samplers and pruners in ``sampling.py``); validation (``config/``), sampling
(``space.py``), the report and the docs' tables read it. Adding a choice is one entry.
Registries import nothing heavy: factories import torch or Optuna when called.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def doc(self) -> str:  # one line for the docs' tables and `--help`
        ...


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Named entries in a fixed order (the order of the docs and of error messages)."""

    def __init__(self, kind: str, entries: Iterable[E]) -> None:
        self.kind = kind
        self._entries = {e.name: e for e in entries}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    @property
    def expected(self) -> str:
        """``one of 'a', 'b', 'c'``: the phrase an error message uses."""
        return "one of " + ", ".join(repr(n) for n in self._entries)

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; expected {self.expected}" + did_you_mean(name, self._entries)
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'trials'?)`` for a close match, else ``""``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Epochs:
    """A default measured in epochs: ``epochs // divisor``, at least 1."""

    def __init__(self, divisor: int = 1) -> None:
        self.divisor = divisor

    def __call__(self, epochs: int) -> int:
        return max(1, epochs // self.divisor)

    def __repr__(self) -> str:
        return "epochs" if self.divisor == 1 else f"epochs/{self.divisor}"


def resolve(default: object, epochs: int) -> object:
    """A declared default's value for a run of ``epochs`` epochs."""
    return default(epochs) if isinstance(default, Epochs) else default
