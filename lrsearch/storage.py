"""Where results live: the embedded SQLite defaults, storage URLs and how to open them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lrsearch.errors import LrsearchError, UsageError, first_line

DATA_DIR_ENV = "LRSEARCH_DATA"
STORAGE_ENV = "LRSEARCH_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DATA_DIR = "lrsearch-data"
# How long an SQLite writer waits for a lock before "database is locked".
SQLITE_TIMEOUT_S = 60


def data_dir() -> Path:
    """The embedded store's folder: ``$LRSEARCH_DATA`` or ``./lrsearch-data``, absolute."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).resolve()


def storage_url(url: str | None = None) -> str:
    """The Optuna storage URL: ``url``, ``$LRSEARCH_STORAGE`` or the embedded SQLite file."""
    return url or os.environ.get(STORAGE_ENV) or f"sqlite:///{data_dir() / 'optuna.db'}"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri``, ``$MLFLOW_TRACKING_URI`` or the embedded SQLite file."""
    return uri or os.environ.get(TRACKING_ENV) or f"sqlite:///{data_dir() / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for tags and messages."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # an http URI with credentials
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def open_storage(url: str, *, create: bool = True) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url``.

    With ``create=False`` a missing SQLite file is an error instead of a new empty store.
    """
    import optuna

    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise UsageError(f"no lrsearch store at {path} (run a study first, or pass --storage)")
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # Optuna sets it only for MySQL
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (ArgumentError, NoSuchModuleError, ValueError) as e:  # not a database URL
        raise UsageError(f"bad storage URL {redact(url)}: {first_line(e)}") from e
    except Exception as e:  # server down, wrong credentials, unreadable file
        raise LrsearchError(f"cannot open storage {redact(url)}: {first_line(e)}") from e



def artifact_root(tracking: str) -> str | None:
    """Where an embedded (SQLite) tracking store keeps artifacts: beside its file.

    None for a tracking server, which decides (``mlflow-artifacts:/`` when it serves them).
    """
    path = sqlite_path(tracking)
    return (path.parent / "artifacts").resolve().as_uri() if path is not None else None
