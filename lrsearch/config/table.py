"""A study file's tables as they are read: typed getters, every mistake reported as
``FILE: [section].key: expected …, got …``, and the keys nobody read refused at the end
(an unknown key, or an unknown table)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lrsearch.core.errors import ConfigError, shown
from lrsearch.core.registry import did_you_mean

TABLES = ("study", "data", "model", "train", "params", "tracking", "pbt")

_TYPE_NAMES = {
    bool: "true or false",
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "a table",
}


class _Table:
    """One TOML table being read: typed getters, and unknown keys reported at the end."""

    def __init__(self, raw: Mapping[str, Any], source: str, section: str) -> None:
        self.raw = raw
        self.source = source
        self.section = section
        self.consumed: dict[str, None] = {}  # the keys this table knows, in the order read

    def _key(self, key: str) -> str:
        return f"[{self.section}].{key}" if self.section else f"[{key}]"

    def error(
        self, key: str, expected: str, got: Any = None, *, show_got: bool = True, raw: bool = False
    ) -> ConfigError:
        message = expected
        if show_got:
            message += f", got {got if raw else _show(got)}"
        return ConfigError(self.source, self._key(key), message)

    def items(self) -> list[tuple[str, Any]]:
        return list(self.raw.items())

    def table(self, key: str, required: bool = False) -> _Table:
        self.consumed[key] = None
        if key not in self.raw:
            if required:
                raise ConfigError(self.source, f"[{key}]", "expected this table (it is required)")
            return _Table({}, self.source, key)
        value = self.raw[key]
        if not isinstance(value, dict):
            raise ConfigError(self.source, f"[{key}]", f"expected a table, got {_show(value)}")
        return _Table(value, self.source, key)

    def get(
        self,
        key: str,
        kind: type,
        default: Any = None,
        *,
        required: bool = False,
        check: Callable[[Any], bool] | None = None,
        expected: str = "",
    ) -> Any:
        self.consumed[key] = None
        if key not in self.raw:
            if required:
                raise self.error(key, f"expected {expected} (it is required)", show_got=False)
            return default
        value = self.raw[key]
        number = kind is float and isinstance(value, int) and not isinstance(value, bool)
        # bool is an int subclass: `true` is no integer, and 1 is no boolean
        exact = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not (exact or number) or kind is float and not math.isfinite(value):
            raise self.error(key, f"expected {expected or _TYPE_NAMES[kind]}", value)
        value = float(value) if kind is float else value
        if check is not None and not check(value):
            raise self.error(key, f"expected {expected}", value)
        return value

    def finish(self) -> None:
        for key in self.raw:
            if key not in self.consumed:
                if self.section:
                    raise self.error(
                        key,
                        f"unknown key; expected one of {', '.join(self.consumed)}" + did_you_mean(key, self.consumed),
                        show_got=False,
                    )
                raise ConfigError(
                    self.source,
                    f"[{key}]",
                    f"unknown table; expected one of {', '.join(TABLES)}" + did_you_mean(key, TABLES),
                )


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return shown(value)
