"""Webhooks (SPEC §8): signed, durable, retried deliveries of events. (Issue 6.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.routing import Route

if TYPE_CHECKING:
    from sidecar.services import Services


class Webhooks:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def enqueue(self, event: str, data: dict[str, Any]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def admin_routes(self) -> list[Route]:
        return []
