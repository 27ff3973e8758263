"""`anonymous`: always accepts, subject `anonymous`."""

from __future__ import annotations

from typing import Literal

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint
from sidecar.config.types import Model, Source
from sidecar.proxy.request_view import RequestView


class AnonymousConfig(Model):
    type: Literal["anonymous"]
    subject: str = "anonymous"


_NOTHING = Credential("anonymous", "")


class AnonymousAuthenticator(AuthenticatorBase):
    __slots__ = ("_identity", "fingerprint", "name")
    sources: tuple[Source, ...] = ()

    def __init__(self, name: str, config: AnonymousConfig, context: AuthnContext) -> None:
        self.name = name
        self.fingerprint = fingerprint(name, config)
        self._identity = Identity(subject=config.subject, authenticator=name)

    def credential(self, request: RequestView) -> Credential | None:
        return _NOTHING

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        return self._identity
