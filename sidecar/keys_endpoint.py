"""`POST /_sidecar/keys` (SPEC §6): IP-bound keys for an authenticated client. (Issue 4.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from sidecar.services import Services


def key_routes(services: Services) -> list[Route]:
    return []
