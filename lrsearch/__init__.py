"""lrsearch: learning-rate, momentum, schedule and optimizer search with tracking.

The public API is re-exported here lazily, so ``import lrsearch`` (and ``lrsearch --help``)
does not import torch, Lightning or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "lrsearch.config",
    "load_config": "lrsearch.config",
    "parse_config": "lrsearch.config",
    "ConfigError": "lrsearch.errors",
    "LrsearchError": "lrsearch.errors",
    "UsageError": "lrsearch.errors",
    "TrackingError": "lrsearch.errors",
    "sample_params": "lrsearch.space",
    "run_study": "lrsearch.launch",
    "StudyRun": "lrsearch.launch",
    "load_study": "lrsearch.results",
    "best_trials": "lrsearch.results",
    "ranking": "lrsearch.results",
    "write_report": "lrsearch.report",
    "open_session": "lrsearch.session",
    "work": "lrsearch.worker",
    "ResultsDatabase": "lrsearch.queries",
    "train": "lrsearch.training",
    "load_data": "lrsearch.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lrsearch' has no attribute {name!r}")
