"""The folders lrsearch writes to: a study's reports, an embedded store's artifacts."""

from __future__ import annotations

from pathlib import Path

from lrsearch.core.errors import LrsearchError
from lrsearch.store.urls import data_dir, pg_parts, sqlite_path


def make_folder(folder: Path) -> None:
    """``mkdir -p``, failing in one line that names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LrsearchError(f"cannot create the folder {folder}: {e.strerror}") from e


def folder_name(name: str) -> str:
    """A study name as one safe path component (names lrsearch creates already are one;
    studies made by other tools may be called anything)."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")[:100]
    return slug or "_"


def report_dir(url: str, name: str) -> Path:
    """Where ``lrsearch report`` writes a study's files: beside an SQLite store, in
    ``reports/NAME``; for a PostgreSQL study, in ``LRSEARCH_DATA/reports/<host>-<port>-<db>/NAME``,
    so studies of the same name in two stores never share a folder."""
    path = sqlite_path(url)
    if path is not None:
        return path.resolve().parent / "reports" / folder_name(name)

    parsed = pg_parts(url)
    store = folder_name(f"{parsed.host or 'localhost'}-{parsed.port or 5432}-{parsed.database or ''}")
    return data_dir() / "reports" / store / folder_name(name)


def artifact_root(tracking: str) -> str | None:
    """Where an embedded (SQLite) tracking store keeps artifacts: beside its file.

    None for a tracking server, which decides (``mlflow-artifacts:/`` when it serves them).
    """
    path = sqlite_path(tracking)
    return (path.parent / "artifacts").resolve().as_uri() if path is not None else None
