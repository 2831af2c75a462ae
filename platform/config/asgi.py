"""ASGI entry point: /v1/ HTTP goes to the lean gateway app, WebSockets to
Channels, everything else (admin, portal, health, and the few /v1/ reads that are
not on the hot path, such as /v1/usage) to Django."""
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from channels.routing import URLRouter  # noqa: E402
from channels.security.websocket import OriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import path  # noqa: E402

from inference.apis import api_app  # noqa: E402
from inference.consumers import CompletionStreamConsumer  # noqa: E402
from inference.runtime import runtime_get, runtime_stop  # noqa: E402

django_app = get_asgi_application()
# /v1/ paths served by Django views (DRF) rather than the gateway app.
DJANGO_V1_PREFIXES = ("/v1/usage",)


class ApiOriginValidator(OriginValidator):
    """API clients authenticate with a key, never with ambient cookies, so a socket
    without an Origin header (any non-browser client) is allowed; a browser's
    Origin must still name one of ALLOWED_HOSTS."""

    def valid_origin(self, parsed_origin):
        return parsed_origin is None or self.validate_origin(parsed_origin)


def _allowed_origins() -> list[str]:
    hosts = [host.strip("[]") for host in settings.ALLOWED_HOSTS]
    return ["*"] if "*" in hosts else [f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")]


websocket_app = ApiOriginValidator(
    URLRouter([path("v1/ws", CompletionStreamConsumer.as_asgi())]),
    _allowed_origins(),
)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await runtime_get()
            except Exception as error:
                await send({"type": "lifespan.startup.failed", "message": str(error)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await runtime_stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    kind = scope["type"]
    if kind == "http":
        path = scope["path"]
        if path.startswith("/v1/") and not path.startswith(DJANGO_V1_PREFIXES):
            return await api_app(scope, receive, send)
        return await django_app(scope, receive, send)
    if kind == "websocket":
        return await websocket_app(scope, receive, send)
    if kind == "lifespan":
        return await _lifespan(receive, send)
    raise ValueError(f"unsupported ASGI scope type {kind!r}")
