"""The authenticator types, by the `type:` name used in YAML."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.authn.anonymous import AnonymousAuthenticator, AnonymousConfig
from sidecar.authn.base import Authenticator, AuthnContext, Identity
from sidecar.authn.client_jwt import ClientJwtAuthenticator, ClientJwtConfig
from sidecar.authn.client_token import ClientTokenAuthenticator, ClientTokenConfig
from sidecar.authn.cookie import CookieAuthenticator, CookieConfig
from sidecar.authn.ip_key import IpKeyAuthenticator, IpKeyConfig
from sidecar.authn.jwt import JwtAuthenticator, JwtConfig
from sidecar.authn.remote import RemoteAuthenticator, RemoteConfig


@dataclass(frozen=True)
class AuthenticatorType:
    config_model: type[Any]
    build: Callable[[str, Any, AuthnContext], Authenticator]  # (name, its config_model instance, context)


REGISTRY: dict[str, AuthenticatorType] = {
    "jwt": AuthenticatorType(JwtConfig, JwtAuthenticator),
    "anonymous": AuthenticatorType(AnonymousConfig, AnonymousAuthenticator),
    "client_token": AuthenticatorType(ClientTokenConfig, ClientTokenAuthenticator),
    "client_jwt": AuthenticatorType(ClientJwtConfig, ClientJwtAuthenticator),
    "ip_key": AuthenticatorType(IpKeyConfig, IpKeyAuthenticator),
    "remote": AuthenticatorType(RemoteConfig, RemoteAuthenticator),
    "cookie": AuthenticatorType(CookieConfig, CookieAuthenticator),
}

__all__ = ["REGISTRY", "Authenticator", "AuthenticatorType", "Identity"]
