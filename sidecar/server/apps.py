"""The ASGI applications: the main port (the gateway, plus the issuer endpoints under `/_sidecar`) and the
admin port. `create_apps` builds both over one `Services`."""

from __future__ import annotations

from typing import Any

from sidecar.config.model import LoadedConfig
from sidecar.issuer.endpoints import issuer_app, issuer_prefix
from sidecar.ops.admin_api import admin_app
from sidecar.proxy.gateway import Gateway
from sidecar.runtime import Services


class MainApp:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.gateway = Gateway(services)
        self.prefix = issuer_prefix(services)
        self.prefix_slash = self.prefix + "/"
        self.issuer = issuer_app(services)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            metrics = self.services.metrics
            metrics.in_flight += 1
            try:
                if scope["path"].startswith(self.prefix_slash):
                    await self.issuer(scope, receive, send)
                else:
                    await self.gateway(scope, receive, send)
            finally:
                metrics.in_flight -= 1
        elif scope["type"] == "lifespan":
            await _lifespan(self.services, receive, send)
        else:  # websockets are not proxied
            await send({"type": "websocket.close", "code": 1008})


async def _lifespan(services: Services, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await services.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await services.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_apps(loaded: LoadedConfig, services: Services | None = None) -> tuple[MainApp, Any, Services]:
    services = services or Services(loaded)
    return MainApp(services), admin_app(services, services.webhooks.admin_routes()), services
