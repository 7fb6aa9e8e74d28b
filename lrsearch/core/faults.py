"""Named moments of a trial's life where a test can kill a worker (``SIGKILL``, as the OOM
killer or a power cut would), stop it (``SIGTERM``, once, as a scheduler would) or slow it
down, to check that nothing is left RUNNING whatever the moment. Off unless
``LRSEARCH_KILL_AT`` / ``LRSEARCH_SIGNAL_AT`` / ``LRSEARCH_SLOW_AT`` name a moment, as
``MOMENT`` or ``MOMENT:WORKER`` (the worker index: 0 is `run`'s own process, 1… the workers
it starts); a disarmed point costs a dictionary lookup.

The moments: ``claimed`` (an array's trials created, before their parameters and MLflow
runs), ``joined`` (their parameters sampled, their runs on the way, before the fit),
``fit`` (the fit started, before its first batch), ``batch`` (inside an epoch),
``run-created`` (a run made, its id not yet stored with the trial), ``epoch`` (an epoch
trained), ``boundary`` (the array's epoch boundary, before its trials that ended are
told), ``told`` (Optuna told how they ended, their MLflow records maybe still on their
way), ``refilled`` (new trials joined the array at the boundary), ``record`` (a record
about to be sent), ``trained`` (the fit over, before the worker goes on).
"""

from __future__ import annotations

import os
import signal
import time

KILL_ENV, SIGNAL_ENV, SLOW_ENV = "LRSEARCH_KILL_AT", "LRSEARCH_SIGNAL_AT", "LRSEARCH_SLOW_AT"
SLOW_S = 3.0
worker = 0  # this process's worker index (set by worker.Worker)
# The worker's other processes (its tracking process; in that process, the worker): a fault
# that kills the worker kills them too, as a lost host would.
companions: list[int] = []
_signalled = False  # LRSEARCH_SIGNAL_AT sends one signal


def _armed(env: str, moment: str) -> bool:
    wanted = os.environ.get(env)
    if not wanted:
        return False
    name, _, index = wanted.partition(":")
    return name == moment and (not index or int(index) == worker)


def point(moment: str) -> None:
    """Die here if ``LRSEARCH_KILL_AT`` names this moment (and worker); send this process
    SIGTERM, the first time, if ``LRSEARCH_SIGNAL_AT`` does; slow down if ``LRSEARCH_SLOW_AT`` does."""
    global _signalled
    if not _signalled and _armed(SIGNAL_ENV, moment):
        _signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
    if _armed(KILL_ENV, moment):
        for pid in companions:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone already
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed(SLOW_ENV, moment):
        time.sleep(SLOW_S)
