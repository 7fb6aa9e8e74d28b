"""A running trial's heartbeat: how often it beats, how long a silence means its worker is
gone, and the thread that beats."""

from __future__ import annotations

import os
import threading
from typing import Any


def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats (``$LRSEARCH_HEARTBEAT_INTERVAL``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_INTERVAL", "5"))


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial counts as dead
    (``$LRSEARCH_HEARTBEAT_GRACE``)."""
    return int(os.environ.get("LRSEARCH_HEARTBEAT_GRACE", "20"))


class Heartbeat:
    """A trial's heartbeat, recorded now and every ``heartbeat_interval()`` seconds on a
    thread until :meth:`stop` (nothing for a storage without heartbeats). It outlives the
    trial's training: the worker keeps beating until the trial's MLflow record is sent, so a
    study's last worker can tell a record on its way (a live worker beats) from one lost
    with its worker (no beat for the grace period). A beat that fails (an outage longer than
    the store's window) is tried again at the next interval; the trial meets the same outage."""

    def __init__(self, store: Any, trial_id: int) -> None:
        self.store = store
        self.trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        if self.store.get_heartbeat_interval() is not None:
            self._thread = threading.Thread(target=self._beat, name="lrsearch-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (from any thread; idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _beat(self) -> None:
        while True:
            try:
                self.store.record_heartbeat(self.trial_id)
            except Exception:
                pass
            if self._stop.wait(heartbeat_interval()):
                return
