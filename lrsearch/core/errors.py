"""Exceptions that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

# How lrsearch's own lines start on stderr (the CLI writes them).
ERROR_PREFIX = "lrsearch: error: "
WARNING_PREFIX = "lrsearch: warning: "


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


def shown(value: object, limit: int = 60) -> str:
    """A value the user gave, quoted for a message and cut to ``limit`` characters (a
    1,500-character name echoed whole buries the message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unknown_study(name: str, where: str, known: list[str]) -> UsageError:
    """``no study named NAME in WHERE (studies: …)``: the name cut to a readable length, and
    at most ten of the studies that do exist."""
    listed = ", ".join(sorted(known)[:10]) + (f", … ({len(known)} in all)" if len(known) > 10 else "")
    return UsageError(f"no study named {shown(name)} in {where} (studies: {listed or 'none'})")
