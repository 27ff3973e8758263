"""IP-bound keys (seed 001 "generateMapToken", SPEC §3 `ip_key`, §6 keys): issued by `POST /_sidecar/keys`, used as
`?key=`, followed by a session cookie; refused when tampered, expired, from another address, or reused."""

from __future__ import annotations

import hashlib
import json
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from conftest import error_body
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import running_sidecar

SECRET = "test-keys-secret-0123456789abcdef-0123456789"
CLIENT_TOKEN = new_token()
CLIENT_SECRET = "partner-secret-0123456789"
OTHER_IP = "203.0.113.7"


def config(upstream: str, redis: str | None = None, **top: object) -> str:
    return json.dumps({
        "version": 1,
        "upstream": upstream,
        "redis": redis,
        "keys": {"secret": SECRET},
        "authenticators": {
            "portal_key": {"type": "ip_key", "session_cookie": "portal_sess", "logout_path": "/pub/logout"},
        },
        "clients": [{"id": "01400-2", "name": "Editora X", "tokens": [f"sha256:{token_hash(CLIENT_TOKEN)}"],
                     "secret": "sha256:" + hashlib.sha256(CLIENT_SECRET.encode()).hexdigest()}],
        "routes": [{"id": "publications", "match": {"path": "/pub/**"}, "auth": ["portal_key"]}],
        **top,
    })


@pytest.fixture
def sidecar(upstream, redis_url):  # noqa: F811
    with running_sidecar(config(upstream.url, redis_url)) as sc:
        yield sc


def issue(sc, **fields) -> str:
    response = httpx.post(sc.url + "/_sidecar/keys", json=fields, headers={"X-Client-Token": CLIENT_TOKEN})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert set(response.json()) == {"key"}
    return response.json()["key"]


def session_cookie(response: httpx.Response) -> str:
    return response.headers["set-cookie"].split(";", 1)[0]


def test_key_for_loopback_logs_in_and_never_reaches_upstream(sidecar, upstream):
    """A key for 127.0.0.1 lets the user in; the upstream gets the other parameters, not `key`, and the key's user."""
    key = issue(sidecar, user="joao", ip="127.0.0.1")
    assert key.startswith("ab_") and len(key) < 300
    response = httpx.get(f"{sidecar.url}/pub/revista/?page=2&key={key}&lang=pt")
    assert response.status_code == 200
    got = upstream.last
    assert got.path == "/pub/revista/"
    assert got.query == "page=2&lang=pt"
    assert got.header("x-auth-subject") == "joao"
    assert got.header("x-auth-client") == "01400-2"
    assert got.header("x-auth-method") == "portal_key"
    assert key not in json.dumps(got.headers)
    name, _, value = session_cookie(response).partition("=")
    assert name == "portal_sess" and value.startswith("v1.")
    assert response.headers["set-cookie"] == f"portal_sess={value}; Path=/; HttpOnly; SameSite=Lax; Secure"


def test_session_cookie_alone_authenticates_and_is_never_forwarded(sidecar, upstream):
    """After the key, the session cookie alone lets the user in; the upstream sees the other cookies only."""
    key = issue(sidecar, user="joao", ip="127.0.0.1", single_use=True)
    cookie = session_cookie(httpx.get(f"{sidecar.url}/pub/revista/?key={key}"))
    response = httpx.get(f"{sidecar.url}/pub/revista/page/3", headers={"Cookie": f"theme=dark; {cookie}; lang=pt"})
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    got = upstream.last
    assert got.path == "/pub/revista/page/3"
    assert got.header("cookie") == "theme=dark; lang=pt"
    assert got.header("x-auth-subject") == "joao"
    assert got.header("x-auth-client") == "01400-2"


def test_key_in_a_form_post_is_accepted_and_removed(sidecar, upstream):
    """The seed's long links go as POST: the form field `key` works and is removed from the forwarded body."""
    key = issue(sidecar, user="joao", expiry_minutes=5)
    response = httpx.post(f"{sidecar.url}/pub/revista/", data={"edition": "12", "key": key})
    assert response.status_code == 200
    assert upstream.last.body == b"edition=12"
    assert upstream.last.header("x-auth-subject") == "joao"


