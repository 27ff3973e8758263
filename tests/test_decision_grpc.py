"""Envoy's gRPC ext_authz (`envoy.service.auth.v3.Authorization/Check`) on `--decision-grpc-port` (SPEC §11): real
`CheckRequest` messages from the generated Envoy API (xds-protos) over a real gRPC channel to a real sidecar."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import bearer, config_text, mint
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from test_decision import decision_config

from sidecar.testing import KeyPair, RecordingUpstream, SidecarProcess, free_port, running_sidecar


@pytest.fixture(scope="module")
def check(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[external_auth_pb2_grpc.AuthorizationStub]:
    port = free_port()
    config = config_text(decision_config(shared_upstream.url, idp_keys))
    with running_sidecar(config, decision_grpc=port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)


def check_request(path: str, headers: dict[str, str], method: str = "GET", body: bytes = b"",
                  ) -> external_auth_pb2.CheckRequest:
    """What Envoy's ext_authz filter sends: the downstream request as an AttributeContext (lower-case headers,
    pseudo-headers included, the path with its query)."""
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1234", method=method, path=path, host="app.example", scheme="https", protocol="HTTP/1.1",
        headers={":authority": "app.example", ":path": path, ":method": method, "x-forwarded-proto": "https",
                 "x-request-id": "envoy-grpc-1", **{k.lower(): v for k, v in headers.items()}},
        raw_body=body, size=len(body))
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="198.51.100.7", port_value=40000))),
        request=attribute_context_pb2.AttributeContext.Request(http=http)))


def test_grpc_allow_sets_identity_and_removes_credentials(check: external_auth_pb2_grpc.AuthorizationStub,
                                                          idp_keys: KeyPair) -> None:
    """OK with identity headers set OVERWRITE_IF_EXISTS_OR_ADD, the credential and forged identity headers in
    headers_to_remove and the credential parameter in query_parameters_to_remove."""
    token = mint(idp_keys, sub="alice", scope="read write")
    response = check.Check(check_request(f"/api/x?a=1&access_token={token}", {"X-Auth-Subject": "admin"}))

    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    headers = {option.header.key: option for option in ok.headers}
    assert headers["X-Auth-Subject"].header.value == "alice"
    assert headers["X-Auth-Scopes"].header.value == "read write"
    assert headers["x-request-id"].header.value == "envoy-grpc-1"
    assert {option.append_action for option in ok.headers} == {base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}
    assert set(ok.headers_to_remove) == {"authorization", "x-auth-subject"}
    assert list(ok.query_parameters_to_remove) == ["access_token"]

    by_header = check.Check(check_request("/api/x", bearer(token)))
    assert "authorization" in by_header.ok_response.headers_to_remove
    assert list(by_header.ok_response.query_parameters_to_remove) == []


@pytest.mark.parametrize(("path", "token", "status", "code", "error"), [
    ("/api/x", False, 401, code_pb2.UNAUTHENTICATED, "missing_credentials"),
    ("/scoped/x", True, 403, code_pb2.PERMISSION_DENIED, "insufficient_scope"),
    ("/nowhere", True, 404, code_pb2.PERMISSION_DENIED, "no_route"),
    ("/public/..%2fapi/x", False, 400, code_pb2.PERMISSION_DENIED, "invalid_request"),
    ("/public/..;/api/x", False, 400, code_pb2.PERMISSION_DENIED, "invalid_request"),
])
def test_grpc_deny_carries_proxy_mode_status_and_body(
    check: external_auth_pb2_grpc.AuthorizationStub, idp_keys: KeyPair, path: str, token: bool, status: int,
    code: int, error: str,
) -> None:
    """A refusal is a non-OK check status and a DeniedHttpResponse with proxy mode's status, headers and JSON body."""
    response = check.Check(check_request(path, bearer(mint(idp_keys)) if token else {}))

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
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = stub.Check(check_request("/form/x", {"content-type": "application/x-www-form-urlencoded"},
                                           method="POST", body=body))
        refused = stub.Check(check_request("/form/x", {"content-type": "application/x-www-form-urlencoded"},
                                           method="POST", body=b"x=1"))

    assert allowed.status.code == code_pb2.OK
    assert {o.header.key: o.header.value for o in allowed.ok_response.headers}["X-Auth-Subject"] == "formed"
    assert refused.denied_response.status.code == 401


def test_grpc_port_in_a_worker_process(tmp_path: Path, shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """`sidecar run --decision-grpc-port P` serves Check in the worker process (uvloop), on 127.0.0.1."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(config_text(decision_config(shared_upstream.url, idp_keys)))
    port = free_port()
    with SidecarProcess(path, args=("--decision-grpc-port", str(port))), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(check_request("/api/x", bearer(mint(idp_keys, sub="worker"))), timeout=10)
    assert response.status.code == code_pb2.OK
