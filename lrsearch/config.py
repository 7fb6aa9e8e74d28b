"""Study files: TOML in, frozen validated objects out.

Every key is checked once, here, against a declared constraint, and every mistake is
reported with one template: ``FILE: [section].key: expected …, got …``. Nothing is
created before a file has passed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from lrsearch.choices.data import MAX_SAMPLES, MAX_VALUES, SOURCES, DataConfig, scale_of
from lrsearch.choices.network import ModelConfig
from lrsearch.choices.population import PopulationConfig, changeable, interval_for, refusal
from lrsearch.choices.sampling import PRUNERS, SAMPLERS
from lrsearch.choices.space import (
    FIND_FACTOR,
    HYPERPARAMETERS,
    Choices,
    Find,
    Fixed,
    Hyperparameter,
    ParamSpec,
    Range,
    resolve_find,
)
from lrsearch.core.constraints import MAX_SEED, POSITIVE, Interval, Satisfies, declared, int_in
from lrsearch.core.errors import ConfigError, UsageError, shown
from lrsearch.core.registry import did_you_mean

DIRECTIONS = ("maximize", "minimize")
METRICS = ("val/acc", "val/loss", "train/acc", "train/loss")
DEFAULT_TRIALS = 20
TABLES = ("study", "data", "model", "train", "params", "tracking", "pbt")
# A study's name becomes an MLflow experiment name, a folder name and a URL part: letters,
# digits, '.', '_' and '-', starting with a letter or digit (no '..', no '/').
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_EXPECTED = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Sizes a laptop can hold (a study file may come from someone else).
MAX_TRIALS, MAX_EPOCHS = 100_000, 100_000
MAX_ARRAY = 256  # trials trained at once by one worker (memory caps it lower: training.largest_array)
ARRAY_SIZES = Interval(int, 1, MAX_ARRAY)
# [train] array and --array: "auto", or a size.
ARRAY = Satisfies(f'"auto" or {ARRAY_SIZES.expected}', lambda v: v == "auto" or type(v) is int and ARRAY_SIZES(v))


def check_name(name: str) -> str | None:
    """What is wrong with a study name, or None."""
    if NAME_PATTERN.fullmatch(name):
        return None
    return f"expected {NAME_EXPECTED}, got {shown(name)}"


@dataclass(frozen=True)
class StudyConfig:
    name: str = declared(str, constraint=Satisfies(NAME_EXPECTED, lambda v: check_name(v) is None))
    direction: str = declared(str, "maximize", choices=DIRECTIONS)
    metric: str = declared(str, "val/acc", choices=METRICS)
    trials: int | None = int_in(1, MAX_TRIALS, None, unset=f"{DEFAULT_TRIALS} (a grid study: the grid's size)")
    sampler: str = declared(str, "tpe", choices=SAMPLERS)
    seed: int | None = int_in(0, MAX_SEED, None, unset="none: each run samples anew")
    pruner: str = declared(str, "median", choices=PRUNERS)
    # Epochs between pruning checks; None: see sampling.check_interval.
    prune_every: int | None = declared(int, None, Interval(int, 1, None), unset="epochs / 5, at least 1")
    # Workers serving several studies take a higher priority first, then the oldest submission.
    priority: int = int_in(-1000, 1000, 0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = int_in(1, MAX_EPOCHS, 200)
    batch_size: int = int_in(1, MAX_SAMPLES, 32)
    # Trials a worker trains at once, in one fit (a trial array); "auto": the fastest size
    # per trial, timed by the worker (training.choose_array_size). Not part of the study:
    # each worker may use its own (the CLI's --array), and a resubmission may change it.
    array: int | str = declared(object, "auto", ARRAY)


@dataclass(frozen=True)
class TrackingConfig:
    trial_plots: bool = declared(bool, False)  # a learning-curve PNG per trial (matplotlib, on the tracking thread)
    # The best trial's network as a model in MLflow's registry when the study finishes (and
    # each trial's network.pt, which it is made of).
    register_model: bool = declared(bool, True)


@dataclass(frozen=True)
class Config:
    """A validated study file."""

    source: str
    study: StudyConfig
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    tracking: TrackingConfig = TrackingConfig()
    pbt: PopulationConfig = PopulationConfig()  # read and stored with sampler "pbt" only

    @property
    def population(self) -> bool:
        """Whether the study searches by population-based training (``choices/population.py``)."""
        return self.study.sampler == "pbt"

    def with_overrides(
        self, *, trials: int | None = None, epochs: int | None = None, name: str | None = None
    ) -> Config:
        """This config with the CLI's ``--trials``, ``--epochs`` and ``--name`` applied."""
        if name is not None and (problem := check_name(name)) is not None:
            raise UsageError(f"--name: {problem}")
        if trials is not None and trials > MAX_TRIALS or epochs is not None and epochs > MAX_EPOCHS:
            flag = "--trials" if trials is not None and trials > MAX_TRIALS else "--epochs"
            raise UsageError(f"{flag}: expected at most {MAX_TRIALS if flag == '--trials' else MAX_EPOCHS:,}")
        if self.population and epochs is not None:
            if interval_for(epochs, self.pbt.interval) >= epochs:
                raise UsageError(
                    f"--epochs: expected more than [pbt].interval ({interval_for(epochs, self.pbt.interval)})"
                    " epochs for sampler 'pbt': no member would ever copy another"
                )
        study = dataclasses.replace(self.study, trials=trials or self.study.trials, name=name or self.study.name)
        train = dataclasses.replace(self.train, epochs=epochs or self.train.epochs)
        return dataclasses.replace(self, study=study, train=train)

    @property
    def finds_lr(self) -> bool:
        """``lr = { find = true }``: the range test sets lr's range when the study is created."""
        return isinstance(self.params.get("lr"), Find)

    def with_lr_range(self, low: float, high: float) -> Config:
        """This config with ``lr = { find = true }`` resolved to a log range."""
        return dataclasses.replace(self, params=resolve_find(self.params, low, high))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the config (paths as strings, specs as tables)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        out: dict[str, Any] = {}
        for part in ("study", "data", "model", "train", "tracking", *(("pbt",) if self.population else ())):
            out[part] = {k: plain(v) for k, v in dataclasses.asdict(getattr(self, part)).items()}
        out["params"] = {name: _spec_to_toml(spec) for name, spec in self.params.items()}
        return out

    def to_toml(self) -> dict[str, Any]:
        """The config as a study file's tables (what ``parse_config`` reads back): stored
        with a submitted study, so a worker runs it without the file."""
        other_sources = {k for source in SOURCES if source.name != self.data.source for k in source.keys}
        mine = SOURCES[self.data.source].keys
        return {
            part: (
                {
                    k: v
                    for k, v in table.items()
                    if v is not None and (part != "data" or k in mine or k not in other_sources)
                }
                if part != "params"
                else table
            )
            for part, table in self.to_dict().items()
        }

    def differences(self, other: Config) -> list[str]:
        """The study-file keys whose values differ between this config and ``other``, as
        ``[section].key`` (a whole ``[params].name`` entry counts as one key)."""
        mine, theirs = _flat(self.to_toml()), _flat(other.to_toml())
        return [key for key in dict.fromkeys([*mine, *theirs]) if mine.get(key) != theirs.get(key)]


