"""Outbound safety (SSRF): webhook destinations (hosts partners own) in every spelling of an internal address are
refused unless `allow_private: true`, at `check` time where no DNS is needed and always at call time. URLs the
operator wrote for validators are trusted destinations, internal ones included, unless the validator turns the
same guard on with `allow_private: false`. Validators never follow redirects (SECURITY.md promise 7)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from adversarial_support import StrictUpstream, assert_error, get, strict_upstream, strict_upstream_server  # noqa: F401

from sidecar.config.loader import parse
from sidecar.config.yaml_lines import ConfigError
from sidecar.outbound.guard import GuardedBackend, UnsafeDestination, forbidden_reason, literal_address, url_refusal
from sidecar.testing import running_sidecar, serve_in_thread

INTERNAL = [
    # loopback
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0X7F.1", "0x7f.0.0.1", "0177.0.0.1",
    "00000177.0.0.1", "017700000001", "127.000.000.001", "127.255.255.254", "127.0.0.1.", "::1", "[::1]",
    "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "::ffff:7f00:1", "[::ffff:127.0.0.1]", "0:0:0:0:0:ffff:7f00:0001",
    "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::",
    # unspecified
    "0", "0.0.0.0", "::", "::ffff:0.0.0.0",
    # RFC 1918
    "10.0.0.1", "10.255.255.255", "167772161", "012.0.0.1", "0xa.0.0.1", "172.16.0.1", "172.31.255.254",
    "192.168.0.1", "0xc0a80001", "3232235521", "::ffff:10.0.0.1", "[::ffff:192.168.1.1]",
    # carrier-grade NAT (RFC 6598)
    "100.64.0.1", "100.127.255.254", "1681915905", "::ffff:100.64.0.1",
    # link-local and the metadata service
    "169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "::ffff:169.254.169.254",
    "::ffff:a9fe:a9fe", "fe80::1", "fe80::1%eth0", "[fe80::1]",
    # unique-local, site-local, multicast, documentation, reserved
    "fc00::1", "fd00::1", "fec0::1", "ff02::1", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1", "2001:db8::1", "100::1",
    # the local-use NAT64 prefix (RFC 8215, not globally reachable): 64:ff9b:1:: + 10.0.0.1
    "64:ff9b:1::a00:1",
]
PUBLIC = ["8.8.8.8", "134744072", "0x08080808", "1.1.1.1", "2606:4700:4700::1111", "[2606:4700:4700::1111]",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "93.184.216.34"]


@pytest.mark.parametrize("host", INTERNAL)
def test_every_spelling_of_an_internal_address_is_forbidden(host: str) -> None:
    """Loopback, private, CGNAT, link-local, mapped/NAT64/6to4 IPv6, decimal, hex, octal: all read and refused."""
    ip = literal_address(host)
    assert ip is not None, host
    assert forbidden_reason(ip) is not None, (host, str(ip))
    assert url_refusal(f"https://{host if ':' not in host or host.startswith('[') else '[' + host + ']'}/hook")


@pytest.mark.parametrize("host", PUBLIC)
def test_public_addresses_in_any_spelling_are_allowed(host: str) -> None:
    """The guard is not a blanket refusal: public addresses pass in any spelling."""
    ip = literal_address(host)
    assert ip is not None and forbidden_reason(ip) is None, host


@pytest.mark.parametrize("url", ["http://localhost/x", "http://LOCALHOST:8080/x", "http://a.localhost/x",
                                 "http://localhost./x", "http://user:pw@127.1/x"])
def test_localhost_names_are_refused_without_dns(url: str) -> None:
    """`localhost` and its subdomains are loopback by definition (RFC 6761 §6.3), with or without a trailing dot."""
    assert url_refusal(url) is not None


def test_a_name_with_one_internal_answer_is_refused_at_connect_time() -> None:
    """DNS answering one public and one private address: the connection is refused, not tried on the public one."""
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]

    async def attempt() -> None:
        await GuardedBackend(False, resolve).addresses("mixed.example", 443, 1.0)

    with pytest.raises(UnsafeDestination):
        asyncio.run(attempt())


def test_validator_pinning_refuses_a_name_resolving_to_loopback() -> None:
    """`localhost` as a validator host with the guard on: refused before any connection, naming the setting."""
    async def attempt() -> None:
        await GuardedBackend(False, what="validator").addresses("localhost", 9, 1.0)

    with pytest.raises(UnsafeDestination, match="allow_private: false"):
        asyncio.run(attempt())


def config_with(authenticator: dict[str, Any] | None = None, webhook: dict[str, Any] | None = None) -> str:
    config: dict[str, Any] = {
        "version": 1, "upstream": "http://127.0.0.1:9",
        "authenticators": {"check": authenticator or {"type": "anonymous"}},
        "routes": [{"id": "r", "match": {"path": "/**"}, "auth": ["check"]}],
    }
    if webhook is not None:
        config["webhooks"] = [{"id": "hook", "events": ["auth.refused"],
                               "secret": "whsec_" + "A" * 43 + "=", **webhook}]
    return json.dumps(config)


URLS = ["http://127.0.0.1/x", "http://2130706433/x", "http://0x7f.1/x", "http://[::ffff:127.0.0.1]/x",
        "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/x", "http://10.1.2.3/x", "http://localhost/x"]


@pytest.mark.parametrize("url", URLS)
def test_check_refuses_internal_webhook_urls_unless_allow_private(url: str) -> None:
    """A webhook URL naming an internal address is a config error; `allow_private: true` accepts it."""
    with pytest.raises(ConfigError) as refused:
        parse(config_with(webhook={"url": url}), "f.yaml", {})
    assert any("webhooks[0].url" in error for error in refused.value.errors)
    parse(config_with(webhook={"url": url, "allow_private": True}), "f.yaml", {})


@pytest.mark.parametrize("url", URLS)
def test_check_accepts_internal_validator_urls_unless_the_guard_is_on(url: str) -> None:
    """A `remote` validator URL naming an internal address is accepted (the operator chose it); with
    `allow_private: false` it is a config error, as a webhook's is by default."""
    remote = {"type": "remote", "from": ["query:token"], "url": url}
    parse(config_with(remote), "f.yaml", {})
    with pytest.raises(ConfigError) as refused:
        parse(config_with({**remote, "allow_private": False}), "f.yaml", {})
    assert any("allow_private: false" in error for error in refused.value.errors)


