"""`anonymous`: always accepts, subject `anonymous`."""

from __future__ import annotations

from typing import Any, Literal

from sidecar.authn.base import Identity, fingerprint
from sidecar.config.types import Model, Source
from sidecar.proxy.request_view import RequestView


class AnonymousConfig(Model):
    type: Literal["anonymous"]
    subject: str = "anonymous"


class AnonymousAuthenticator:
    __slots__ = ("_identity", "fingerprint", "name")
    sources: tuple[Source, ...] = ()
    needs_body = False
    cacheable = False
    bearer = False

    def __init__(self, name: str, config: AnonymousConfig, services: Any) -> None:
        self.name = name
        self.fingerprint = fingerprint(name, config)
        self._identity = Identity(subject=config.subject, method=name)

    def credential(self, request: RequestView) -> str | None:
        return ""

    async def verify(self, credential: str, request: RequestView) -> Identity:
        return self._identity
