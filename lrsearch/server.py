"""The MLflow tracking server (and UI) on an lrsearch store."""

from __future__ import annotations

import os
import sys

from lrsearch.storage import artifact_root, sqlite_path
from lrsearch.errors import UsageError


def server_command(backend_uri: str, *, host: str = "127.0.0.1", port: int = 5000,
                   artifacts: str | None = None) -> list[str]:
    """The ``mlflow server`` command line for ``backend_uri``, artifacts served by the server."""
    destination = artifacts or artifact_root(backend_uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--serve-artifacts"]
    if destination:
        cmd += ["--artifacts-destination", destination]
    return cmd


def serve(backend_uri: str, *, host: str = "127.0.0.1", port: int = 5000, artifacts: str | None = None) -> int:
    """Become the tracking server (exec), so signals reach it directly; returns only on error."""
    path = sqlite_path(backend_uri)
    if path is not None and not path.exists():
        raise UsageError(f"no MLflow store at {path} (run a study first, or pass --tracking-uri)")
    print(f"MLflow UI: http://{host}:{port}/#/experiments?workflowType=machine_learning", file=sys.stderr)
    sys.stderr.flush()
    cmd = server_command(backend_uri, host=host, port=port, artifacts=artifacts)
    os.execv(cmd[0], cmd)
    return 1  # not reached: execv replaces this process or raises
