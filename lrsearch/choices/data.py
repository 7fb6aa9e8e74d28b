"""Datasets as whole tensors: a seeded train/validation split, no per-sample loaders."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.choices.csv_file import _CsvFile, _shown, _unreadable
from lrsearch.choices.source_table import Origin, _digest, _Table
from lrsearch.core.constraints import MAX_SEED, Interval, Satisfies, declared, int_in
from lrsearch.core.errors import UsageError
from lrsearch.core.registry import Registry
from lrsearch.core.text import count

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Dataset:
    """Train and validation tensors (float32 features, scaled as ``[data].scale`` says;
    int64 class indices), and what a model trained on them needs to take raw rows and give
    the data's own labels: the feature columns' names, the label of each class index, the
    scaling (``mean``/``std`` of the training rows, None when unscaled)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    features: tuple[str, ...] = ()
    classes: tuple[Any, ...] = ()  # class index -> the data's label value
    label: str = "label"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    origin: Origin | None = None
    example: tuple[tuple[float, ...], ...] = ()  # a few training rows, raw: a model's input example
    # The training and validation rows as MLflow's datasets record them (see inputs()).
    digests: tuple[str, str] = ("", "")

    @functools.cached_property
    def inputs(self) -> list[dict[str, Any]]:
        """The training and validation data as MLflow records a run's datasets
        (``mlflow.log_input``): name, digest (of the rows: the content's digest and the split),
        source, schema (the features and the label), profile (rows, features, classes), and
        the context, ``training`` or ``validation``. Plain values: tracking.py makes MLflow's."""
        if self.origin is None:
            return []
        label_type = column_type(self.classes[0] if self.classes else "")
        schema = json.dumps(
            {
                "mlflow_colspec": [
                    *({"type": "double", "name": f, "required": True} for f in self.features),
                    {"type": label_type, "name": self.label, "required": True},
                ]
            }
        )
        return [
            {
                "name": self.origin.name,
                "digest": digest,
                "source_type": self.origin.source_type,
                "source": self.origin.source,
                "schema": schema,
                "context": context,
                "profile": json.dumps(
                    {"num_rows": len(y), "num_features": self.n_features, "num_classes": self.n_classes}
                ),
            }
            for context, digest, y in (
                ("training", self.digests[0], self.y_train),
                ("validation", self.digests[1], self.y_val),
            )
        ]

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_data(cfg: DataConfig) -> Dataset:
    """Build the dataset the ``[data]`` table describes, split it with ``cfg.seed`` and
    scale it as ``cfg.scale`` says (fitted on the training rows only)."""
    import numpy as np
    import torch

    table = _split(cfg)
    x, train, val = table.x, table.train, table.val
    mean = std = None
    if scale_of(cfg) == "standard":
        fitted = x[train].astype(np.float64)
        mean = fitted.mean(axis=0)
        std = fitted.std(axis=0)
        std[std == 0] = 1.0  # a constant column stays constant (0), not NaN
        x = ((x - mean) / std).astype(np.float32)
    xt, yt = torch.as_tensor(x), torch.as_tensor(table.y)
    return Dataset(
        xt[train],
        yt[train],
        xt[val],
        yt[val],
        len(table.classes),
        table.features,
        table.classes,
        table.label,
        None if mean is None else tuple(mean.tolist()),
        None if std is None else tuple(std.tolist()),
        table.origin,
        tuple(map(tuple, table.x[train[:5]].astype(np.float64).tolist())),
        (
            _digest(f"{table.origin.digest} {scale_of(cfg)} ".encode() + train.tobytes()),
            _digest(f"{table.origin.digest} {scale_of(cfg)} ".encode() + val.tobytes()),
        ),
    )


def column_type(label: Any) -> str:
    """The type of a label column whose values are like ``label``, as MLflow's schemas name it."""
    return {int: "long", float: "double"}.get(type(label), "string")


def scale_of(cfg: DataConfig) -> str:
    """``[data].scale``, or its default (which the study file's reader resolves): ``standard``
    for a CSV file, ``none`` for a built-in source (scaled by design, and the classic
    experiments did not scale)."""
    return cfg.scale or SOURCES[cfg.source].scale


def check_data(cfg: DataConfig) -> None:
    """The data's mistakes (a CSV file's, a split that leaves no rows), found without torch
    and without generating a built-in source's data: what ``validate``, ``submit`` (so
    ``run``) and ``lr-find`` check before opening any store. A CSV file is read here, once:
    ``load_data`` in this process then reuses its arrays."""
    source = SOURCES[cfg.source]
    _check_split(cfg, len(source.load(cfg).x) if source.rows is None else source.rows(cfg))


def _check_split(cfg: DataConfig, rows: int) -> int:
    """The validation rows of ``rows``; :class:`UsageError` if either side would be empty."""
    n_val = int(round(rows * cfg.val_fraction))
    if n_val < 1 or n_val >= rows:
        if cfg.path is not None:
            raise UsageError(
                f"{_shown(cfg.path)}: {count(rows, 'data row')}, too few for [data].val_fraction = "
                f"{cfg.val_fraction} (it leaves none for training or validation)"
            )
        raise UsageError(
            f"[data].val_fraction: {cfg.val_fraction} leaves no rows for training or validation out of {rows}"
        )
    return n_val


def _split(cfg: DataConfig) -> _Table:
    """The source's table, with its training and validation rows."""
    import numpy as np

    table = SOURCES[cfg.source].load(cfg)
    n_val = _check_split(cfg, len(table.x))
    order = np.random.default_rng(cfg.seed).permutation(len(table.x))
    return dataclasses.replace(table, train=order[: len(table.x) - n_val], val=order[len(table.x) - n_val :])


