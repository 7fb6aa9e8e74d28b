"""A process that trains: its worker index, and its process-wide settings (one torch thread,
quiet libraries)."""

from __future__ import annotations

import os


def default_index() -> int:
    """A worker's index when none is given (its sampler's seed): distinct per process and per
    host, since in containers every worker may be pid 1."""
    import socket
    import zlib

    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def setup_process() -> None:
    """Process-wide settings for a process that trains: quiet libraries, one torch thread
    (faster than several for these small networks, and fair to parallel workers)."""
    import optuna
    import torch

    from lrsearch.fit.training import quiet_lightning

    # Optuna logs a failed trial with its traceback: lrsearch reports failures in one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(int(os.environ.get("LRSEARCH_TORCH_THREADS", "1")))
    quiet_lightning()
