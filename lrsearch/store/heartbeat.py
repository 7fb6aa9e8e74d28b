"""A running trial's heartbeat: how often it beats, how long a silence means its worker is
gone, and the thread that beats."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lrsearch.store.retrying_storage import RetryingStorage


def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats (``$LRSEARCH_HEARTBEAT_INTERVAL``)."""
    return _seconds("LRSEARCH_HEARTBEAT_INTERVAL", 5)


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial counts as dead
    (``$LRSEARCH_HEARTBEAT_GRACE``)."""
    return _seconds("LRSEARCH_HEARTBEAT_GRACE", 20)


def check_settings() -> None:
    """Raise :class:`UsageError` naming a heartbeat setting that is not a whole number of seconds."""
    heartbeat_interval()
    grace_period()


def _seconds(variable: str, default: int) -> int:
    """A whole number of seconds >= 1 from the environment; a wrong one is an error naming the
    setting (it was read inside the storage's opening, and reported as a bad storage URL)."""
    from lrsearch.core.errors import UsageError

    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{variable}: expected a whole number of seconds >= 1, got {text!r}")
    return value


class Heartbeats:
    """The heartbeats of the trials a worker holds, recorded every ``heartbeat_interval()``
    seconds on one thread, all in one statement (nothing for a storage without heartbeats).

    A trial's first beat is written with its claim (``RetryingStorage.sampling``); it is held
    until its MLflow record is sent, not only while it trains, so a study's last worker can
    tell a record on its way (a live worker beats) from one lost with its worker (no beat for
    the grace period). A beat that fails (an outage longer than the store's window) is tried
    again at the next interval; the trials meet the same outage.
    """

    def __init__(self, store: RetryingStorage) -> None:
        self.store = store
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, trial_id: int) -> None:
        """Beat for ``trial_id`` from now on (its first beat is the caller's to write)."""
        with self._lock:
            self._held.add(trial_id)
            if self._thread is None and self.store.get_heartbeat_interval() is not None:
                self._thread = threading.Thread(target=self._beat, name="lrsearch-heartbeat", daemon=True)
                self._thread.start()

    def release(self, trial_id: int) -> None:
        """Stop beating for ``trial_id`` (from any thread; idempotent)."""
        with self._lock:
            self._held.discard(trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._stop.clear()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_interval()):
            with self._lock:
                held = sorted(self._held)
            if not held:
                continue
            try:
                self.store.record_heartbeats(held)
            except Exception:
                pass