@pytest.mark.parametrize("headers", [
    {},
    {"X-Forwarded-For": OTHER_IP},
    {"X-Real-IP": OTHER_IP},
    {"Forwarded": f"for={OTHER_IP}"},
    {"X-Forwarded-For": OTHER_IP, "X-Real-IP": OTHER_IP, "Forwarded": f"for={OTHER_IP}"},
])
def test_key_bound_to_another_ip_is_refused_whatever_an_untrusted_peer_claims(sidecar, upstream, headers):
    """A key for another address is refused; forwarding headers from an untrusted peer change nothing."""
    key = issue(sidecar, user="joao", ip=OTHER_IP)
    response = httpx.get(f"{sidecar.url}/pub/revista/?key={key}", headers=headers)
    body = error_body(response, 401, "invalid_token")
    assert body["error_description"] == "the key was issued for another address"
    assert "set-cookie" not in response.headers
    assert upstream.received == []


def test_trusted_proxy_naming_the_bound_ip_is_believed(upstream):
    """Behind a trusted proxy (127.0.0.0/8) the X-Forwarded-For address is the client's; a forged left entry is not."""
    with running_sidecar(config(upstream.url, trusted_proxies=["127.0.0.0/8"])) as sc:
        key = issue(sc, user="joao", ip=OTHER_IP)
        spoofed = httpx.get(f"{sc.url}/pub/a?key={key}", headers={"X-Forwarded-For": f"{OTHER_IP}, 198.51.100.9"})
        error_body(spoofed, 401, "invalid_token")
        assert upstream.received == []
        response = httpx.get(f"{sc.url}/pub/a?key={key}", headers={"X-Forwarded-For": OTHER_IP})
        assert response.status_code == 200
        assert upstream.last.header("x-auth-subject") == "joao"
        cookie = session_cookie(response)
        # The session stays bound to the key's address.
        moved = httpx.get(f"{sc.url}/pub/b", headers={"Cookie": cookie, "X-Forwarded-For": "198.51.100.9"})
        assert error_body(moved, 401, "invalid_token")["error_description"] == "the session belongs to another address"
        same = httpx.get(f"{sc.url}/pub/b", headers={"Cookie": cookie, "X-Forwarded-For": OTHER_IP})
        assert same.status_code == 200


def tampered(key: str) -> str:
    middle = len(key) // 2
    return key[:middle] + ("A" if key[middle] != "A" else "B") + key[middle + 1:]


@pytest.mark.parametrize("make", [tampered, lambda key: key + "x", lambda key: "ab_" + "0" * 80,
                                  lambda key: "garbage", lambda key: key[:-1]])
def test_tampered_or_garbage_key_is_401(sidecar, upstream, make):
    """A key changed in any way, or not one of ours, is refused with 401 and never echoed."""
    bad = make(issue(sidecar, user="joao", ip="127.0.0.1"))
    response = httpx.get(f"{sidecar.url}/pub/revista/", params={"key": bad})
    body = error_body(response, 401, "invalid_token")
    assert body["error_description"] == "the key is not valid"
    assert bad not in response.text
    assert upstream.received == []


def test_empty_key_is_no_key(sidecar, upstream):
    """`?key=` with nothing is no key at all (SPEC §3): 401 missing_credentials."""
    error_body(httpx.get(f"{sidecar.url}/pub/revista/?key="), 401, "missing_credentials")
    assert upstream.received == []


def test_no_key_is_401(sidecar, upstream):
    """No key and no session cookie: 401 missing_credentials."""
    error_body(httpx.get(f"{sidecar.url}/pub/revista/"), 401, "missing_credentials")
    assert upstream.received == []


