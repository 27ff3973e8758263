"""The authenticator types, by the `type:` name used in YAML."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.authn.anonymous import AnonymousAuthenticator, AnonymousConfig
from sidecar.authn.base import Authenticator, Identity
from sidecar.authn.client_token import ClientTokenAuthenticator, ClientTokenConfig
from sidecar.authn.jwt import JwtAuthenticator, JwtConfig


@dataclass(frozen=True)
class AuthenticatorType:
    config_model: type[Any]
    build: Callable[[str, Any, Any], Authenticator]


REGISTRY: dict[str, AuthenticatorType] = {
    "jwt": AuthenticatorType(JwtConfig, JwtAuthenticator),
    "anonymous": AuthenticatorType(AnonymousConfig, AnonymousAuthenticator),
    "client_token": AuthenticatorType(ClientTokenConfig, ClientTokenAuthenticator),
}

__all__ = ["REGISTRY", "Authenticator", "AuthenticatorType", "Identity"]
