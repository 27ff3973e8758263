"""`cookie`: a named cookie set by the customer's portal on the same domain (seed 001, "Cookie Session"),
checked in one of three ways:

- `revalidate:` — a `remote` block: the portal's service says whether the cookie's value is still good
  (verdicts cached by the gateway, as for `remote`);
- `signed:` — the portal signs the value with a shared secret, the expiry inside (format in
  `sidecar.authn.hmac_values`: `v1.<base64url JSON>.<base64url HMAC-SHA256>`);
- `existence_only: true` — any non-empty value is accepted. Anyone can set a cookie, so this proves nothing;
  it must be asked for explicitly and `sidecar check` warns about it.

Only the named cookie is removed before forwarding; the request's other cookies pass untouched."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint, read_first
from sidecar.authn.hmac_values import InvalidValue, verify
from sidecar.authn.remote import identity_from, pseudonymous_subject
from sidecar.authn.remote_check import RemoteCheck, check
from sidecar.config.types import Duration, Model, Source, parse_source
from sidecar.errors import Unauthenticated
from sidecar.proxy.request_view import RequestView
from sidecar.timestamps import timestamp


class SignedCookie(Model):
    secret: str | list[str]
    subject_claim: str = "sub"
    leeway: Duration = 0.0

    def secrets(self) -> list[bytes]:
        return [s.encode() for s in ([self.secret] if isinstance(self.secret, str) else self.secret)]


class CookieConfig(Model):
    type: Literal["cookie"]
    name: str
    revalidate: RemoteCheck | None = None
    signed: SignedCookie | None = None
    existence_only: bool = False

    @model_validator(mode="after")
    def _one_check(self) -> CookieConfig:
        if sum((self.revalidate is not None, self.signed is not None, self.existence_only)) != 1:
            raise ValueError("give exactly one of revalidate: {url: ...}, signed: {secret: ...} or "
                             "existence_only: true")
        if not self.name or any(c in self.name for c in " ;,=\t\r\n"):
            raise ValueError(f"{self.name!r} is not a cookie name")
        return self

    def warnings(self) -> list[str]:
        if self.existence_only:
            return [f"cookie {self.name!r} is accepted on existence only: anyone can set a cookie, so this "
                    "authenticates nobody; prefer revalidate: or signed:"]
        if self.signed is not None and any(len(s) < 32 for s in self.signed.secrets()):
            return ["the signed cookie secret is shorter than 32 bytes: it can be brute-forced"]
        return self.revalidate.warnings() if self.revalidate is not None else []


class CookieAuthenticator(AuthenticatorBase):
    def __init__(self, name: str, config: CookieConfig, context: AuthnContext) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        self.sources: tuple[Source, ...] = (parse_source(f"cookie:{config.name}"),)
        # Only a webservice's verdict is worth caching; HMAC and existence checks cost less than a lookup.
        self.cacheable = config.revalidate is not None
        self.shared_cache = self.cacheable  # a revalidation is an outside call: share its verdict
        if config.revalidate is not None:
            self.cache_ttl = config.revalidate.cache_ttl
            self.negative_ttl = config.revalidate.negative_ttl
        self._keys = config.signed.secrets() if config.signed is not None else []
        self._context = context

    def credential(self, request: RequestView) -> Credential | None:
        return read_first(request, self.sources, "session cookie")

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        value = credential.value
        if self.config.revalidate is not None:
            result = await check(self._context.http, self.config.revalidate, value)
            if not result.accepted:
                raise Unauthenticated("the session is no longer valid", detail=result.message)
            return identity_from(result, self.name, value)
        if self.config.signed is not None:
            return self._signed(value)
        return Identity(subject=pseudonymous_subject(value), authenticator=self.name)

    def _signed(self, credential: str) -> Identity:
        signed = self.config.signed
        assert signed is not None
        try:
            claims = verify(self._keys, credential, leeway=signed.leeway)
        except InvalidValue as exc:
            what = "has expired" if str(exc) == "expired" else "is not validly signed"
            raise Unauthenticated(f"the session cookie {what}", detail=str(exc)) from None
        subject = claims.get(signed.subject_claim)
        if not isinstance(subject, str | int) or isinstance(subject, bool) or not str(subject):
            raise Unauthenticated("the session cookie names no user", detail=f"no {signed.subject_claim}")
        return Identity(subject=str(subject), authenticator=self.name, claims=claims,
                        expires_at=timestamp(claims["exp"]))
