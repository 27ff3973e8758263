"""A client (a partner's licence) as configured under `clients:`: its token hashes, secret hash, public key and
limits. A leaf of the configuration, so that the state and authn layers can name it without importing the whole
model."""

from __future__ import annotations

import re
from typing import Any

from pydantic import field_validator

from sidecar.config.types import Model, Network, load_client_public_key


class ClientConfig(Model):
    id: str
    name: str = ""
    tokens: list[str] = []
    secret: str | None = None
    public_key: str | None = None
    routes: list[str] | None = None
    scopes: list[str] = []
    allowed_ips: list[Network] | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("tokens")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        for token in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", token):
                raise ValueError(
                    "tokens hold hashes only, as sha256:<64 hex>; `sidecar token new --client ID` prints the line"
                )
        return value

    @field_validator("secret")
    @classmethod
    def _secret_hash(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise ValueError("secret holds a hash only, as sha256:<64 hex of the secret>")
        return value or None

    @field_validator("public_key")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value:
            load_client_public_key(value)  # the keys client_jwt can use: RSA >= 2048, EC P-256
        return value or None
