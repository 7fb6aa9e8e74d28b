"""Stopping on SIGINT/SIGTERM: the current trial ends at its next epoch boundary, recorded as
FAIL in Optuna and KILLED in MLflow, and the worker exits; a second signal stops training at
once, but never the bookkeeping that records how the trial ended.
(Light on purpose: `run --workers` installs it before importing torch and Lightning.)"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from lrsearch.core.errors import LrsearchError

# The fd of a pipe whose other end only the parent holds (`run --workers` sets it for the
# workers it starts): when the parent dies, however, the pipe reads EOF.
PARENT_FD_ENV = "LRSEARCH_PARENT_FD"
PARENT_PID_ENV = "LRSEARCH_PARENT_PID"  # and the parent's pid, to notice one already gone

_installed: StopFlag | None = None
# Processes that serve this one (its tracking process): each signal it receives is passed
# on to them, so that they stop waiting out an outage when it stops.
helpers: list[int] = []


class Interrupted(LrsearchError):
    """A worker stopped on a signal; running the same command again resumes the study."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; run the same command again to resume the study")


class StopFlag:
    """Set by SIGINT or SIGTERM once :meth:`install` is called (from the main thread);
    ``on_signal(signum)`` runs on every signal first (to pass it on to child processes).

    A second signal raises :class:`Interrupted` only inside :meth:`interruptible` (around
    training): elsewhere the worker is recording a trial's end, which must complete for
    nothing to be left RUNNING, and the first signal already stops it after that.
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal
        self._interruptible = False  # a second signal would raise now
        self._inside = False  # in an interruptible section (whether or not a signal raised there)
        self._shielded = False  # in a shielded part of it
        self._deferred: int | None = None  # a second signal that came while shielded

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        global _installed
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        _installed = self
        if not getattr(sys.unraisablehook, "_lrsearch", False):
            sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section a second signal may cut short (in the main thread)."""
        self._interruptible = self._inside = True
        try:
            yield
        finally:
            self._interruptible = self._inside = False

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A part of an interruptible section that a second signal must not cut: a trial's
        end being recorded while the rest of its array trains. A second signal that comes
        meanwhile is raised when the part ends."""
        if not self._interruptible:
            yield
            return
        self._interruptible, self._shielded = False, True
        try:
            yield
        except BaseException:
            self._shielded, self._deferred = False, None
            raise
        self._shielded = False
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            raise Interrupted(deferred)
        self._interruptible = True

    def _redeliver(self, signum: int) -> None:
        """The second signal's exception was dropped (raised inside a finalizer): send the
        signal again, from a thread, to be raised where the main thread is once the hook that
        dropped it has returned."""
        if self._inside:
            self._interruptible = True
            threading.Timer(0.001, os.kill, (os.getpid(), signum)).start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        for pid in helpers:
            try:
                os.kill(pid, signum)
            except OSError:  # gone already
                pass
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.signum is None:
            self.signum = signum
        elif self._interruptible:
            self._interruptible = False  # once
            raise Interrupted(signum)
        elif self._shielded:
            self._deferred = signum


def _quiet_interrupts(
    hook: Callable[[sys.UnraisableHookArgs], None],
) -> Callable[[sys.UnraisableHookArgs], None]:
    """Python's hook for exceptions it cannot raise, minus :class:`Interrupted`: a second
    signal that lands inside a finalizer (a weakref callback during garbage collection) is
    dropped there, and would print a traceback. Its signal is sent again instead, so the
    second Ctrl-C still stops training at once."""

    def handle(unraisable: sys.UnraisableHookArgs) -> None:
        error = unraisable.exc_value
        if not isinstance(error, Interrupted):
            hook(unraisable)
        elif _installed is not None:
            _installed._redeliver(error.signum)

    handle._lrsearch = True  # type: ignore[attr-defined]
    return handle


def stopped_by(error: BaseException) -> tuple[str, str]:
    """A worker's parent-run status for the exception that stopped it, and why in words."""
    if isinstance(error, Interrupted):
        return "KILLED", signal.Signals(error.signum).name
    if isinstance(error, KeyboardInterrupt):
        return "KILLED", "SIGINT"
    from lrsearch.core.errors import first_line

    return "FAILED", f"an error: {type(error).__name__}: {first_line(error)}"


def check_stop() -> None:
    """Raise :class:`Interrupted` if this process was asked to stop (for loops that wait,
    such as retries through an outage)."""
    if _installed is not None:
        _installed.check()


def watch_parent() -> None:
    """In a worker started by ``run --workers``: stop as on SIGTERM when the parent dies
    (even by SIGKILL), so no worker outlives the command that started it. On Linux the
    kernel sends the signal (``PR_SET_PDEATHSIG``) the moment the parent dies; elsewhere a
    thread waits for the end of a pipe only the parent holds. Never both: a second signal
    would stop training at once instead of at the epoch's end."""
    fd = os.environ.pop(PARENT_FD_ENV, None)
    if fd is None:
        return
    if _die_with_parent(int(os.environ.pop(PARENT_PID_ENV, "0") or 0)):
        os.close(int(fd))
        return

    def wait() -> None:
        try:
            while os.read(int(fd), 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="lrsearch-parent", daemon=True).start()


def _die_with_parent(parent: int) -> bool:
    """SIGTERM from the kernel when the parent process dies (Linux), and now if it already
    has (this process then has another parent). False where the kernel cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no prctl here: the pipe tells
        return False
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Cancelled(Exception):
    """A trial stopped because its study was cancelled with ``lrsearch cancel --now``."""


class TrialStop:
    """What ends a trial at its next epoch boundary: this process's stop flag, or its study's
    cancellation (an event set by the worker that watches the study)."""

    def __init__(self, flag: StopFlag, cancelled: threading.Event | None = None) -> None:
        self.flag = flag
        self.cancelled = cancelled or threading.Event()

    @property
    def requested(self) -> bool:
        return self.flag.requested or self.cancelled.is_set()
