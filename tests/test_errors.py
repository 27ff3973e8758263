"""The error tree (sidecar/errors.py), its one JSON renderer, and the one mapping of httpx failures onto it."""

from __future__ import annotations

import json

import httpx
import pytest

from sidecar.errors import (
    BadRequest,
    DependencyUnavailable,
    LoggedOut,
    MissingCredentials,
    OAuthError,
    Refusal,
    ShuttingDown,
    SoapError,
    Unavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from sidecar.outbound.httpx_errors import HttpxErrors

UPSTREAM = HttpxErrors(UpstreamUnavailable, "unreachable", timeout=UpstreamTimeout, timeout_message="too slow")
SERVICE = HttpxErrors(DependencyUnavailable, "service down", detail=True)


@pytest.mark.parametrize(("refusal", "decision"), [
    (BadRequest(), "deny"), (MissingCredentials(), "deny"), (OAuthError("invalid_grant", "no"), "deny"),
    (SoapError("bad XML"), "deny"), (LoggedOut("/", "s=; Max-Age=0"), "deny"),
    (UpstreamUnavailable(), "error"), (DependencyUnavailable(), "error"), (UpstreamTimeout(), "error"),
    (ShuttingDown(), "error"),
])
def test_failures_of_the_sidecar_side_are_errors_and_the_callers_are_denials(refusal: Refusal, decision: str) -> None:
    """502/503/504 form the `Unavailable` branch, audited `error`; every other refusal is a `deny`."""
    assert refusal.decision == decision
    assert isinstance(refusal, Unavailable) == (decision == "error")


def test_one_renderer_gives_every_json_error_body() -> None:
    """The gateway's, the OAuth endpoints' and a dependency failure's bodies are all `error_body`."""
    assert json.loads(error_body("invalid_token", "é")) == {"error": "invalid_token", "error_description": "é"}
    for refusal in (MissingCredentials("none"), OAuthError("invalid_client", "who?", 401), DependencyUnavailable("x")):
        assert refusal.body() == error_body(refusal.reason, refusal.description)


def test_oauth_errors_keep_their_rfc_6749_headers() -> None:
    """An OAuth error is no-store and no-cache (RFC 6749 §5.1); invalid_client (401) challenges for HTTP Basic."""
    unauthorised = dict(OAuthError.invalid_client().headers())
    assert unauthorised[b"www-authenticate"] == b'Basic realm="sidecar"'
    assert (unauthorised[b"cache-control"], unauthorised[b"pragma"]) == (b"no-store", b"no-cache")
    assert b"www-authenticate" not in dict(OAuthError("invalid_grant", "no").headers())
    down = OAuthError.of(DependencyUnavailable("redis"), "temporarily_unavailable")
    assert (down.status, down.reason, down.decision) == (503, "temporarily_unavailable", "error")


@pytest.mark.parametrize(("raised", "mapper", "expected", "description", "detail"), [
    (httpx.ConnectError("refused"), UPSTREAM, UpstreamUnavailable, "unreachable", ""),
    (httpx.ReadTimeout("slow"), UPSTREAM, UpstreamTimeout, "too slow", ""),
    (TimeoutError(), UPSTREAM, UpstreamTimeout, "too slow", ""),
    (ConnectionResetError(), UPSTREAM, UpstreamUnavailable, "unreachable", ""),
    (httpx.RemoteProtocolError("bad"), SERVICE, DependencyUnavailable, "service down", "RemoteProtocolError"),
    (httpx.PoolTimeout("full"), SERVICE, DependencyUnavailable, "service down", "timeout"),
])
def test_httpx_failures_map_onto_the_unavailable_branch(
    raised: Exception, mapper: HttpxErrors, expected: type[Refusal], description: str, detail: str,
) -> None:
    """A timeout becomes the timeout error, any other httpx or socket failure the unavailable one, unchained."""
    with pytest.raises(expected) as caught, mapper:
        raise raised
    assert (caught.value.description, caught.value.detail) == (description, detail)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_other_exceptions_pass_through_the_mapping() -> None:
    """Only httpx and socket failures are mapped: a refusal or a bug raised inside keeps its own type."""
    with pytest.raises(ValueError), UPSTREAM:
        raise ValueError("a bug")
    with pytest.raises(BadRequest), SERVICE:
        raise BadRequest("the caller's fault")