def test_tampered_session_cookie_is_401(sidecar, upstream):
    """A session cookie changed by the browser's user is refused."""
    key = issue(sidecar, user="joao", ip="127.0.0.1")
    cookie = session_cookie(httpx.get(f"{sidecar.url}/pub/a?key={key}"))
    upstream.received.clear()
    response = httpx.get(f"{sidecar.url}/pub/b", headers={"Cookie": tampered(cookie)})
    assert error_body(response, 401, "invalid_token")["error_description"] == "the session is not valid"
    assert upstream.received == []


def test_expired_key_is_401(sidecar, upstream):
    """A key whose expiry_minutes (counted from simple_date) has passed is refused."""
    started = int(time.time()) - 56  # so the one-minute key has four seconds left
    key = issue(sidecar, user="joao", expiry_minutes=1, simple_date=datetime.fromtimestamp(started, UTC).isoformat())
    assert httpx.get(f"{sidecar.url}/pub/a?key={key}").status_code == 200
    time.sleep(max(0.0, started + 60 - time.time() + 0.5))
    body = error_body(httpx.get(f"{sidecar.url}/pub/a?key={key}"), 401, "invalid_token")
    assert body["error_description"] == "the key has expired"
    assert len(upstream.received) == 1


def test_single_use_key_works_once(sidecar, upstream):
    """A single-use key lets the user in once; the second use is refused."""
    key = issue(sidecar, user="joao", expiry_minutes=5, single_use=True)
    assert httpx.get(f"{sidecar.url}/pub/a?key={key}").status_code == 200
    body = error_body(httpx.get(f"{sidecar.url}/pub/a?key={key}"), 401, "invalid_token")
    assert body["error_description"] == "the key has already been used"
    assert len(upstream.received) == 1


def test_single_use_key_used_20_times_in_parallel_wins_once(sidecar, upstream):
    """Twenty concurrent uses of one single-use key: exactly one 200 (marked atomically in Redis)."""
    key = issue(sidecar, user="joao", ip="127.0.0.1", single_use=True)
    with httpx.Client() as client, ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: client.get(f"{sidecar.url}/pub/a?key={key}").status_code, range(20)))
    assert sorted(statuses) == [200] + [401] * 19
    assert len(upstream.received) == 1


def test_single_use_is_shared_by_replicas(upstream, redis_url):  # noqa: F811
    """Two sidecars sharing Redis and keys.secret: a single-use key spent on one is refused by the other."""
    text = config(upstream.url, redis_url)
    with running_sidecar(text) as one, running_sidecar(text) as two:
        key = issue(one, user="joao", expiry_minutes=5, single_use=True)
        assert httpx.get(f"{two.url}/pub/a?key={key}").status_code == 200
        error_body(httpx.get(f"{one.url}/pub/a?key={key}"), 401, "invalid_token")


SOAP_ATTRIBUTES = """<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:ws="http://ws.maven.com.br/">
  <soapenv:Body>
    <ws:generateMapToken>
      <entry key="user" value="maria"/>
      <entry key="ip" value="127.0.0.1"/>
      <entry key="url_logout" value="https://portal.example/sair"/>
    </ws:generateMapToken>
  </soapenv:Body>
</soapenv:Envelope>"""

SOAP_JAXWS = """<S:Envelope xmlns:S="http://schemas.xmlsoap.org/soap/envelope/"><S:Body>
<ns2:generateMapToken xmlns:ns2="http://ws.maven.com.br/"><arg0>
<entry><key>user</key><value>maria</value></entry>
<entry><key>expiry_minutes</key><value>7</value></entry>
<entry><key>simple_date</key><value>{date}</value></entry>
</arg0></ns2:generateMapToken></S:Body></S:Envelope>"""


