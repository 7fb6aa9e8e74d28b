"""Waiting out a lost connection: which failures are worth repeating, and for how long.

A call that fails because the database (or the MLflow server) could not be reached is
repeated with backoff for up to ``LRSEARCH_OUTAGE_S`` seconds (60 by default); any other
failure is raised at once. Repeating is only safe for calls whose second run cannot
duplicate the first, so each call is either idempotent or made so here:

- reads, and writes that set a value (params, attributes, intermediate values,
  heartbeats): repeating them writes the same row again;
- creating a trial: each new trial carries a token; before trying again, the study is
  searched for it, so a trial whose INSERT committed before its connection dropped is
  found instead of created twice;
- changing a trial's state (tell, or taking a queued trial): before trying again, the
  trial is read; if it already has the state (and values) asked for, the earlier try
  committed.

``retrying_storage.py`` applies this to Optuna's storage; the tracker (``tracking.py``)
to MLflow's calls, making ``create_run`` safe with a token the same way.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lrsearch.core.errors import LrsearchError, first_line

OUTAGE_ENV = "LRSEARCH_OUTAGE_S"
DEFAULT_OUTAGE_S = 60.0
_FIRST_DELAY_S, MAX_RETRY_DELAY_S = 0.1, 5.0
# SQLSTATEs of a lost or refused connection, an administrator's shutdown, a server starting
# up, a transaction rolled back for a deadlock or a serialization conflict, and a session
# ended for idling inside a transaction (a process paused mid-transaction: postgres.py).
_TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "40001", "40P01", "25P03"}
_TRANSIENT_MLFLOW_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

T = TypeVar("T")


class Unreachable(LrsearchError):
    """The database or tracking server did not answer for the whole outage window."""

    def __init__(self, what: str, reason: str, window: float, hint: str = "") -> None:
        self.what = what
        super().__init__(
            f"{what} is unreachable ({reason}; retried for {window:g} s, {OUTAGE_ENV} to wait longer){hint}"
        )


def outage_window() -> float:
    """Seconds a call is repeated before giving up (``$LRSEARCH_OUTAGE_S``, default 60)."""
    return float(os.environ.get(OUTAGE_ENV) or DEFAULT_OUTAGE_S)


def transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the other side could not be
    reached, rather than that the request itself was wrong."""
    for e in _chain(error):
        if getattr(e, "connection_invalidated", False):  # SQLAlchemy saw the connection die
            return True
        name = type(e).__name__
        module = type(e).__module__
        if module.startswith("psycopg") and isinstance(e, _psycopg_errors()):
            state = getattr(e, "sqlstate", None)
            return state is None or state.startswith("08") or state in _TRANSIENT_SQLSTATES
        if module.startswith("sqlalchemy") and name in ("DisconnectionError",):
            return True
        if module.startswith(("requests", "urllib3")) and name.endswith(
            ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ProtocolError")
        ):
            return True
        if name in ("MlflowException", "RestException"):
            code = getattr(e, "error_code", "")
            message = str(e)  # the client's own wording when no HTTP response came back
            no_answer = message.startswith("API request to") and "failed with" in message and "exception" in message
            if code in _TRANSIENT_MLFLOW_CODES or no_answer:
                return True
    return False


def reason(error: BaseException) -> str:
    """The driver's own words for why a connection failed, without its class name or the
    SQL (``connection refused``, ``terminating connection due to administrator command``)."""
    for e in _chain(error):
        if type(e).__module__.startswith(("psycopg", "sqlite3", "requests", "urllib3")):
            text = first_line(e).strip()
            timeout = _READ_TIMEOUT.search(text)  # requests: a server that took the request and never answered
            if timeout:
                return f"no answer within {timeout.group(1)} s"
            errno = _ERRNO.search(text)  # requests: the OS's words, deep in a wrapped message
            tail = (
                errno.group(1) if errno else text.rsplit(": ", 1)[-1] if text.startswith("connection failed") else text
            )
            return tail if tail[1:2].isupper() else tail[:1].lower() + tail[1:]  # not "hTTPConnection…"
    return first_line(error)


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")
_READ_TIMEOUT = re.compile(r"Read timed out\. \(read timeout=([\d.]+)\)")


def _no_stop() -> None:
    pass


class Retry:
    """Repeats a call while it fails for want of a connection, with exponential backoff
    (0.1 s doubling to 5 s, jittered), for up to ``window`` seconds; then raises
    :class:`Unreachable` naming ``what``.

    After a call has given up, the next one is tried once only until one succeeds, so a
    server gone for good costs one window, not one per call. ``last_failure`` is when a
    call last failed (``time.monotonic()``), for callers that must let an outage settle.
    """

    def __init__(
        self, what: str, *, window: float | None = None, hint: str = "", check_stop: Callable[[], None] | None = None
    ) -> None:
        self.what = what
        self.window = outage_window() if window is None else window
        self.hint = hint
        self.check_stop = check_stop or _no_stop  # raises when the process was asked to stop: no more waiting
        self.last_failure: float | None = None
        self._given_up = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a study on this storage may go to a process pool, as Optuna's own RDB
        storage may): the lock and a caller's stop check are this process's."""
        state = self.__dict__.copy()
        del state["_lock"], state["check_stop"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self.check_stop = _no_stop

    def call(self, fn: Callable[..., T], *args: Any, recover: Callable[[], T | None] | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, repeated while it fails transiently. Before each repeat,
        ``recover()`` may return the result of an earlier try that committed after all."""
        deadline: float | None = None
        delay = _FIRST_DELAY_S
        tried = False
        while True:
            try:
                if tried and recover is not None:
                    found = recover()
                    if found is not None:
                        return found
                tried = True
                result = fn(*args, **kwargs)
            except Exception as e:
                if not transient(e):
                    raise
                now = time.monotonic()
                with self._lock:
                    self.last_failure = now
                    window = 0.0 if self._given_up else self.window
                deadline = now + window if deadline is None else deadline
                if now >= deadline:
                    with self._lock:
                        self._given_up = True
                    raise Unreachable(self.what, reason(e), self.window, self.hint) from e
                self.check_stop()
                time.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            with self._lock:
                self._given_up = False
            return result

    def once(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` tried once, for a call that repeats on its own (a heartbeat): a
        failure for want of a connection is raised, and noted for :meth:`quiet_for`."""
        try:
            result = fn(*args)
        except Exception as e:
            if transient(e):
                with self._lock:
                    self.last_failure = time.monotonic()
            raise
        with self._lock:
            self._given_up = False  # reachable again: the next call gets the whole window
        return result

    def quiet_for(self, seconds: float) -> bool:
        """Whether no call has failed for want of a connection in the last ``seconds``."""
        with self._lock:
            return self.last_failure is None or time.monotonic() - self.last_failure >= seconds


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        stack.extend(x for x in (getattr(e, "orig", None), e.__cause__, e.__context__) if isinstance(x, BaseException))
    return seen


def _psycopg_errors() -> tuple[type, ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)
