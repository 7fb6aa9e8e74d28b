"""The documentation's tables of hyperparameters, choices and study states (in ``docs/``),
generated from the registries and ``phase.py``.

    python -m lrsearch.results.docs [PAGE.md ...]   rewrite the tables in place (default: every page of docs/)
    python -m lrsearch.results.docs --check         exit 1 if one is out of date (CI runs this)

A table sits between ``<!-- lrsearch.docs: NAME -->`` and ``<!-- /lrsearch.docs -->``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from lrsearch.choices.accelerators import ACCELERATORS
from lrsearch.choices.data import SOURCES, Source
from lrsearch.choices.network import ACTIVATIONS, INITS
from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.choices.sampling import PRUNERS, SAMPLERS
from lrsearch.choices.schedules import SCHEDULES
from lrsearch.choices.space import _OWNERS, HYPERPARAMETERS, Hyperparameter
from lrsearch.config import DataConfig
from lrsearch.core.registry import Entry, Registry

_BLOCK = re.compile(r"(<!-- lrsearch\.docs: (\w+) -->\n).*?(<!-- /lrsearch\.docs -->)", re.S)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str):
        return f"`{v}`"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _owners(hp: Hyperparameter) -> list[Any]:
    return [e for e in _OWNERS[hp.owner] if hp.name in e.options] if hp.owner else []


def _applies(hp: Hyperparameter) -> str:
    if hp.owner is None:
        return "always"
    text = f"{hp.owner} is " + " or ".join(f"`{e.name}`" for e in _owners(hp))
    return text + (f", {hp.requires[2]}" if hp.requires else "")


def _default(hp: Hyperparameter) -> str:
    if hp.name == "lr":
        return "the optimizer's usual one: " + ", ".join(f"{o.name} {o.default_lr:g}" for o in OPTIMIZERS)
    if hp.owner is None:
        return _value(hp.default)
    defaults = {e.name: e.options[hp.name] for e in _owners(hp)}
    shown = {repr(v) if not isinstance(v, (bool, float, int, str)) else _value(v) for v in defaults.values()}
    if len(shown) == 1:
        return shown.pop()
    return "; ".join(
        f"{name}: {_value(v) if isinstance(v, (bool, float, int, str)) else repr(v)}" for name, v in defaults.items()
    )


def hyperparameters() -> str:
    """The ``[params]`` table: every hyperparameter, when it applies, its values and default."""
    from lrsearch.choices.population import role

    lines = ["| name | applies when | values | default | meaning | with sampler `pbt` |", "|---|---|---|---|---|---|"]
    for hp in HYPERPARAMETERS.values():
        values = ", ".join(_value(c) for c in hp.choices) if hp.choices else hp.expected
        lines.append(f"| `{hp.name}` | {_applies(hp)} | {values} | {_default(hp)} | {hp.doc} | {role(hp.name)} |")
    return "\n".join(lines)


def choices() -> str:
    """Every name a study file can choose, by key, with its docs line."""
    keys: list[tuple[str, Registry]] = [
        ("[params].optimizer", OPTIMIZERS),
        ("[params].schedule", SCHEDULES),
        ("[study].sampler", SAMPLERS),
        ("[study].pruner", PRUNERS),
        ("[model].activation", ACTIVATIONS),
        ("[model].init", INITS),
        ("[data].source", SOURCES),
        ("[train].accelerator", ACCELERATORS),
    ]
    lines = ["| key | choice | what it is |", "|---|---|---|"]
    for key, registry in keys:
        for entry in registry:
            lines.append(f"| `{key}` | `{entry.name}` | {entry.doc}{_source_keys(entry)} |")
    return "\n".join(lines)


def _source_keys(entry: Entry) -> str:
    """A data source's own keys, with their defaults (none for a required key)."""
    if not isinstance(entry, Source):
        return ""
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    shown = [f"`{k}`" if defaults[k] is None else f"`{k} = {_value(defaults[k]).strip('`')}`" for k in entry.keys]
    return f"; keys: {', '.join(shown)}" if shown else ""


def phases() -> str:
    """A submitted study's states, in the order the rule tests them (``phase.py``)."""
    from lrsearch.core.phase import PHASES

    return "\n".join(["| state | meaning |", "|---|---|", *(f"| `{name}` | {text} |" for name, text in PHASES.items())])


def keys() -> str:
    """Every key of the study file's sections but [params]: its type, default and what it
    must be, read from the dataclass fields that declare them (``core/constraints.py``)."""
    import typing

    from lrsearch.config import Config

    types = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", object: "string or integer"}
    lines = ["| key | type | default | must be |", "|---|---|---|---|"]
    for section, schema in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(schema):
            continue  # source (the file's path) and [params] (the hyperparameters table)
        for f in dataclasses.fields(schema):
            constraint = f.metadata["constraint"]
            default = (
                "required"
                if f.default is dataclasses.MISSING
                else f.metadata["unset"] or "none"
                if f.default is None
                else _value(list(f.default) if isinstance(f.default, tuple) else f.default)
            )
            rule = constraint.expected if constraint is not None else "true or false"
            lines.append(f"| `[{section}].{f.name}` | {types[f.metadata['kind']]} | {default} | {rule} |")
    return "\n".join(lines)


TABLES = {"keys": keys, "hyperparameters": hyperparameters, "choices": choices, "phases": phases}


def render(text: str) -> str:
    """``text`` with every generated table brought up to date."""
    new, blocks = _BLOCK.subn(lambda m: f"{m.group(1)}{TABLES[m.group(2)]()}\n{m.group(3)}", text)
    if blocks != text.count("<!-- lrsearch.docs: "):  # a marker without its end: nothing would be checked
        raise ValueError("a generated table's <!-- lrsearch.docs: NAME --> has no <!-- /lrsearch.docs --> after it")
    return new


DOCS = Path(__file__).resolve().parents[2] / "docs"  # in a checkout: the site's pages


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(DOCS.glob("*.md"))
    stale = []
    for path in paths:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    for path in stale if check else []:
        print(f"{path}: generated tables are out of date; run python -m lrsearch.results.docs", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
