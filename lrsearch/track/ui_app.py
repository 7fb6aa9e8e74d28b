"""The app ``lrsearch ui`` and ``lrsearch server`` serve: MLflow's own server app, its UI's
page given the defaults a tracking user needs (``mlflow server --app-name lrsearch``, an
``mlflow.app`` entry point of lrsearch's package).

MLflow 3.18's server has no setting for what its UI shows beside a tracking user's pages: the
browser keeps each choice in its ``localStorage``, under ``KEY_v1`` as JSON (the UI's
``useLocalStorage`` hook). The page that loads the UI (``/``; its routes are after ``#``)
therefore sets ``UI_DEFAULTS`` before the UI's script runs, each only where the browser has
no value of its own: a user who turns the switch back to GenAI, or opens the assistant, keeps
that choice. Everything else, API and artifacts included, is MLflow's app unchanged. With
``lrsearch server --auth`` the app is MLflow's ``basic-auth`` (its logins need that app), and
these defaults are not set.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mlflow.server.fastapi_app import app as mlflow_app

UI_DEFAULTS = {
    # The sidebar's switch on Model training (runs, models), not GenAI (traces, prompts).
    "mlflow.workflowType": "machine_learning",
    # The assistant panel, which opens by itself on a first visit to a local server: as if it had.
    "mlflow.assistant.fab.autoOpenedOnFirstLoad": True,
    # The Model Registry's one-time notice about its new UI: as if dismissed.
    "_mlflow_model_registry_promo_modal_dismissed": True,
}

_SCRIPT = (
    "<script>/* lrsearch: the MLflow UI's defaults for a tracking user, where this browser has none */\n"
    "Object.entries(" + json.dumps(UI_DEFAULTS) + ").forEach(([k, v]) => {\n"
    "  try { if (localStorage.getItem(k + '_v1') === null) localStorage.setItem(k + '_v1', JSON.stringify(v)); }\n"
    "  catch (e) {}\n"
    "});</script>"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def with_defaults(page: bytes) -> bytes:
    """The UI's page with the defaults' script first in its head, before the UI's own."""
    return page.replace(b"<head>", b"<head>" + _SCRIPT.encode(), 1)


class UIDefaults:
    """An ASGI app: ``app``, but for the UI's page (GET ``/``), given :func:`with_defaults`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = dict(start.get("headers", []))
            page = bytes(body)
            if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers:
                page = with_defaults(page)
            start["headers"] = [
                (k, str(len(page)).encode() if k == b"content-length" else v) for k, v in start.get("headers", [])
            ]
            await send(start)
            await send({"type": "http.response.body", "body": page, "more_body": False})

        await self.app(scope, receive, buffered)


app = UIDefaults(mlflow_app)
