"""Whether a tracking server answers: the probe ``submit`` makes (one REST request, without
importing MLflow), the bounds on every request to a server, and messages that name a store's
URI without its password. :meth:`~lrsearch.track.tracking.Tracker.check` answers the same with
MLflow's client."""

from __future__ import annotations

import os

from lrsearch.core.errors import TrackingError
from lrsearch.store.urls import credentials, is_server, redact, without_credentials

# Bounds on each request to a tracking server (MLflow's defaults can stall a call for
# minutes); lrsearch repeats a failed call itself (retry.py), knowing which calls are safe
# to repeat. A variable already set in the environment wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_tracking(uri: str) -> None:
    """Raise :class:`TrackingError` if a tracking server does not answer, or refuses the
    login, with one REST request and without importing MLflow (``submit`` writes nothing to
    MLflow: a worker does, and ``submit`` must answer at once). The same bounds and messages
    as :meth:`Tracker.check`; an embedded store has nothing to reach."""
    if not is_server(uri):
        return
    import base64
    import socket
    import urllib.error
    import urllib.request

    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or HTTP_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    request = urllib.request.Request(
        f"{without_credentials(uri).rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user, password = credentials(uri)
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise TrackingError(
                f"MLflow tracking at {redact(uri)} refused the login: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise TrackingError(f"cannot reach MLflow tracking at {redact(uri)}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        cause = getattr(e, "reason", e)
        if isinstance(cause, (socket.timeout, TimeoutError)):
            why = f"no answer within {timeout:g} s"
        elif isinstance(cause, OSError) and cause.strerror:
            why = cause.strerror[:1].lower() + cause.strerror[1:]
        else:
            why = str(cause)
        raise TrackingError(f"cannot reach MLflow tracking at {redact(uri)}: {_without(why, uri)}") from None


def _without(text: str, uri: str) -> str:
    """``text`` with the URI (and so any password in it) shown redacted."""
    return text.replace(uri, redact(uri)) if uri in text else text
