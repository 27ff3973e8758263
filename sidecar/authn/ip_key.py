"""`ip_key`: keys issued by this sidecar (`POST {prefix}/keys`, seed 001 "generateMapToken") and sent as
`?key=` or as the form field of the same name, so that a partner can hand a user a link that logs them in.

A key is refused when it is not one of ours (garbage, tampered, sealed under a retired secret), expired, used
from another client address than the one it is bound to — the address as seen through `trusted_proxies` only,
so a forged `X-Forwarded-For` from an untrusted peer changes nothing — when its client is no longer configured,
or, single-use, already used (marked atomically in the store, shared by every replica with Redis).

With `session_cookie`, a good key also sets a signed session cookie (HttpOnly, Secure unless turned off for
plain-HTTP development, SameSite=Lax: sent on top-level navigation, not on cross-site subrequests, RFC 6265bis
§8.8) that authenticates the user's later requests without the key, until `session_ttl` or logout. Neither
the key nor the session cookie ever reaches the upstream. Not cacheable: the address and single-use checks
must run on every request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import field_validator, model_validator

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint, read_first
from sidecar.authn.hmac_values import InvalidValue, sign, verify
from sidecar.authn.ip_key_sealing import InvalidKey, keyring_for, used_mark
from sidecar.config.types import Duration, Model, Source, parse_source
from sidecar.errors import LoggedOut, Unauthenticated
from sidecar.ip_addresses import canonical_ip
from sidecar.proxy.request_view import RequestView

CLOCK_SKEW = 60.0
_URL_SAFE = "/:?#[]@!$&'()*+,;=%-._~"


class IpKeyConfig(Model):
    needs_keys_secret: ClassVar[bool] = True  # `sidecar check` warns when keys.secret is not set

    type: Literal["ip_key"]
    param: str = "key"
    read_form: bool = True  # also read the form field `param` (the seed: long URLs break, so POST is allowed)
    single_use: bool = False  # true: every key is single-use, whatever it was issued with
    ip_only_max_age: Duration = 24 * 3600.0  # a key bound to an address only still stops working after this
    session_cookie: str | None = None
    secure_cookie: bool = True
    session_ttl: Duration = 8 * 3600.0
    logout_path: str | None = None
    logout_redirect: str = "/"  # where logout sends the browser when the key named no url_logout

    @field_validator("session_cookie")
    @classmethod
    def _cookie_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in " ;,=\t\r\n\"")):
            raise ValueError(f"{value!r} is not a cookie name")
        return value

    @model_validator(mode="after")
    def _logout(self) -> IpKeyConfig:
        if self.logout_path is not None and (not self.logout_path.startswith("/") or not self.session_cookie):
            raise ValueError("logout_path is a path such as /pub/logout, and needs session_cookie (it clears it)")
        if self.session_ttl <= 0 or self.ip_only_max_age <= 0:
            raise ValueError("session_ttl and ip_only_max_age must be positive durations")
        return self


class IpKeyAuthenticator(AuthenticatorBase):
    def __init__(self, name: str, config: IpKeyConfig, context: AuthnContext) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        self._key_sources = [parse_source(f"query:{config.param}")]
        if config.read_form:
            self._key_sources.append(parse_source(f"form:{config.param}"))
        self._cookie_sources = [parse_source(f"cookie:{config.session_cookie}")] if config.session_cookie else []
        self.sources: tuple[Source, ...] = (*self._key_sources, *self._cookie_sources)
        self.needs_body = config.read_form
        self._context = context

    def credential(self, request: RequestView) -> Credential | None:
        # No length bound here (max_length=None): keys and sessions are opened by HMAC before anything else.
        if self.config.logout_path is not None and request.path == self.config.logout_path:
            session = read_first(request, self._cookie_sources, "session cookie", max_length=None)
            return Credential("logout", "") if session is None else Credential("logout", session.value, session.source)
        key = read_first(request, self._key_sources, "key", max_length=None)
        if key is not None:
            return key
        return read_first(request, self._cookie_sources, "session cookie", max_length=None)

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        if credential.kind == "logout":
            raise self._logout(credential.value)
        if credential.kind == "key":
            return await self._key(credential.value, request)
        return self._session(credential.value, request)

    async def _key(self, key: str, request: RequestView) -> Identity:
        try:
            claims = keyring_for(self._context.config).open(key)
        except InvalidKey as exc:
            raise Unauthenticated("the key is not valid", detail=str(exc)) from None
        now = time.time()
        expires_at: float = (claims.issued_at + self.config.ip_only_max_age if claims.expires_at is None
                             else claims.expires_at)
        if expires_at <= now:
            raise Unauthenticated("the key has expired", detail="expired")
        if claims.issued_at > now + CLOCK_SKEW:
            raise Unauthenticated("the key is not valid", detail="issued in the future")
        self._check_address(claims.ip, request, "the key was issued for another address")
        self._check_client(claims.client)
        if claims.single_use or self.config.single_use:
            # Last, so that a key refused for another reason is not spent. SET NX is atomic: of many concurrent
            # uses, exactly one wins, on every replica sharing the store.
            first = await self._context.store.set(used_mark(key), "1", ttl=expires_at - now + CLOCK_SKEW,
                                                   only_new=True)
            if not first:
                raise Unauthenticated("the key has already been used", detail="reused")
        return Identity(subject=claims.user, authenticator=self.name, client=claims.client,
                        claims={"via": "key", "ip": claims.ip, "url_logout": claims.url_logout})

    def _session(self, value: str, request: RequestView) -> Identity:
        claims = self._session_claims(value, fresh=True)
        self._check_address(claims.get("i"), request, "the session belongs to another address")
        client = str(claims.get("c", ""))
        self._check_client(client)
        return Identity(subject=str(claims["sub"]), authenticator=self.name, client=client,
                        claims={"via": "session"})

    def _session_claims(self, value: str, fresh: bool) -> dict[str, Any]:
        keys = keyring_for(self._context.config).session_keys
        try:
            claims = verify(keys, value, fresh=fresh)
        except InvalidValue as exc:
            what = "has expired" if str(exc) == "expired" else "is not valid"
            raise Unauthenticated(f"the session {what}", detail=f"session {exc}") from None
        # Sessions of another ip_key authenticator (another policy) are not ours, though signed alike.
        if claims.get("a") != self.name or not isinstance(claims.get("sub"), str):
            raise Unauthenticated("the session is not valid", detail="session of another authenticator")
        return claims

    @staticmethod
    def _check_address(bound: Any, request: RequestView, message: str) -> None:
        if bound is None:
            return
        try:
            same = canonical_ip(request.client_ip) == bound
        except ValueError:
            same = False
        if not same:
            raise Unauthenticated(message, detail="ip mismatch")

    def _check_client(self, client: str) -> None:
        # The seed's "module disabled for the client": a client removed from the configuration takes its keys along.
        if client not in self._context.policy.clients:
            raise Unauthenticated("the key's client is no longer allowed", detail="client removed")

    def response_headers(self, identity: Identity, request: RequestView) -> Sequence[tuple[bytes, bytes]]:
        """After a good key: the session cookie, so the user's next requests need no key."""
        if not self.config.session_cookie or identity.claims.get("via") != "key":
            return []
        claims = {"a": self.name, "sub": identity.subject, "c": identity.client,
                  "exp": int(time.time() + self.config.session_ttl), "i": identity.claims.get("ip"),
                  "l": identity.claims.get("url_logout")}
        value = sign(keyring_for(self._context.config).session_keys[0], {k: v for k, v in claims.items() if v})
        return [(b"set-cookie", self._cookie(value).encode("ascii"))]

    def _cookie(self, value: str, clear: bool = False) -> str:
        # No Max-Age: a browser-session cookie, gone when the browser closes (seed 001); the expiry is inside.
        cookie = f"{self.config.session_cookie}={value}; Path=/; HttpOnly; SameSite=Lax"
        if clear:
            cookie += "; Max-Age=0"
        return cookie + ("; Secure" if self.config.secure_cookie else "")

    def _logout(self, value: str) -> LoggedOut:
        location = self.config.logout_redirect
        if value:
            try:
                # An expired session still names where to go; only its signature matters here.
                location = self._session_claims(value, fresh=False).get("l") or location
            except Unauthenticated:
                pass
        return LoggedOut(quote(location, safe=_URL_SAFE), self._cookie("", clear=True))


__all__ = ["IpKeyAuthenticator", "IpKeyConfig", "LoggedOut"]
