"""The one-time key of Engage's `custom_sso` grant (seed 002): the partner redirects the browser with it, and
an `ip_key` authenticator accepts it once, within 5 minutes. It is an ordinary key of the key endpoint
(sidecar/issuer/key_endpoint.py) bound to expiry and single use but to no address: the partner's server asks for it,
the user's browser spends it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sidecar.authn.ip_key_sealing import keyring_for
from sidecar.errors import OAuthError
from sidecar.issuer.key_endpoint import key_claims

if TYPE_CHECKING:
    from sidecar.issuer.context import IssuerContext

SSO_KEY_MINUTES = 5


async def issue_sso_key(services: IssuerContext, client_id: str, user: str) -> str:
    """The key, or ValueError when the user login cannot be put in one (the key endpoint's own rules)."""
    fields = {"user": user, "expiry_minutes": SSO_KEY_MINUTES, "single_use": True}
    try:
        claims = key_claims(client_id, fields, time.time())
    except OAuthError as exc:
        raise ValueError(exc.description) from None
    key = keyring_for(services.config).seal(claims)
    expires = datetime.fromtimestamp(claims.expires_at or 0, UTC).isoformat()
    await services.events.emit("key.issued", {"client": client_id, "user": user, "single_use": True,
                                              "expires_at": expires})
    return key
