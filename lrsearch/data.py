"""Datasets as whole tensors: a seeded train/validation split, no per-sample loaders."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lrsearch.errors import UsageError
from lrsearch.registry import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch

    from lrsearch.config import DataConfig


@dataclass(frozen=True)
class Dataset:
    """Train and validation tensors (float32 features, int64 class indices)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_data(cfg: DataConfig) -> Dataset:
    """Build the dataset the ``[data]`` table describes and split it with ``cfg.seed``."""
    import torch

    x, y, n_classes, train, val = _split(cfg)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    return Dataset(xt[train], yt[train], xt[val], yt[val], n_classes)


def check_data(cfg: DataConfig) -> None:
    """The data's mistakes (a CSV file's, a split that leaves no rows), found without torch
    and without generating a built-in source's data: what ``submit`` checks before creating
    anything."""
    source = SOURCES[cfg.source]
    if source.rows is None:
        _split(cfg)
    else:
        _check_split(cfg, source.rows(cfg))


def _check_split(cfg: DataConfig, rows: int) -> int:
    """The validation rows of ``rows``; :class:`UsageError` if either side would be empty."""
    n_val = int(round(rows * cfg.val_fraction))
    if n_val < 1 or n_val >= rows:
        raise UsageError(f"[data].val_fraction: {cfg.val_fraction} leaves no rows for training "
                         f"or validation out of {rows}")
    return n_val


def _split(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """Features (float32), class indices (int64), the number of classes, and the training
    and validation rows."""
    import numpy as np

    x, y = SOURCES[cfg.source].load(cfg)
    classes, y = np.unique(y, return_inverse=True)
    n_val = _check_split(cfg, len(x))
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    train, val = order[: len(x) - n_val], order[len(x) - n_val:]
    return np.asarray(x, dtype=np.float32), y.astype(np.int64), len(classes), train, val


def _blobs(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=cfg.n_samples, centers=cfg.centers, n_features=cfg.n_features,
                      cluster_std=cfg.cluster_std, random_state=cfg.random_state)


def _moons(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=cfg.n_samples, noise=cfg.noise, random_state=cfg.random_state)


def _digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    return x / 16.0, y  # pixels are 0..16


def _csv(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    assert cfg.path is not None and cfg.label is not None  # checked by config
    where = f"{cfg.path}"
    with cfg.path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"{where}: no data rows")
    columns = list(rows[0])
    if cfg.label not in columns:
        raise UsageError(f"{where}: no column {cfg.label!r} (columns: {', '.join(columns)})")
    features = [c for c in columns if c != cfg.label]
    if not features:
        raise UsageError(f"{where}: no feature column besides {cfg.label!r}")
    try:
        x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: feature columns must be numeric ({e})") from None
    y = np.array([r[cfg.label] for r in rows])
    if len(np.unique(y)) < 2:
        raise UsageError(f"{where}: column {cfg.label!r} has fewer than 2 classes")
    return x, y


@dataclass(frozen=True)
class Source:
    name: str
    doc: str
    load: Callable[[DataConfig], tuple[np.ndarray, np.ndarray]]
    keys: tuple[str, ...] = ()  # the [data] keys it reads, besides val_fraction and seed
    rows: Callable[[DataConfig], int] | None = None  # how many rows, without making them (None: load it)


SOURCES: Registry[Source] = Registry("data source", [
    Source("blobs", "scikit-learn's make_blobs: Gaussian clusters (the classic problem)", _blobs,
           ("n_samples", "centers", "n_features", "cluster_std", "random_state"), lambda cfg: cfg.n_samples),
    Source("moons", "scikit-learn's make_moons: two interleaving half circles", _moons,
           ("n_samples", "noise", "random_state"), lambda cfg: cfg.n_samples),
    Source("digits", "scikit-learn's 8x8 digits (shipped with it), pixels scaled to [0, 1]", _digits,
           rows=lambda cfg: 1797),
    Source("csv", "a CSV file: `path` (relative to the study file), `label` the class column, "
                  "the other columns numeric features", _csv, ("path", "label")),
])
