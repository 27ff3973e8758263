"""Client authentication by id and secret (RFC 6749 §2.3.1), shared by the token and key endpoints: HTTP Basic
decoding, and the secret checked against the client's stored hash in constant time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from sidecar.config.clients import ClientConfig

# Compared against when the client is unknown or has no secret, so the time taken does not tell which ids exist.
_NO_SECRET = "0" * 64


def decode_basic(value: str) -> tuple[str, str] | None:
    """(client id, secret) of an HTTP Basic credential, or None when it is not base64 of `id:secret`."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        return None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before they are joined.
    return unquote_plus(client_id), unquote_plus(secret)


def verify_client_secret(clients: Mapping[str, ClientConfig], client_id: str, secret: str) -> ClientConfig | None:
    """The client, when `secret` hashes to its configured `sha256:` secret; else None."""
    client = clients.get(client_id)
    expected = client.secret.removeprefix("sha256:") if client is not None and client.secret else _NO_SECRET
    given = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()) or client is None or not client.secret:
        return None
    return client
