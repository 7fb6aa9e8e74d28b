"""Stopping on SIGINT/SIGTERM: the current trial ends at its next epoch boundary, recorded as
FAIL in Optuna and KILLED in MLflow, and the worker exits; a second signal stops at once.
(Light on purpose: `run --workers` installs it before importing torch and Lightning.)"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Callable

from lrsearch.errors import LrsearchError


class Interrupted(LrsearchError):
    """A worker stopped on a signal; running the same command again resumes the study."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; run the same command again to resume the study")


class StopFlag:
    """Set by SIGINT or SIGTERM once :meth:`install` is called (from the main thread);
    ``on_signal(signum)`` runs on every signal first (to pass it on to child processes)."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