def to_toml_text(cfg: Config) -> str:
    """The config as a study file (``Config.to_toml``'s tables, which ``parse_config`` reads
    back): the ``study.toml`` a worker logs for a study submitted from another host."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)  # finite: the config refuses inf and nan
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"

    lines = [f"# study {cfg.study.name!r} as it was submitted (lrsearch's stored configuration)"]
    for part, table in cfg.to_toml().items():
        lines += ["", f"[{part}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _flat(tables: Mapping[str, Any]) -> dict[str, Any]:
    return {f"[{part}].{key}": value for part, table in tables.items() for key, value in table.items()}


def stored_config(raw: Mapping[str, Any], name: str) -> Config:
    """A submitted study's configuration, as ``Config.to_toml`` stored it. One stored before
    ``[data].scale`` existed trained on unscaled features: it keeps doing so (``"none"``)."""
    data = raw.get("data")
    if isinstance(data, Mapping) and "scale" not in data:
        raw = {**raw, "data": {**data, "scale": "none"}}
    return parse_config(raw, f"study {name!r} (stored configuration)")


def load_config(path: str | Path) -> Config:
    """Read and validate a study file; raise :class:`ConfigError` on the first mistake."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, expected a TOML study file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            source, "", f"expected UTF-8 text, got byte 0x{e.object[e.start]:02x} at offset {e.start}"
        ) from None
    except OSError as e:
        raise ConfigError(source, "", f"cannot read it: {e.strerror}") from None
    return parse_config(raw, source, base_dir=path.parent)


