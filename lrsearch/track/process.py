"""The tracking process: a worker's MLflow client in a process of its own.

A worker that trains hands every MLflow call to this process: its trials' runs, metrics and
artifacts, and its study's parent run. Why a process and not a thread: a training step is a
few hundred tiny torch operations, each of which lets go of the interpreter's lock; a thread
busy with MLflow's SQLAlchemy code takes the lock at each of them and keeps it for the
switch interval (5 ms), so while it works, training all but stops (a fit of 16 trials ran
hundreds of times slower beside a busy Python thread: docs/performance.md). In a process of
its own, MLflow's work runs on the other core, and its import and a new store's migrations
overlap the worker's import of torch and Lightning.

One process serves every tracking store its worker uses (a handle each:
:class:`TrackingProcess`), from the first handle to the worker's end. This module is the
worker's side: the handles, the requests sent and their answers awaited; the process itself,
and how it ends, is ``process_main.py``.
"""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from lrsearch.core.errors import LrsearchError, first_line
from lrsearch.track.outbox import Outbox
from lrsearch.track.process_main import _CLOSE, _NO_STORE, _OPEN, _import, _method

if TYPE_CHECKING:
    from lrsearch.track.tracking import Tracker

DEBUG_ENV = "LRSEARCH_DEBUG"  # set by the CLI's --debug: the process's stderr is the worker's

# What a worker's MLflow calls go through: a Tracker in this process, or a handle on one in
# the tracking process (it answers the Tracker's methods, through __getattr__).
TrackerLike: TypeAlias = "Tracker | TrackingProcess"