def _generated(cfg: DataConfig, x: np.ndarray, y: np.ndarray, generator: str) -> _Table:
    """A built-in source's table: features ``x0``, ``x1``…, label ``label``, the classes its
    labels (integers), its digest that of its settings."""
    import numpy as np

    classes, codes = np.unique(y, return_inverse=True)
    settings = {k: getattr(cfg, k) for k in SOURCES[cfg.source].keys}
    source = json.dumps({"generator": generator, "settings": settings}, sort_keys=True)
    return _Table(
        np.asarray(x, dtype=np.float32),
        codes.astype(np.int64),
        tuple(classes.tolist()),
        tuple(f"x{i}" for i in range(x.shape[1])),
        "label",
        Origin(cfg.source, _digest(source.encode()), "code", source),
    )


def _blobs(cfg: DataConfig) -> _Table:
    from sklearn.datasets import make_blobs

    x, y = make_blobs(
        n_samples=cfg.n_samples,
        centers=cfg.centers,
        n_features=cfg.n_features,
        cluster_std=cfg.cluster_std,
        random_state=cfg.random_state,
    )
    return _generated(cfg, x, y, "sklearn.datasets.make_blobs")


def _moons(cfg: DataConfig) -> _Table:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=cfg.n_samples, noise=cfg.noise, random_state=cfg.random_state)
    return _generated(cfg, x, y, "sklearn.datasets.make_moons")


def _digits(cfg: DataConfig) -> _Table:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    return _generated(cfg, x / 16.0, y, "sklearn.datasets.load_digits")  # pixels are 0..16


def _csv(cfg: DataConfig) -> _Table:
    """The file's features (float32) and class indices (its labels in sorted order), from the
    last parse in this process while the file's size and modification time are unchanged:
    ``run`` checks it (``submit``) and then trains on it (the worker's session), and a
    million rows take seconds to parse. Nobody writes to these arrays (the split copies)."""
    assert cfg.path is not None and cfg.label is not None  # checked by config
    try:
        stat = cfg.path.stat()
    except OSError as e:
        raise _unreadable(cfg.path, e) from None
    return _parsed(cfg.path, stat.st_size, stat.st_mtime_ns, cfg.label)


@functools.lru_cache(maxsize=1)  # one file's arrays at most: a large file's take gigabytes
def _parsed(path: Path, size: int, mtime_ns: int, label: str) -> _Table:
    """The file read, once per key: ``size`` and ``mtime_ns`` are there to tell a changed file."""
    # lru_cache would keep the previous file's arrays until this returns: they go before the
    # next one's are built (and a file that fails leaves none behind).
    _parsed.cache_clear()
    return _CsvFile(path).read(label)


@dataclass(frozen=True)
class Source:
    name: str
    doc: str
    load: Callable[[DataConfig], _Table]
    keys: tuple[str, ...] = ()  # the [data] keys it reads, besides val_fraction, seed and scale
    rows: Callable[[DataConfig], int] | None = None  # how many rows, without making them (None: load it)
    scale: str = "none"  # [data].scale's default


SOURCES: Registry[Source] = Registry(
    "data source",
    [
        Source(
            "blobs",
            "scikit-learn's make_blobs: Gaussian clusters (the classic problem)",
            _blobs,
            ("n_samples", "centers", "n_features", "cluster_std", "random_state"),
            lambda cfg: cfg.n_samples,
        ),
        Source(
            "moons",
            "scikit-learn's make_moons: two interleaving half circles",
            _moons,
            ("n_samples", "noise", "random_state"),
            lambda cfg: cfg.n_samples,
        ),
        Source(
            "digits",
            "scikit-learn's 8x8 digits (shipped with it), pixels scaled to [0, 1]",
            _digits,
            rows=lambda cfg: 1797,
        ),
        Source(
            "csv",
            "a UTF-8 CSV file with a header line: `path` (relative to the study file), `label` the "
            "class column, the other columns features (finite numbers, standardized unless `scale = "
            '"none"`)',
            _csv,
            ("path", "label"),
            scale="standard",
        ),
    ],
)


# The [data] section of a study file, beside the sources it names (config/ reads it).
SCALES = ("standard", "none")
MAX_SAMPLES, MAX_FEATURES, MAX_CENTERS = 1_000_000, 1_000, 1_000
MAX_VALUES = 20_000_000  # n_samples x n_features: 160 MB as scikit-learn's float64


@dataclass(frozen=True)
class DataConfig:
    source: str = declared(str, "blobs", choices=SOURCES)
    val_fraction: float = declared(float, 0.5, Interval(float, 0, 1, closed="neither"))
    seed: int = int_in(0, MAX_SEED, 0)  # the train/validation split
    n_samples: int = int_in(4, MAX_SAMPLES, 1000)
    centers: int = int_in(2, MAX_CENTERS, 3)
    n_features: int = int_in(1, MAX_FEATURES, 2)
    cluster_std: float = declared(float, 2.0, Interval(float, 0, None, closed="neither"))
    noise: float = declared(float, 0.2, Interval(float, 0, None))
    random_state: int = int_in(0, MAX_SEED, 2)
    path: Path | None = declared(str, None, Satisfies("a file path", lambda v: bool(v.strip())))
    label: str | None = declared(str, None, Satisfies("a column name", lambda v: bool(v.strip())))
    # Features standardized with the training rows' mean and standard deviation (scikit-learn's
    # StandardScaler), the scaling kept inside the registered model.
    scale: str | None = declared(str, None, choices=SCALES, unset='"standard" for source "csv", else "none"')