def test_operator_services_on_loopback_work_by_default(tmp_path: Any, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """A `remote` validator, a cookie `revalidate` service and the issuer's `credentials` service at 127.0.0.1,
    none with allow_private: `sidecar check` passes and all three are called; a webhook there is still refused."""
    import subprocess
    import sys

    import httpx

    from sidecar.testing import KeyPair

    calls: list[str] = []

    async def service(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        calls.append(scope["path"])
        body = b'{"status": "OK", "userData": {"login": "maria"}}' if scope["path"] == "/login" else b"1"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(service) as url:
        assert url.startswith("http://127.0.0.1:")
        config = json.loads(remote_sidecar_config(strict_upstream.url, url + "/valida?t={value}", True))
        del config["authenticators"]["check"]["allow_private"]
        config["authenticators"]["session"] = {"type": "cookie", "name": "SID", "revalidate": {"url": url + "/sessao"}}
        config["routes"] = [{"id": "t", "match": {"path": "/t/**"}, "auth": ["check"]},
                            {"id": "c", "match": {"path": "/c/**"}, "auth": ["session"]}]
        config["clients"] = [{"id": "app", "secret": "sha256:" + hashlib.sha256(b"app-secret").hexdigest()}]
        config["issuer"] = {"signing_key": KeyPair().private_pem, "credentials": {"url": url + "/login"}}
        path = tmp_path / "sidecar.yaml"
        path.write_text(json.dumps(config))
        checked = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        assert "plain http" not in checked.stderr  # loopback: the credential does not cross a network
        with running_sidecar(json.dumps(config)) as sc:
            assert get(sc.url, "/t/1?token=abc").status == 200
            assert get(sc.url, "/c/1", [("Cookie", "SID=s1")]).status == 200
            grant = httpx.post(sc.url + "/_sidecar/oauth2/token", auth=("app", "app-secret"),
                               data={"grant_type": "password", "username": "maria", "password": "p"})
            assert grant.status_code == 200, grant.text
    assert calls == ["/valida", "/sessao", "/login"]
    with pytest.raises(ConfigError):
        parse(config_with(webhook={"url": url + "/hooks"}), "f.yaml", {})


@pytest.fixture
def internal() -> Iterator[StrictUpstream]:
    """An internal service a validator could be tricked into calling."""
    app = StrictUpstream()
    with serve_in_thread(app) as url:
        app.url = url
        yield app


def remote_sidecar_config(upstream: str, url: str, allow_private: bool) -> str:
    remote = {"type": "remote", "from": ["query:token"], "url": url, "allow_private": allow_private,
              "timeout": "1s"}
    return json.dumps({"version": 1, "upstream": upstream, "authenticators": {"check": remote},
                       "routes": [{"id": "r", "match": {"path": "/**"}, "auth": ["check"]}]})


@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433", "0x7f.1", "localhost", "[::ffff:127.0.0.1]"])
def test_validator_on_an_internal_address_is_never_called(
    strict_upstream: StrictUpstream, internal: StrictUpstream, spelling: str,  # noqa: F811
) -> None:
    """With the guard on (allow_private: false) the validator call is refused in any spelling: 503, validator and
    upstream untouched."""
    port = internal.url.rsplit(":", 1)[1]
    config = remote_sidecar_config(strict_upstream.url, f"http://{spelling}:{port}/valida?t={{value}}", False)
    try:
        with running_sidecar(config) as sc:
            reply = get(sc.url, "/x?token=abc")
    except ConfigError:
        return  # refused at load: also safe
    assert_error(reply, 503, "dependency_unavailable")
    assert internal.seen == []
    assert strict_upstream.received == []


def test_validator_redirect_is_not_followed(strict_upstream: StrictUpstream, internal: StrictUpstream) -> None:  # noqa: F811
    """A validator answering 302 to an internal URL: 503, the redirect target is never called."""
    calls: list[str] = []

    async def redirecting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", f"{internal.url}/admin/secret?token=abc".encode()),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(redirecting) as validator_url:
        config = remote_sidecar_config(strict_upstream.url, validator_url + "/valida?t={value}", True)
        with running_sidecar(config) as sc:
            reply = get(sc.url, "/x?token=abc")
    assert_error(reply, 503, "dependency_unavailable")
    assert calls == ["/valida"]
    assert internal.seen == []
    assert strict_upstream.received == []


def test_outbound_client_of_a_running_sidecar_follows_no_redirects(strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """The client validators and JWKS fetches share is built without redirect following and without proxy env."""
    config = remote_sidecar_config(strict_upstream.url, "http://127.0.0.1:9/v?t={value}", True)
    with running_sidecar(config) as sc:
        assert sc.services.http.follow_redirects is False
        assert sc.services.http._trust_env is False
        assert sc.services.http.guarded.follow_redirects is False
        assert sc.services.http.guarded._trust_env is False