@pytest.mark.parametrize("envelope", [SOAP_ATTRIBUTES, SOAP_JAXWS])
def test_soap_generate_map_token_gives_a_key_that_works(sidecar, upstream, envelope):
    """The seed's SOAP `generateMapToken` envelope is answered with a SOAP envelope holding a working key."""
    envelope = envelope.replace("{date}", datetime.now().strftime("%Y-%m-%d %H:%M"))
    response = httpx.post(sidecar.url + "/_sidecar/keys", content=envelope,
                          headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
                          auth=("01400-2", CLIENT_SECRET))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/xml; charset=utf-8"
    root = ET.fromstring(response.content)
    reply = root.find("{http://schemas.xmlsoap.org/soap/envelope/}Body/{http://ws.maven.com.br/}generateMapTokenResponse")
    assert reply is not None
    key = reply.findtext("return")
    assert key is not None and key.startswith("ab_")
    assert httpx.get(f"{sidecar.url}/pub/revista/?key={key}").status_code == 200
    assert upstream.last.header("x-auth-subject") == "maria"


def test_soap_with_a_doctype_is_refused(sidecar):
    """A SOAP request declaring a DTD (entity expansion, XXE) is refused with a Fault, before any key is made."""
    evil = ('<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
            '<generateMapToken><entry key="user" value="&lol2;"/><entry key="ip" value="127.0.0.1"/>'
            "</generateMapToken></soapenv:Body></soapenv:Envelope>")
    response = httpx.post(sidecar.url + "/_sidecar/keys", content=evil, headers={"Content-Type": "text/xml"},
                          auth=("01400-2", CLIENT_SECRET))
    assert response.status_code == 500  # SOAP 1.1 §6.2: faults travel with 500
    fault = ET.fromstring(response.content).find("{http://schemas.xmlsoap.org/soap/envelope/}Body/"
                                                 "{http://schemas.xmlsoap.org/soap/envelope/}Fault")
    assert fault is not None
    assert fault.findtext("faultcode") == "soap:Client"
    assert fault.findtext("faultstring") == "document type declarations and entities are not accepted"
    assert "ab_" not in response.text


@pytest.mark.parametrize("headers", [
    {},
    {"X-Client-Token": "sct_unknown"},
    {"Authorization": "Bearer sct_unknown"},
    {"Authorization": "Basic " + "MDE0MDAtMjp3cm9uZw=="},  # 01400-2:wrong
    {"Authorization": "Basic " + "bm9ib2R5Om5vdGhpbmc="},  # nobody:nothing
])
def test_key_endpoint_without_valid_client_credentials_is_401(sidecar, headers):
    """Issuing a key needs the client's access token or its id and secret; otherwise 401 invalid_client."""
    response = httpx.post(sidecar.url + "/_sidecar/keys", json={"user": "joao", "ip": "127.0.0.1"}, headers=headers)
    body = error_body(response, 401, "invalid_client")
    assert "key" not in body
    assert response.headers["www-authenticate"] == 'Basic realm="sidecar"'


@pytest.mark.parametrize("auth", ["token", "bearer", "basic", "blank_token_then_bearer", "blank_token_then_basic"])
def test_key_endpoint_accepts_each_client_credential(sidecar, upstream, auth):
    """X-Client-Token, Authorization: Bearer and HTTP Basic id/secret all authenticate the client; a blank
    X-Client-Token is no token, so the next method is used."""
    bearer = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    headers = {"token": {"X-Client-Token": CLIENT_TOKEN}, "bearer": bearer, "basic": {},
               "blank_token_then_bearer": {"X-Client-Token": "", **bearer},
               "blank_token_then_basic": {"X-Client-Token": ""}}[auth]
    response = httpx.post(sidecar.url + "/_sidecar/keys", json={"user": "ana", "expiry_minutes": 3}, headers=headers,
                          auth=("01400-2", CLIENT_SECRET) if auth.endswith("basic") else None)
    assert response.status_code == 200
    assert httpx.get(f"{sidecar.url}/pub/a?key={response.json()['key']}").status_code == 200
    assert upstream.last.header("x-auth-subject") == "ana"


