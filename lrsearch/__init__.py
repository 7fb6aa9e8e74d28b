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
    "ConfigError": "lrsearch.core.errors",
    "LrsearchError": "lrsearch.core.errors",
    "UsageError": "lrsearch.core.errors",
    "TrackingError": "lrsearch.core.errors",
    "sample_params": "lrsearch.choices.space",
    "run_study": "lrsearch.service.launch",
    "StudyRun": "lrsearch.service.launch",
    "load_study": "lrsearch.results.ranking",
    "best_trials": "lrsearch.results.ranking",
    "ranking": "lrsearch.results.ranking",
    "write_report": "lrsearch.results.report",
    "open_session": "lrsearch.service.session",
    "work": "lrsearch.service.worker",
    "ResultsDatabase": "lrsearch.sql.queries",
    "train": "lrsearch.fit.training",
    "load_data": "lrsearch.choices.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lrsearch' has no attribute {name!r}")
