"""The token endpoint's grants — `client_credentials` (RFC 6749 §4.4, seed 003), `password` (§4.3, checked by
the issuer's `credentials` webservice, seeds 001/002) and Engage's `custom_sso` (seed 002). They
refuse with `OAuthError` (sidecar/errors.py, RFC 6749 §5.2).

Every grant authenticates the client first (RFC 6749 §3.2.1: confidential clients authenticate at the token
endpoint). Client secrets are kept as SHA-256 hashes and compared hash to hash in constant time; an unknown
client is compared against a dummy so the reply takes as long."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sidecar.authn.remote_check import check
from sidecar.errors import OAuthError
from sidecar.issuer.client_secret import verify_client_secret
from sidecar.issuer.identifier_map import Identifiers
from sidecar.issuer.sso_key import issue_sso_key
from sidecar.state.client_token_store import token_hash

if TYPE_CHECKING:
    from sidecar.config.clients import ClientConfig
    from sidecar.issuer.context import IssuerContext

Params = dict[str, str]
Credentials = tuple[str, str] | None
Grant = Callable[["IssuerContext", Params, Credentials], Awaitable[dict[str, Any]]]


def authenticate_client(services: IssuerContext, credentials: Credentials) -> ClientConfig:
    if credentials is None:
        raise OAuthError.invalid_client("client authentication is required: HTTP Basic with client_id:client_secret")
    client = verify_client_secret(services.clients, *credentials)
    if client is None:
        raise OAuthError.invalid_client()
    return client


def granted_scopes(client: ClientConfig, requested: str | None) -> list[str]:
    """RFC 6749 §3.3: the requested scopes, each one the client's; none requested: all of the client's."""
    if requested is None:
        return list(client.scopes)
    wanted = list(dict.fromkeys(requested.split(" ")))
    if "" in wanted or not set(wanted) <= set(client.scopes):
        raise OAuthError("invalid_scope", "a requested scope is not granted to this client")
    return wanted


def required(params: Params, *names: str) -> list[str]:
    missing = [name for name in names if name not in params]
    if missing:
        raise OAuthError("invalid_request", f"missing parameter: {', '.join(missing)}")
    return [params[name] for name in names]


def access_token_reply(services: IssuerContext, subject: str, client: ClientConfig,
                       scopes: list[str]) -> dict[str, Any]:
    """RFC 6749 §5.1; the access token is a JWT signed by the issuer key (RFC 9068 claims)."""
    issuer = services.config.issuer
    assert issuer is not None  # the token endpoint answers 404 without issuer.signing_key
    scope = " ".join(scopes)
    claims: dict[str, Any] = {"sub": subject, "client_id": client.id, "scope": scope}
    if issuer.audience:
        claims["aud"] = issuer.audience
    ttl = int(issuer.access_token_ttl)
    token = services.signing.sign(claims, ttl)
    return {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "scope": scope}


async def client_credentials_grant(services: IssuerContext, params: Params, credentials: Credentials) -> dict[str, Any]:
    client = authenticate_client(services, credentials)
    scopes = granted_scopes(client, params.get("scope"))
    return access_token_reply(services, client.id, client, scopes)


async def password_grant(services: IssuerContext, params: Params, credentials: Credentials) -> dict[str, Any]:
    issuer = services.config.issuer
    assert issuer is not None  # the token endpoint answers 404 without issuer.signing_key
    service = issuer.credentials
    if service is None:
        raise OAuthError("unsupported_grant_type", "the password grant is not enabled (issuer.credentials is not set)")
    client = authenticate_client(services, credentials)
    username, password = required(params, "username", "password")
    scopes = granted_scopes(client, params.get("scope"))
    result = await check(services.http, service, None, {"username": username, "password": password})
    if not result.accepted:
        raise OAuthError("invalid_grant", "the username or password is not accepted")
    return access_token_reply(services, result.subject or username, client, scopes)


async def custom_sso_grant(services: IssuerContext, params: Params, credentials: Credentials) -> dict[str, Any]:
    """Seed 002: the client proves itself twice (its secret and its access token as `customer_token`) and
    names a user by its own identifier, mapped to a login through `POST /admin/identifiers`."""
    client = authenticate_client(services, credentials)
    customer_token, identifier = required(params, "customer_token", "user_identifier")
    scopes = granted_scopes(client, params.get("scope"))
    found = await services.client_tokens.lookup(token_hash(customer_token))
    if found is None or found[0] != client.id:
        raise OAuthError("invalid_grant", "customer_token is not a live access token of this client")
    user = await Identifiers(services.store).user_for(client.id, identifier)
    if user is None:
        raise OAuthError("invalid_grant", "user_identifier is not mapped to a user of this client")
    try:
        key = await issue_sso_key(services, client.id, user)
    except ValueError:
        raise OAuthError("invalid_grant", "the mapped user login cannot be put in a key") from None
    return {**access_token_reply(services, user, client, scopes), "key": key}


GRANTS: dict[str, Grant] = {
    "client_credentials": client_credentials_grant,
    "password": password_grant,
    "custom_sso": custom_sso_grant,
}