@pytest.mark.parametrize(("fields", "description"), [
    ({"ip": "127.0.0.1"}, "user is required: the login the key stands for"),
    ({"user": "joao"}, "give ip and/or expiry_minutes: a key must be bound to an address, a lifetime, or both"),
    ({"user": "joao", "ip": "200.300.400.500"}, "ip is not an IP address (IPv4 such as 200.10.1.2, or IPv6)"),
    ({"user": "joao", "expiry_minutes": 0},
     "expiry_minutes must be a whole number of minutes from 1 to 527040"),
    ({"user": "joao", "ip": "127.0.0.1", "url_logout": "javascript:alert(1)"},
     "url_logout must be an absolute http(s) URL of at most 2048 characters"),
    ({"user": "joao", "ip": "127.0.0.1", "module": "x"},
     "unknown field(s) module; use user, ip, expiry_minutes, simple_date, url_logout, single_use"),
])
def test_key_endpoint_refuses_incomplete_requests_with_400(sidecar, fields, description):
    """A key needs a user and an address or a lifetime: 400 invalid_request saying what to fix."""
    response = httpx.post(sidecar.url + "/_sidecar/keys", json=fields, headers={"X-Client-Token": CLIENT_TOKEN})
    assert error_body(response, 400, "invalid_request")["error_description"] == description


def test_key_issued_event_never_holds_the_key(sidecar):
    """`key.issued` says who, for whom, single use and expiry — never the key."""
    events: list[tuple[str, dict]] = []

    async def sink(event: str, data: dict) -> None:
        events.append((event, data))

    sidecar.services.events.add_sink(sink)
    key = issue(sidecar, user="joao", ip="127.0.0.1", single_use=True)
    issue(sidecar, user="ana", expiry_minutes=10)
    assert events[0] == ("key.issued", {"client": "01400-2", "user": "joao", "single_use": True, "expires_at": None})
    event, data = events[1]
    assert event == "key.issued"
    assert set(data) == {"client", "user", "single_use", "expires_at"} and data["user"] == "ana"
    expires = datetime.fromisoformat(data["expires_at"]).timestamp()
    assert abs(expires - (time.time() + 600)) < 5
    assert key not in json.dumps(events)


def test_logout_clears_the_session_and_goes_to_url_logout(sidecar, upstream):
    """The logout path clears the session cookie and redirects to the key's url_logout; the upstream is not called."""
    key = issue(sidecar, user="joao", ip="127.0.0.1", url_logout="https://portal.example/sair?from=pub")
    cookie = session_cookie(httpx.get(f"{sidecar.url}/pub/a?key={key}"))
    upstream.received.clear()
    response = httpx.get(f"{sidecar.url}/pub/logout", headers={"Cookie": cookie})
    assert response.status_code == 303
    assert response.headers["location"] == "https://portal.example/sair?from=pub"
    assert response.headers["set-cookie"] == "portal_sess=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Secure"
    assert upstream.received == []
    anonymous = httpx.get(f"{sidecar.url}/pub/logout")
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/"


def test_no_key_or_cookie_in_the_audit_log(upstream, capsys):
    """The audit lines of issuing and using a key hold neither the key nor the session cookie."""
    with running_sidecar(config(upstream.url)) as sc:  # started here, so its audit log writes to capsys
        key = issue(sc, user="joao", ip="127.0.0.1")
        cookie = session_cookie(httpx.get(f"{sc.url}/pub/a?key={key}"))
        httpx.get(f"{sc.url}/pub/a", headers={"Cookie": cookie})
        httpx.get(f"{sc.url}/pub/a?key={tampered(key)}")
        sc.services.audit.flush()
        out = capsys.readouterr().out
    assert out.count('"subject":"joao"') == 3
    assert key not in out and tampered(key) not in out and cookie.split("=", 1)[1] not in out


def test_check_warns_without_keys_secret(tmp_path):
    """Without keys.secret, `sidecar check` warns that keys die with the process."""
    import subprocess
    import sys

    text = json.loads(config("http://127.0.0.1:9"))
    del text["keys"]
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(text))
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "keys.secret is not set" in result.stderr
