"""The tracking process itself (``process.py`` is the worker's side): it serves the MLflow calls
of one worker, for every tracking store the worker uses.

It reads requests from a socket until its end of file: then it finishes what it was given,
folds each SQLite store's log back into its file, and exits. So a worker that dies leaves no
record half-sent that it had handed over. SIGINT and SIGTERM end the worker (which passes
them on here): here they only cut short the waits through an outage, as in the worker.

    python -m lrsearch.track.process_main FD KIND    (started by the first handle)
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
import threading
from typing import TYPE_CHECKING, Any

from lrsearch.core.errors import LrsearchError, first_line

if TYPE_CHECKING:
    from lrsearch.track.tracking import Tracker

_OPEN, _CLOSE = "open", "close"  # a request's function field for a handle's store
_NO_STORE = 0  # the store key of requests that need none (handles count from 1)


# What a handle's requests run here: the worker sends them by name (pickled), this process
# imports and runs them.
def _method(tracker: Tracker, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return getattr(tracker, name)(*args, **kwargs)


def _import(tracker: Tracker | None, *modules: str) -> None:
    """Import ``modules`` on a thread of the tracking process's own (it goes on meanwhile);
    ``module:function``: call that function of it, with no arguments."""
    import importlib

    def imports() -> None:
        for module in modules:
            name, _, function = module.partition(":")
            try:
                imported = importlib.import_module(name)
                if function:
                    getattr(imported, function)()
            except Exception:  # the work that needs it says what is wrong
                return

    threading.Thread(target=imports, name="lrsearch-imports", daemon=True).start()


def _error(e: BaseException) -> tuple[str, int, str]:
    """An error as it travels back: its one-line message, exit code and class name."""
    if isinstance(e, LrsearchError):
        return str(e), e.exit_code, type(e).__name__
    return f"{type(e).__name__}: {first_line(e)}", 1, type(e).__name__


class _Store:
    """A handle's store in the tracking process: its tracker, once made."""

    def __init__(self) -> None:
        self.made = threading.Event()
        self.tracker: Tracker | None = None
        self.error: BaseException | None = None


def main(fd: int, kind: str) -> None:
    import queue
    from multiprocessing.connection import Connection

    from lrsearch.core import faults
    from lrsearch.core.stopping import StopFlag
    from lrsearch.store.storage import checkpoint

    # SIGINT and SIGTERM end the worker, and this process with its socket; here they only
    # cut short the waits through an outage (core/stopping.check_stop), as in the worker.
    StopFlag().install()
    faults.companions.append(os.getppid())
    conn = Connection(fd)
    _import_ahead(kind)
    send_lock = threading.Lock()
    stores: dict[int, _Store] = {}

    def reply(request: int, ok: bool, value: Any) -> None:
        try:
            with send_lock:
                try:
                    conn.send((request, ok, value))
                except (pickle.PicklingError, TypeError, AttributeError) as e:  # an answer that cannot travel
                    conn.send((request, False, _error(e)))
        except (OSError, ValueError):  # the worker is gone: what it handed over is still written
            pass

    def make(store: _Store, uri: str, worker: int, environ: dict[str, str]) -> None:
        from lrsearch.core import stopping
        from lrsearch.track.tracking import Tracker

        faults.worker = worker
        os.environ.clear()
        os.environ.update(environ)
        if stopping._installed is not None:  # a signal the worker had before: its studies since wait out outages
            stopping._installed.signum = None
        try:
            store.tracker = Tracker(uri)
        except BaseException as e:
            store.error = e
        store.made.set()

    def handle(request: int, key: int, payload: bytes) -> None:
        try:
            fn, args, kwargs = pickle.loads(payload)
            if fn == _OPEN:  # made on a thread of its own: the other stores' work goes on
                store = stores[key] = _Store()
                threading.Thread(target=make, args=(store, *args), daemon=True).start()
                store.made.wait()
                if store.error is not None:
                    raise store.error
                value = None
            elif key == _NO_STORE:
                value = fn(None, *args, **kwargs)
            else:
                store = stores[key]
                store.made.wait()
                if store.error is not None:
                    raise store.error
                if fn == _CLOSE:
                    del stores[key]
                    assert store.tracker is not None  # made, or its error raised above
                    checkpoint(store.tracker.uri)
                    value = None
                else:
                    value = fn(store.tracker, *args, **kwargs)
        except BaseException as e:
            reply(request, False, _error(e))
            return
        reply(request, True, value)

    # Two lanes, each a thread: jobs in order ("first" ones ahead of the others: a trial's run
    # is made as it starts, however many finished trials' records wait), and calls, which
    # the worker waits for.
    jobs: queue.PriorityQueue[Any] = queue.PriorityQueue()
    calls: queue.Queue[Any] = queue.Queue()
    order = itertools.count()

    def serve_jobs() -> None:
        while (item := jobs.get())[2] is not None:
            handle(*item[2])

    def serve_calls() -> None:
        while (item := calls.get()) is not None:
            handle(*item)

    threads = [
        threading.Thread(target=serve_jobs, name="lrsearch-jobs"),
        threading.Thread(target=serve_calls, name="lrsearch-calls"),
    ]
    for thread in threads:
        thread.start()
    while True:
        try:
            request, lane, key, payload = conn.recv()
        except (EOFError, OSError):
            break
        if lane == "call":
            calls.put((request, key, payload))
        else:
            jobs.put((0 if lane == "first" else 1, next(order), (request, key, payload)))
    jobs.put((2, next(order), None))
    calls.put(None)
    for thread in threads:
        thread.join()
    for store in stores.values():
        if store.tracker is not None:
            checkpoint(store.tracker.uri)


def _import_ahead(kind: str) -> None:
    """What ``Tracker(uri)`` will import, while the worker checks its input and imports
    torch (about a second: most of a worker's tracking set-up)."""
    import mlflow  # noqa: F401
    from mlflow import MlflowClient  # noqa: F401

    if kind == "file":
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    # Everything is written and closed: skip tearing down MLflow's and SQLAlchemy's modules,
    # which takes longer than the work (as the CLI's own ``entry`` does).
    os._exit(0)
