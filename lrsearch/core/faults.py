"""Named moments of a trial's life where a test can kill a worker (``SIGKILL``, as the OOM
killer or a power cut would) or slow it down, to check that nothing is left RUNNING
whatever the moment. Off unless ``LRSEARCH_KILL_AT`` / ``LRSEARCH_SLOW_AT`` name a moment,
as ``MOMENT`` or ``MOMENT:WORKER`` (the worker index: 0 is `run`'s own process, 1… the
workers it starts); a disarmed point costs a dictionary lookup.

The moments: ``claimed`` (a trial created, before its MLflow run), ``run-created`` (the
run made, its id not yet stored with the trial), ``epoch`` (an epoch trained), ``told``
(Optuna told how the trial ended, its MLflow record maybe still on its way), ``record``
(the record about to be sent).
"""

from __future__ import annotations

import os
import signal
import time

KILL_ENV, SLOW_ENV = "LRSEARCH_KILL_AT", "LRSEARCH_SLOW_AT"
SLOW_S = 3.0
worker = 0  # this process's worker index (set by worker.Worker)
# The worker's other processes (its tracking process; in that process, the worker): a fault
# that kills the worker kills them too, as a lost host would.
companions: list[int] = []


def _armed(env: str, moment: str) -> bool:
    wanted = os.environ.get(env)
    if not wanted:
        return False
    name, _, index = wanted.partition(":")
    return name == moment and (not index or int(index) == worker)


def point(moment: str) -> None:
    """Die here if ``LRSEARCH_KILL_AT`` names this moment (and worker); slow down if
    ``LRSEARCH_SLOW_AT`` does."""
    if _armed(KILL_ENV, moment):
        for pid in companions:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone already
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed(SLOW_ENV, moment):
        time.sleep(SLOW_S)
