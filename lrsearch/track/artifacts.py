"""A run's artifacts on their way to MLflow: the scratch folder they are gathered in before
upload, and where an experiment's artifacts go (an embedded store's: beside
its file; a tracking server decides for its own)."""

from __future__ import annotations

import tempfile

from lrsearch.store.folders import artifact_root, folder_name


def artifact_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch folder for a run's artifacts before upload."""
    return tempfile.TemporaryDirectory(prefix="lrsearch-")


def _experiment_artifacts(uri: str, name: str) -> str | None:
    root = artifact_root(uri)
    return None if root is None else f"{root}/{folder_name(name)}"
