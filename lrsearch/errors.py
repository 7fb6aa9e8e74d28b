"""Exceptions that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class LrsearchError(Exception):
    """A failure lrsearch can explain in one line (exit code 1)."""

    exit_code = 1


class UsageError(LrsearchError):
    """Bad input from the user: a study file, an option, a name (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A mistake in a study file, reported as ``FILE: KEY: expected …, got …``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


class TrackingError(LrsearchError):
    """The MLflow tracking store could not be reached or refused a call."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (drivers append SQL and hints below it)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
