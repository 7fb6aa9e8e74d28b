"""Store and tracking URLs, one home for every rule about them: where the embedded stores
live, the PostgreSQL driver and schema rewrites, passwords kept out of messages, the
credentials a tracking server's URI carries, and how a bind address is shown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DATA_DIR_ENV = "LRSEARCH_DATA"
STORAGE_ENV = "LRSEARCH_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DATA_DIR = "lrsearch-data"


def data_dir() -> Path:
    """The embedded store's folder: ``$LRSEARCH_DATA`` or ``./lrsearch-data``, absolute."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).resolve()


def storage_url(url: str | None = None) -> str:
    """The Optuna storage URL as given: ``url``, ``$LRSEARCH_STORAGE`` or the embedded
    SQLite file. A plain PostgreSQL URL is fine: ``open_storage`` adds the schema."""
    return url or os.environ.get(STORAGE_ENV) or f"sqlite:///{data_dir() / 'optuna.db'}"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri``, ``$MLFLOW_TRACKING_URI`` or the embedded SQLite file."""
    return uri or os.environ.get(TRACKING_ENV) or f"sqlite:///{data_dir() / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///") :].split("?", 1)[0])


def with_user(url: str, user: str | None = None) -> str:
    """A database URL without its password (libpq then reads ``PGPASSWORD``), for ``user``
    if given. (``URL.set`` cannot clear a field: it skips None.)"""
    parsed = pg_parts(url)
    return parsed._replace(username=user or parsed.username, password=None).render_as_string(hide_password=False)


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


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres://"))


def pg_url(url: str) -> str:
    """``url`` with the psycopg 3 driver spelled out (``postgresql://`` maps to it anyway)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """A PostgreSQL URL as libpq reads it: ``postgresql://`` (no driver), its query kept but
    SQLAlchemy's ``options`` (the search path is set per connection). Parsed without
    SQLAlchemy: the commands that only read or queue skip its import."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "options"])
    return urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))


def schema_url(url: str, schema: str) -> str:
    """The URL whose connections put ``schema`` first on the search path, so Optuna's and
    MLflow's tables (both have an ``alembic_version``) live apart in one database."""
    parsed = pg_parts(url)
    if "options" in parsed.query:
        return parsed.render_as_string(hide_password=False)  # the user chose the search path
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def credentials(uri: str) -> tuple[str | None, str | None]:
    """The login a client sends: ``user:password@`` in the URI, else MLflow's variables."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is not None:
        return unquote(parts.username), unquote(parts.password) if parts.password is not None else None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return (user, os.environ.get("MLFLOW_TRACKING_PASSWORD")) if user else (None, None)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def without_credentials(uri: str) -> str:
    """``http://user:secret@host:5000`` -> ``http://host:5000``."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    return f"{scheme}://{rest.split('@', 1)[1]}"


def pg_parts(url: str) -> URL:
    """A PostgreSQL URL parsed (SQLAlchemy's ``URL``), with the psycopg 3 driver spelled out."""
    from sqlalchemy.engine import make_url

    return make_url(pg_url(url))


def shown_host(host: str) -> str:
    """A bind address as a browser reaches it: every interface (``0.0.0.0``, ``::``) is
    ``localhost`` from this machine."""
    return "localhost" if host in ("0.0.0.0", "::") else host
