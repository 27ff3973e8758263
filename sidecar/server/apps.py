"""The ASGI applications: the main port (the gateway, plus the issuer endpoints under `/_sidecar`) and the
admin port. `create_apps` builds both over one `Services`."""

from __future__ import annotations

from typing import Any

from sidecar.config.model import LoadedConfig
from sidecar.issuer.endpoints import issuer_app, issuer_prefix
from sidecar.ops.admin_api import admin_app
from sidecar.proxy.gateway import Gateway
from sidecar.proxy.overload import answer_overloaded
from sidecar.runtime import Services
from sidecar.webhooks.admin_routes import admin_routes as webhook_admin_routes


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
            limits = self.services.config.limits
            if metrics.in_flight >= limits.max_in_flight > 0:
                services = self.services
                await answer_overloaded(limits.retry_after, scope["method"], send, services.audit, metrics)
                return
            metrics.in_flight += 1
            try:
                if scope["path"].startswith(self.prefix_slash):
                    await self.issuer(scope, receive, send)
                else:
                    await self.gateway(scope, receive, send)
            finally:
                metrics.in_flight -= 1
        else:  # websockets are not proxied (no lifespan scope comes: the runner starts uvicorn with lifespan="off")
            await send({"type": "websocket.close", "code": 1008})


def create_apps(loaded: LoadedConfig, services: Services | None = None) -> tuple[MainApp, Any, Services]:
    services = services or Services(loaded)
    return MainApp(services), admin_app(services, webhook_admin_routes(services.webhooks)), services