def parse_config(raw: Mapping[str, Any], source: str, base_dir: Path = Path(".")) -> Config:
    """Validate a parsed study file (a dict as ``tomllib`` returns it)."""
    top = _Table(raw, source, "")
    study_table = top.table("study", required=True)
    study = _study(study_table)
    data = _data(top.table("data"), base_dir)
    model = _model(top.table("model"))
    train = _train(top.table("train"))
    params = _params(top.table("params"), study.sampler)
    tracking = _tracking(top.table("tracking"))
    pbt_table = top.table("pbt")
    pbt = _read(pbt_table, PopulationConfig)
    top.finish()
    if study.sampler == "grid" and not params:
        raise ConfigError(source, "[params]", "expected at least one entry with choices for sampler 'grid'")
    if study.sampler != "pbt" and pbt_table.raw:
        raise ConfigError(source, "[pbt]", f'expected only with [study].sampler = "pbt", got sampler {study.sampler!r}')
    if study.sampler == "pbt":
        if study.pruner != "none" and "pruner" in study_table.raw:
            raise study_table.error(
                "pruner",
                "expected 'none' with sampler 'pbt' (its worst members copy its best: the population prunes itself)",
                study.pruner,
            )
        if study.prune_every is not None:
            raise study_table.error(
                "prune_every",
                "expected no prune_every with sampler 'pbt' (it does not prune: "
                "[pbt].interval says when its members are compared)",
                show_got=False,
            )
        study = dataclasses.replace(study, pruner="none")
        if not changeable(params):
            raise ConfigError(
                source,
                "[params]",
                "expected lr, or momentum or weight_decay for an optimizer that "
                "takes it, as a range { low, high } for sampler 'pbt' (what it "
                "changes as the members train)",
            )
        if pbt.interval is None and train.epochs < 2:
            raise ConfigError(
                source,
                "[train].epochs",
                f"expected at least 2 for sampler 'pbt' (no member would ever copy another), got {train.epochs}",
            )
        if interval_for(train.epochs, pbt.interval) >= train.epochs:
            raise pbt_table.error(
                "interval",
                f"expected fewer epochs than [train].epochs ({train.epochs}): no member would ever copy another",
                pbt.interval,
            )
    return Config(source, study, data, model, train, params, tracking, pbt)


# -- sections -----------------------------------------------------------------------------


def _read(t: _Table, cls: type) -> Any:
    """The section's dataclass, every declared key read, then the table's unknown keys refused."""
    values = {}
    for f in dataclasses.fields(cls):
        default = None if f.default is MISSING else f.default
        value = t.get(
            f.name,
            f.metadata["kind"],
            default,
            required=f.default is MISSING,
            check=f.metadata["constraint"],
            expected=getattr(f.metadata["constraint"], "expected", ""),
        )
        values[f.name] = tuple(value) if isinstance(value, list) else value
    t.finish()
    return cls(**values)


def _study(t: _Table) -> StudyConfig:
    return _read(t, StudyConfig)


def _data(t: _Table, base_dir: Path) -> DataConfig:
    d: DataConfig = _read(t, DataConfig)
    source = SOURCES[d.source]
    for name in dict.fromkeys(k for s in SOURCES for k in s.keys):  # keys of other sources, given here
        if name in t.raw and name not in source.keys:
            users = ", ".join(repr(s.name) for s in SOURCES if name in s.keys)
            raise t.error(name, f"expected only with source {users}, got source {d.source!r}", show_got=False)
    for name in ("path", "label"):
        if name in source.keys and getattr(d, name) is None:
            what = "the CSV file's path" if name == "path" else "the label column's name"
            raise t.error(name, f"expected {what} for source {d.source!r}", show_got=False)
    if d.scale is None:  # its source's default, resolved now: the stored configuration says which
        d = dataclasses.replace(d, scale=scale_of(d))
    if d.n_samples * d.n_features > MAX_VALUES:
        raise t.error(
            "n_samples",
            f"expected n_samples x n_features <= {MAX_VALUES:,} (about 160 MB)",
            f"{d.n_samples:,} x {d.n_features:,}",
            raw=True,
        )
    if d.path is not None:
        path = (base_dir / d.path).resolve()
        if not path.is_file():
            found = "a directory" if path.is_dir() else "no such file"
            raise t.error(
                "path", f"expected an existing CSV file, got {str(d.path)!r} ({found}: {path})", show_got=False
            )
        d = dataclasses.replace(d, path=path)
    return d


def _model(t: _Table) -> ModelConfig:
    return _read(t, ModelConfig)


def _train(t: _Table) -> TrainConfig:
    return _read(t, TrainConfig)


def _tracking(t: _Table) -> TrackingConfig:
    return _read(t, TrackingConfig)


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


_TYPE_NAMES = {
    bool: "true or false",
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "a table",
}


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
