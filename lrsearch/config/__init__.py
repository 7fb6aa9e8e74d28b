"""Study files: TOML in, frozen validated objects out.

Every key is checked once, here, against a declared constraint, and every mistake is
reported with one template: ``FILE: [section].key: expected …, got …``. Nothing is
created before a file has passed. ``table.py`` reads a table and words its mistakes,
``params.py`` reads the ``[params]`` entries; this module reads the file and its sections.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tomli_w

from lrsearch.choices.accelerators import ACCELERATORS
from lrsearch.choices.data import MAX_SAMPLES, MAX_VALUES, SOURCES, DataConfig, scale_of
from lrsearch.choices.network import ModelConfig
from lrsearch.choices.population import PopulationConfig, changeable, interval_for
from lrsearch.choices.sampling import PRUNERS, SAMPLERS
from lrsearch.choices.space import Find, ParamSpec, resolve_find
from lrsearch.config.params import _params, _spec_to_toml
from lrsearch.config.table import _Table
from lrsearch.core.constraints import MAX_SEED, Interval, Satisfies, declared, int_in
from lrsearch.core.errors import ConfigError, UsageError, shown

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DIRECTIONS = ("maximize", "minimize")
METRICS = ("val/acc", "val/loss", "train/acc", "train/loss")
DEFAULT_TRIALS = 20
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
    # Lightning's accelerator; like ``array``, how a worker trains, not what the study is
    # (the CLI's --accelerator, per worker; a resubmission may change it).
    accelerator: str = declared(str, "auto", choices=ACCELERATORS)


# Keys that say how a worker trains, not what the study is: a resubmission may change them.
WORKER_KEYS = ("[train].array", "[train].accelerator")


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
    header = f"# study {cfg.study.name!r} as it was submitted (lrsearch's stored configuration)\n\n"
    return header + tomli_w.dumps(cfg.to_toml())


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

Section = TypeVar("Section", bound="DataclassInstance")  # a section's dataclass


def _read(t: _Table, cls: type[Section]) -> Section:
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
