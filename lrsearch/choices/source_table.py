"""A data source's table: its rows before scaling, and where they came from as MLflow's
datasets record it. Each source of ``data.py`` makes one; a CSV file's is read by ``csv_file.py``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Origin:
    """Where a dataset came from, as MLflow's datasets record it: a name, a digest of its
    content (the CSV file's bytes, or a built-in source's settings), and its source (the
    file, or the generator and its settings)."""

    name: str
    digest: str
    source_type: str  # "local" (a file) or "code" (a generator)
    source: str  # JSON


@dataclass(frozen=True)
class _Table:
    """A source's rows before scaling: features (float32), class indices (int64), the label
    of each index, the features' names, the split, and where the rows came from."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[Any, ...]
    features: tuple[str, ...]
    label: str
    origin: Origin
    train: Any = None
    val: Any = None


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:12]
