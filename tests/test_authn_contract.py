"""The authenticator contract (sidecar/authn/base.py): credentials are typed values, read and size-checked in one
place, and the verdict cache keys on a hash of the authenticator's configuration and the credential, never on
the credential itself. In-process: these are the small tables beside the end-to-end tests."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from sidecar.authn.base import MAX_CREDENTIAL_LENGTH, Credential, read_first
from sidecar.config.types import parse_source
from sidecar.errors import BadRequest, Unauthenticated
from sidecar.proxy.request_view import RequestView
from sidecar.proxy.verdict_cache import cache_key

FINGERPRINT = hashlib.sha256(b"an authenticator's configuration").digest()
SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"


def request(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> RequestView:
    return RequestView("GET", "/", query, headers, "localhost", "http", "127.0.0.1", "127.0.0.1", "rid")


@pytest.mark.parametrize(("credential", "hashed"), [
    (Credential("token", "eyJ.a.b"), b"eyJ.a.b"),
    (Credential("session cookie", "caf\u00e9"), "caf\u00e9".encode()),
    (Credential("token", "eyJ.a.b", client_id="42"), b"42\x00eyJ.a.b"),
    (Credential("token", "eyJ.a.b", client_id=""), b"\x00eyJ.a.b"),
])
def test_cache_key_is_a_hash_of_fingerprint_and_credential(credential: Credential, hashed: bytes) -> None:
    """The key is sha256(fingerprint, NUL, [client id, NUL,] value), as before credentials were typed."""
    assert cache_key(FINGERPRINT, credential) == hashlib.sha256(FINGERPRINT + b"\x00" + hashed).digest()


def test_same_token_under_another_client_id_is_another_key() -> None:
    """client_jwt: a verdict is for the (client id, token) pair, so another id is verified afresh."""
    keys = {cache_key(FINGERPRINT, Credential("token", "t", client_id=cid)) for cid in ("1", "2", None)}
    assert len(keys) == 3


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"authorization", b"Bearer abc")], Credential("token", "abc", parse_source("header:Authorization"))),
    ([(b"authorization", b"Bearer   ")], None),  # blank: no credential, the next authenticator is tried
    ([(b"authorization", b"Basic abc")], None),  # another scheme: not a credential of this kind
    ([(b"x-client-token", b"sct_1")], Credential("token", "sct_1", parse_source("header:X-Client-Token"))),
    ([], None),
])
def test_read_first_gives_a_typed_credential(headers: list[tuple[bytes, bytes]], expected: Credential | None) -> None:
    """The first source with a non-blank value gives the credential, with its kind and where it was read."""
    sources = (parse_source("header:X-Client-Token"), parse_source("header:Authorization"))
    assert read_first(request(headers), sources, "token") == expected


@pytest.mark.parametrize(("kind", "limit", "length", "refused"), [
    ("client token", MAX_CREDENTIAL_LENGTH, MAX_CREDENTIAL_LENGTH, False),
    ("client token", MAX_CREDENTIAL_LENGTH, MAX_CREDENTIAL_LENGTH + 1, True),
    ("token", 8192, 8193, True),
    ("key", None, 50_000, False),
])
def test_oversized_credential_is_refused_where_it_is_read(kind: str, limit: int | None, length: int,
                                                          refused: bool) -> None:
    """One guard for every authenticator: longer than its limit is 401 invalid_token, named by the kind."""
    view = request([(b"x-client-token", b"x" * length)])
    sources = (parse_source("header:X-Client-Token"),)
    if not refused:
        assert read_first(view, sources, kind, max_length=limit) is not None  # type: ignore[arg-type]
        return
    with pytest.raises(Unauthenticated) as caught:
        read_first(view, sources, kind, max_length=limit)  # type: ignore[arg-type]
    assert (caught.value.description, caught.value.detail) == (f"the {kind} is too large", "oversized")


def test_two_copies_are_refused() -> None:
    """Two copies of the credential in one place: 400 (proxies and backends disagree on which one wins)."""
    view = request([(b"x-client-token", b"a"), (b"x-client-token", b"b")])
    with pytest.raises(BadRequest):
        read_first(view, (parse_source("header:X-Client-Token"),), "client token")


def test_nothing_reads_authenticator_members_with_getattr() -> None:
    """Every member the gateway, cache and runtime read is declared on the Authenticator protocol: no getattr."""
    found = []
    for path in SIDECAR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in ("auth", "a", "authenticator")
                    and "config" not in path.name and path.parent.name != "config"):
                found.append(f"{path.relative_to(SIDECAR)}:{node.lineno}")
    assert found == []
