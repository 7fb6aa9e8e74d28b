"""Stopping on SIGINT/SIGTERM: the current trial ends at its next epoch boundary, recorded as
FAIL in Optuna and KILLED in MLflow, and the worker exits; a second signal stops at once."""

from __future__ import annotations

import signal
from types import FrameType

import pytorch_lightning as pl

from lrsearch.errors import LrsearchError


class Interrupted(LrsearchError):
    """A worker stopped on a signal; running the same command again resumes the study."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; run the same command again to resume the study")


class StopFlag:
    """Set by SIGINT or SIGTERM once :meth:`install` is called (from the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None

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
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum


class StopCallback(pl.Callback):
    """Ends ``fit`` at the end of the current epoch once a stop is requested."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.flag.requested:
            trainer.should_stop = True