class RemoteError(LrsearchError):
    """An error raised in the tracking process: its message (and exit code) as it was."""

    def __init__(self, message: str, exit_code: int = 1, kind: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


class TrackingProcess:
    """A handle on the MLflow store ``uri`` in this process's tracking process (started with
    the first handle: it imports MLflow while this process does other things). The store
    is opened there (a new embedded one made) at :meth:`open`, or at the first call: a
    command opens it once its input is checked, so that bad input creates nothing.

    It answers the :class:`~lrsearch.track.tracking.Tracker` methods (each a round trip, in
    order with the other calls), ``run(fn, *args)`` (``fn(tracker, *args)`` there), and
    ``outbox()``: jobs in order, in the background. :meth:`close` waits for its jobs.
    """

    def __init__(self, uri: str, worker: int = 0) -> None:
        self.uri = uri
        self.worker = worker
        self._child = _Child.get(uri)
        self._key = next(_keys)
        self._opened: Future[Any] | None = None
        self._lock = threading.Lock()

    # -- what callers use ----------------------------------------------------------------

    def open(self) -> None:
        """Open the store there (once; a new embedded store is made now)."""
        with self._lock:
            if self._opened is None:
                # This process's environment goes along (MLflow's HTTP limits, the outage
                # window): the process may have been started before it changed.
                self._opened = self._child.request(
                    "first", self._key, _OPEN, (self.uri, self.worker, dict(os.environ)), {}
                )

    def ready(self) -> None:
        """Open the store there and wait until it is; raise its error if it could not be."""
        self.open()
        assert self._opened is not None
        self._opened.result()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(tracker, *args, **kwargs)`` in the tracking process, waited for."""
        self.ready()
        return self._child.request("call", self._key, fn, args, kwargs).result()

    def submit(self, fn: Callable[..., Any], *args: Any, first: bool = False) -> Future[Any]:
        """``fn(tracker, *args)`` in the tracking process, after every job submitted before it
        (``first``: before the others not yet begun, after those submitted ``first`` too)."""
        self.open()
        return self._child.request("first" if first else "job", self._key, fn, args, {})

    def outbox(self) -> Outbox:
        """An outbox of jobs run there, in order (a submit waits only past a long backlog)."""
        return Outbox(self, limit=64)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        from lrsearch.track.tracking import Tracker

        if name.startswith("_") or not callable(getattr(Tracker, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.run(_method, name, args, kwargs)

    def prepare_models(self) -> None:
        """Have the process import what logging a model needs (torch, pandas, MLflow's pyfunc:
        seconds) on a thread of its own now, while it has little to do, rather than when
        the study ends and registers its model."""
        self._child.request(
            "first", _NO_STORE, _import, ("mlflow.models", "mlflow.pyfunc", "pandas", "torch", _PACKAGES_MAP), {}
        )

    def prepare_report(self) -> None:
        """Have the process import what drawing a report needs (matplotlib, Optuna's plots),
        ahead, as :meth:`prepare_models` does: it draws some of the figures (``start``)."""
        self._child.request(
            "first",
            _NO_STORE,
            _import,
            ("matplotlib.pyplot", "optuna.visualization.matplotlib", "optuna.importance", "lrsearch.results.report"),
            {},
        )

    def start(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(None, *args)`` in the tracking process, not waited for: work that needs no
        store (drawing some of a report's figures while this process draws the others)."""
        return self._child.request("call", _NO_STORE, fn, args, {})

    def run_url(self, experiment_id: str, run_id: str) -> str:
        from lrsearch.track.links import run_url

        return run_url(self.uri, experiment_id, run_id)

    def trials_url(self, experiment_id: str) -> str:
        from lrsearch.track.links import trials_url

        return trials_url(self.uri, experiment_id)

    def close(self) -> None:
        """Wait for this handle's jobs, and let the process close its store (an SQLite
        store's log folded back into its file)."""
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is None:
            return
        try:
            self._child.request("job", self._key, _CLOSE, (), {}).result()
        except RemoteError:  # the process is gone: nothing left to wait for
            pass


_keys = itertools.count(1)


class _Child:
    """The tracking process itself, seen from the worker: one per worker process."""

    _current: _Child | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, uri: str) -> _Child:
        with cls._lock:
            if cls._current is None or cls._current.dead is not None or cls._current.pid != os.getpid():
                cls._current = _Child(uri)
            return cls._current

    def __init__(self, uri: str) -> None:
        import socket
        from multiprocessing.connection import Connection

        from lrsearch.core import faults, stopping
        from lrsearch.store.urls import is_server

        self.pid = os.getpid()
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # this lrsearch, whatever the caller's path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        kind = "server" if is_server(uri) else "file"  # what to import ahead (URIs go by the socket)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lrsearch.track.process_main", str(theirs.fileno()), kind],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Its errors come back as answers; its own stderr only with --debug.
                stderr=None if os.environ.get(DEBUG_ENV) else subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._socket = ours  # shut for writing at the end: the process reads its end of file
        self._conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self.dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="lrsearch-tracking-replies", daemon=True)
        self._reader.start()
        faults.companions.append(self.proc.pid)  # a fault that kills the worker kills this process too
        stopping.helpers.append(self.proc.pid)

    def request(
        self, lane: str, key: int, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        try:  # pickled here, so that a request the process could not read never goes
            payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            future.set_exception(e)
            return future
        with self._lock:
            if self.dead is not None:
                future.set_exception(RemoteError(self.dead))
                return future
            request = next(self._ids)
            self._waiting[request] = future
        try:
            with self._send_lock:
                self._conn.send((request, lane, key, payload))
        except (OSError, ValueError) as e:  # the process is gone: the reader fails what waits
            with self._lock:
                self._waiting.pop(request, None)
            future.set_exception(RemoteError(f"the tracking process is gone: {first_line(e)}"))
        return future

    def end(self) -> None:
        """Let the process finish what it was given and exit; wait for it."""
        import socket

        from lrsearch.core import faults, stopping

        for pids in (faults.companions, stopping.helpers):
            if self.proc.pid in pids:
                pids.remove(self.proc.pid)
        with self._send_lock:
            try:
                self._socket.shutdown(socket.SHUT_WR)  # (closing it would not wake the reader's recv)
            except OSError:  # the process is gone
                pass
        self.proc.wait()
        self._reader.join()
        self._conn.close()
        self._socket.close()

    def _read(self) -> None:
        while True:
            try:
                request, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._waiting.pop(request, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(RemoteError(*value))
        code = self.proc.wait()
        with self._lock:
            self.dead = f"the tracking process ended (exit code {code})"
            left, self._waiting = list(self._waiting.values()), {}
        for future in left:
            if not future.done():
                future.set_exception(RemoteError(self.dead))


def close_all() -> None:
    """End this process's tracking process, once it has finished its work (before ``os._exit``)."""
    with _Child._lock:
        child, _Child._current = _Child._current, None
    if child is not None and child.pid == os.getpid():
        child.end()


# Saving an MLflow model checks its requirements against the installed packages, which
# first maps every installed distribution's files to its modules (a third of a second here,
# cached by MLflow after): done ahead too. A private function: if it goes, nothing is warmed.
_PACKAGES_MAP = "mlflow.utils.requirements_utils:_init_packages_to_modules_map"
