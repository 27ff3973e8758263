"""Envoy's gRPC ext_authz (`envoy.service.auth.v3.Authorization/Check`) on `--decision-grpc-port` (SPEC §11): real
`CheckRequest` messages (envoy-data-plane, the grpc extra's Envoy API) in protobuf wire format over a real gRPC channel
to a real sidecar."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import bearer, config_text, mint
from envoy_data_plane.envoy.config.core.v3 import Address, HeaderValueOptionHeaderAppendAction, SocketAddress
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextPeer,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
)
from test_decision import decision_config

from sidecar.testing import KeyPair, RecordingUpstream, SidecarProcess, free_port, running_sidecar

OK, PERMISSION_DENIED, UNAUTHENTICATED = (grpc.StatusCode.OK.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0],
                                          grpc.StatusCode.UNAUTHENTICATED.value[0])
OVERWRITE = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
Check = Callable[..., CheckResponse]


def check_method(channel: grpc.Channel) -> Check:
    """The raw `Check` method on a grpcio channel: the request as protobuf bytes, the answer parsed from them."""
    return channel.unary_unary("/envoy.service.auth.v3.Authorization/Check", request_serializer=bytes,
                               response_deserializer=CheckResponse.parse)


@pytest.fixture(scope="module")
def check(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[Check]:
    port = free_port()
    config = config_text(decision_config(shared_upstream.url, idp_keys))
    with running_sidecar(config, decision_grpc=port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield check_method(channel)


def check_request(path: str, headers: dict[str, str], method: str = "GET", body: bytes = b"") -> CheckRequest:
    """What Envoy's ext_authz filter sends: the downstream request as an AttributeContext (lower-case headers,
    pseudo-headers included, the path with its query)."""
    http = AttributeContextHttpRequest(
        id="1234", method=method, path=path, host="app.example", scheme="https", protocol="HTTP/1.1",
        headers={":authority": "app.example", ":path": path, ":method": method, "x-forwarded-proto": "https",
                 "x-request-id": "envoy-grpc-1", **{k.lower(): v for k, v in headers.items()}},
        raw_body=body, size=len(body))
    return CheckRequest(attributes=AttributeContext(
        source=AttributeContextPeer(address=Address(
            socket_address=SocketAddress(address="198.51.100.7", port_value=40000))),
        request=AttributeContextRequest(http=http)))


def test_grpc_allow_sets_identity_and_removes_credentials(check: Check, idp_keys: KeyPair) -> None:
    """OK with identity headers set OVERWRITE_IF_EXISTS_OR_ADD, the credential and forged identity headers in
    headers_to_remove and the credential parameter in query_parameters_to_remove."""
    token = mint(idp_keys, sub="alice", scope="read write")
    response = check(check_request(f"/api/x?a=1&access_token={token}", {"X-Auth-Subject": "admin"}))

    assert response.status.code == OK
    ok = response.ok_response
    headers = {option.header.key: option for option in ok.headers}
    assert headers["X-Auth-Subject"].header.value == "alice"
    assert headers["X-Auth-Scopes"].header.value == "read write"
    assert headers["x-request-id"].header.value == "envoy-grpc-1"
    assert {option.append_action for option in ok.headers} == {OVERWRITE}
    assert set(ok.headers_to_remove) == {"authorization", "x-auth-subject"}
    assert list(ok.query_parameters_to_remove) == ["access_token"]

    by_header = check(check_request("/api/x", bearer(token)))
    assert "authorization" in by_header.ok_response.headers_to_remove
    assert list(by_header.ok_response.query_parameters_to_remove) == []


@pytest.mark.parametrize(("path", "token", "status", "code", "error"), [
    ("/api/x", False, 401, UNAUTHENTICATED, "missing_credentials"),
    ("/scoped/x", True, 403, PERMISSION_DENIED, "insufficient_scope"),
    ("/nowhere", True, 404, PERMISSION_DENIED, "no_route"),
    ("/public/..%2fapi/x", False, 400, PERMISSION_DENIED, "invalid_request"),
    ("/public/..;/api/x", False, 400, PERMISSION_DENIED, "invalid_request"),
])
def test_grpc_deny_carries_proxy_mode_status_and_body(
    check: Check, idp_keys: KeyPair, path: str, token: bool, status: int, code: int, error: str,
) -> None:
    """A refusal is a non-OK check status and a DeniedHttpResponse with proxy mode's status, headers and JSON body."""
    response = check(check_request(path, bearer(mint(idp_keys)) if token else {}))

    assert response.status.code == code
    denied = response.denied_response
    assert denied.status.code == status
    assert json.loads(denied.body)["error"] == error
    headers = {option.header.key: option.header.value for option in denied.headers}
    assert headers["content-type"] == "application/json"
    if status == 401:
        assert headers["www-authenticate"] == 'Bearer realm="sidecar"'


def test_grpc_reads_body_credentials(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """A route whose authenticator reads a form field decides from the body Envoy sends (with_request_body)."""
    from conftest import jwt_authenticator, make_config, route

    port = free_port()
    config = make_config(shared_upstream.url, {"form_jwt": jwt_authenticator(idp_keys, **{"from": ["form:assertion"]})},
                         [route("form", "/form/**", ["form_jwt"])])
    body = f"assertion={mint(idp_keys, sub='formed')}&x=1".encode()
    with running_sidecar(config_text(config), decision_grpc=port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = check_method(channel)
        allowed = check(check_request("/form/x", {"content-type": "application/x-www-form-urlencoded"},
                                      method="POST", body=body))
        refused = check(check_request("/form/x", {"content-type": "application/x-www-form-urlencoded"},
                                      method="POST", body=b"x=1"))

    assert allowed.status.code == OK
    assert {o.header.key: o.header.value for o in allowed.ok_response.headers}["X-Auth-Subject"] == "formed"
    assert refused.denied_response.status.code == 401


def test_grpc_port_in_a_worker_process(tmp_path: Path, shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """`sidecar run --decision-grpc-port P` serves Check in the worker process (uvloop), on 127.0.0.1."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(config_text(decision_config(shared_upstream.url, idp_keys)))
    port = free_port()
    with SidecarProcess(path, args=("--decision-grpc-port", str(port))), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = check_method(channel)(check_request("/api/x", bearer(mint(idp_keys, sub="worker"))), timeout=10)
    assert response.status.code == OK


def test_grpc_check_without_attributes_is_refused(check: Check) -> None:
    """A CheckRequest with no attributes (every message left out on the wire) is an empty request: refused."""
    response = check(CheckRequest())

    assert response.status.code != OK
    assert response.denied_response.status.code == 400
