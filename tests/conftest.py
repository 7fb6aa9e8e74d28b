"""Shared fixtures: tiny study files and throwaway SQLite stores in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINY_STUDY = """\
[study]
name = "tiny"
direction = "maximize"
metric = "val/acc"
trials = 3
sampler = "tpe"
seed = 7
pruner = "none"

[train]
epochs = 3
batch_size = 64

[params]
optimizer = { choices = ["sgd", "adam"] }
lr = { low = 1e-3, high = 0.1, log = true }
momentum = { low = 0.0, high = 0.9 }
schedule = "time_decay"
decay = 0.01
"""


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded() -> None:
    import torch

    from lrsearch.training import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()


@pytest.fixture
def write_study(tmp_path: Path):
    """Write a study file from TOML text; returns its path."""

    def write(text: str = TINY_STUDY, name: str = "study.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def stores(tmp_path: Path) -> tuple[str, str]:
    """Optuna storage URL and MLflow tracking URI on fresh SQLite files."""
    return f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def cli(tmp_path: Path):
    """Run ``lrsearch ARGS`` in a subprocess in ``tmp_path`` with the embedded default there."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA")}
        return subprocess.run([sys.executable, "-m", "lrsearch.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run
