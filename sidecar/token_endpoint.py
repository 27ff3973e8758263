"""`POST /_sidecar/oauth2/token` (SPEC §6): client_credentials, password and custom_sso grants. (Issue 5.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from sidecar.services import Services


def token_routes(services: Services) -> list[Route]:
    return []
