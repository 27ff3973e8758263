"""`sidecar test`: executable expectations beside a policy, run fully offline (README "Testing your policies").

Each case is one request driven through the real `Gateway` (sidecar/proxy/gateway.py) as an ASGI app, in
process, on a policy compiled with the offline runtime `sidecar explain` uses (in-memory store and client
tokens): the upstream is a recording transport that answers 200 and keeps what it was sent; validation services
(`remote`, `cookie` `revalidate:`) are answered from the case's `validators:` table. Credentials are declared,
not pasted: JWTs are signed with a test key substituted for the authenticator's keys or JWKS, client tokens
are minted in the in-memory store, IP keys are sealed with the configured secret (or the process's own), and
client JWTs are signed with a test key registered for that client. Nothing is connected: no socket, no Redis.

A tests file:

    policy: maven_webservice.yaml          # relative to this file (`--config` overrides it)
    env: {MAVEN_UPSTREAM: http://backend}  # optional: values for the policy's ${VARIABLES}
    cases:
      - name: a good token reaches the backend
        request: {method: GET, url: "/pub/revista/1?token=tok-1"}
        validators: {valida: {tok-1: "1"}}
        expect: {status: 200, route: publications, upstream: {query: "", headers_absent: [cookie]}}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import httpx
import jwt as pyjwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.authn.base import Authenticator
from sidecar.authn.ip_key_sealing import KeyClaims, keyring_for
from sidecar.config.loader import parse
from sidecar.config.model import LoadedConfig
from sidecar.config.types import parse_duration
from sidecar.config.yaml_lines import ConfigError
from sidecar.errors import Refusal
from sidecar.events import Events
from sidecar.issuer.signing_keys import SigningKeys
from sidecar.ops.audit import AuditLog
from sidecar.ops.metrics import Metrics
from sidecar.outbound.guard import ServiceClient
from sidecar.proxy.explain import Offline, explain
from sidecar.proxy.gateway import Gateway
from sidecar.proxy.rate_limit import RateLimiter
from sidecar.proxy.request_view import RequestView
from sidecar.proxy.route_plans import Policy, RoutePlan
from sidecar.proxy.transports.base import Body, Headers, Upstream
from sidecar.proxy.verdict_cache import VerdictCache
from sidecar.proxy.websocket import Tunnels

CASE_KEYS = {"name", "request", "jwt", "client_token", "ip_key", "client_jwt", "validators", "expect"}
REQUEST_KEYS = {"method", "url", "headers", "query", "cookies", "body", "form", "json", "client_ip", "peer"}
EXPECT_KEYS = {"status", "reason", "decision", "route", "authenticator", "forwarded", "upstream"}
UPSTREAM_KEYS = {"path", "query", "headers", "headers_absent"}
HS_TEST_SECRET = "sidecar-test-hs-secret-0123456789abcdef"


class CaseError(Exception):
    """A case that cannot be run as written (an unknown key, an authenticator that does not exist)."""


# --- what the upstream and the validation services would see ----------------------------------------------------


@dataclass
class Forwarded:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class _Reply:
    status = 200

    def __init__(self) -> None:
        self.headers: Headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]

    async def body(self) -> AsyncIterator[bytes]:
        yield b"ok"

    async def aclose(self) -> None:
        return None


class RecordingTransport:
    """The upstream: keeps what it is sent and answers 200 "ok"."""

    def __init__(self, url: str, sent: list[Forwarded]) -> None:
        self.upstream = Upstream.parse(url)
        self._sent = sent

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> _Reply:
        data = b""
        if isinstance(body, bytes):
            data = body
        elif body is not None:
            data = b"".join([chunk async for chunk in body])
        self._sent.append(Forwarded(method, target.decode("latin-1"),
                                    [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers], data))
        return _Reply()

    async def aclose(self) -> None:
        return None


class DeclaredValidators(ServiceClient):
    """The authenticators' HTTP client, answering validation calls from the case's `validators:` table
    ({authenticator: {credential: reply}}) instead of the network. A reply is the body (a string such as "1",
    or a mapping sent as JSON); a credential the table does not name is answered 500 (a 503 for the request)."""

    def __init__(self, policy_checks: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> None:
        httpx.AsyncClient.__init__(self, transport=httpx.MockTransport(self._answer))
        self.guarded = self
        self._checks = policy_checks
        self._declared = declared
        self.undeclared: list[str] = []

    def _answer(self, request: httpx.Request) -> httpx.Response:
        for name, replies in self._declared.items():
            cfg = self._checks.get(name)
            if cfg is None or not _same_service(cfg.url, str(request.url)):
                continue
            value = _sent_value(cfg, request)
            if value is not None and value in replies:
                reply = replies[value]
                if isinstance(reply, Mapping | list):
                    return httpx.Response(200, json=reply)
                return httpx.Response(200, text=str(reply))
        self.undeclared.append(f"{request.method} {request.url.copy_with(query=None)}")
        return httpx.Response(500, text="no reply is declared for this credential (validators:)")


def _same_service(configured: str, called: str) -> bool:
    base = configured.split("{value}")[0].split("?")[0]
    return called.startswith(base) or unquote(called).startswith(base)


def _sent_value(cfg: Any, request: httpx.Request) -> str | None:
    """The credential a validation call carries, read the way `remote_check` sent it."""
    if "{value}" in cfg.url:
        prefix, _, suffix = cfg.url.partition("{value}")
        called = str(request.url)
        if called.startswith(prefix) and called.endswith(suffix):
            return unquote(called[len(prefix):len(called) - len(suffix)])
        return None
    if cfg.send == "header":
        return request.headers.get(cfg.header or cfg.param)
    if cfg.send == "query":
        return request.url.params.get(cfg.param)
    body = request.content.decode("utf-8", "replace")
    if cfg.send == "json":
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return str(data.get(cfg.param)) if isinstance(data, dict) and cfg.param in data else None
    return dict(parse_qsl(body)).get(cfg.param)


class CapturedAudit(AuditLog):
    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.lines: list[dict[str, Any]] = []

    def record(self, fields: dict[str, Any]) -> None:
        self.lines.append(fields)


class _NoWebhooks:
    def targets(self, event: str) -> list[object]:
        return []


class TestRuntime(Offline):
    """`sidecar explain`'s offline runtime, made whole for the gateway: a recording upstream, declared validators,
    a verdict cache and an audit log kept in memory. One per case, so no verdict carries over between cases."""

    def __init__(self, loaded: LoadedConfig, validators: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(loaded)
        checks = {name: (cfg.revalidate if cfg.type == "cookie" else cfg)
                  for name, cfg in loaded.authenticators.items()
                  if cfg.type == "remote" or (cfg.type == "cookie" and cfg.revalidate is not None)}
        self.validators = self.http = DeclaredValidators(checks, validators)
        self.sent: list[Forwarded] = []
        cache = loaded.config.cache
        self.cache = VerdictCache(cache.ttl, cache.negative_ttl, cache.max_entries)
        self.audit = CapturedAudit()
        self.metrics = Metrics()
        self.events = Events()
        self.webhooks = _NoWebhooks()
        self.tunnels = Tunnels(0)  # a tests file sends no WebSocket handshake
        self.rate_limits = RateLimiter(self.store)  # in memory, fresh per case
        issuer = loaded.config.issuer
        self.signing = SigningKeys(issuer.signing_keys() if issuer else [], issuer.issuer if issuer else "")
        self.compiled = Policy(loaded, self)

    def transport_for(  # type: ignore[override]
        self, upstream_url: str, timeouts: Any = None, tls: Any = None,
    ) -> RecordingTransport:
        return RecordingTransport(upstream_url, self.sent)

    def issuer_public_keys(self) -> list[tuple[str, Any]]:
        return self.signing.public_keys

    def identity_token(self, identity: Any) -> str | None:
        if not self.config.identity.signed_token or not self.signing:
            return None
        claims = {"sub": identity.subject, "client_id": identity.client, "scope": " ".join(sorted(identity.scopes)),
                  "auth_method": identity.authenticator}
        return self.signing.sign(claims, 30.0, typ="identity+jwt")


class WatchingGateway(Gateway):
    """The real gateway; it only keeps the request view it built, to say which authenticator decided."""

    seen: RequestView | None = None

    def route(self, policy: Policy, scope: dict[str, Any], exchange: Any) -> tuple[RoutePlan, RequestView]:
        plan, request = super().route(policy, scope, exchange)
        self.seen = request
        return plan, request


# --- test keys ----------------------------------------------------------------------------------------------------


class TestKeys:
    """Keys made once per run: what test JWTs are signed with, in place of the policy's real keys."""

    def __init__(self) -> None:
        self._keys: dict[str, Any] = {}

    def private(self, alg: str) -> Any:
        family = "HS" if alg.startswith("HS") else "RS" if alg[:2] in ("RS", "PS") else alg[:2]
        if family not in self._keys:
            if family == "RS":
                self._keys[family] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            elif family == "ES":
                curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
                self._keys[family] = ec.generate_private_key(curve)
            elif family == "Ed":
                self._keys[family] = ed25519.Ed25519PrivateKey.generate()
            else:
                self._keys[family] = HS_TEST_SECRET
        return self._keys[family]

    def public_pem(self, alg: str) -> str:
        key = self.private(alg)
        return str(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def _pick_alg(allowed: list[str] | tuple[str, ...]) -> str:
    for alg in ("ES256", "RS256", "PS256", "EdDSA", "HS256", "HS384", "HS512"):
        if alg in allowed:
            return alg
    return allowed[0]


def substitute_jwt_keys(loaded: LoadedConfig, keys: TestKeys) -> LoadedConfig:
    """Every `jwt` authenticator verifies with the run's test key instead of its keys, JWKS, secret or issuer."""
    authenticators = dict(loaded.authenticators)
    for name, cfg in loaded.authenticators.items():
        if cfg.type != "jwt":
            continue
        alg = _pick_alg(cfg.allowed_algorithms())
        if alg.startswith("HS"):
            update: dict[str, Any] = {"secret": HS_TEST_SECRET, "keys": None, "jwks_url": None, "self_issued": False,
                                      "algorithms": [alg]}
        else:
            update = {"keys": [keys.public_pem(alg)], "jwks_url": None, "secret": None, "self_issued": False,
                      "algorithms": [alg]}
        authenticators[name] = cfg.model_copy(update=update)
    config = loaded.config.model_copy(update={"authenticators": authenticators})
    return LoadedConfig(config, loaded.path, authenticators, loaded.warnings)


# --- a case -------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    authenticator: str | None = None
    forwarded: Forwarded | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)
    scope: dict[str, Any] = field(default_factory=dict)  # the request as the gateway received it (for explain)

    def summary(self) -> str:
        parts = [f"status {self.status}", f"reason {self.audit.get('reason')}",
                 f"decision {self.audit.get('decision')}", f"route {self.audit.get('route')}"]
        if self.authenticator:
            parts.append(f"authenticator {self.authenticator}")
        if self.audit.get("detail"):
            parts.append(f"detail {self.audit['detail']!r}")
        parts.append("forwarded" if self.forwarded else "not forwarded")
        return ", ".join(parts)


@dataclass
class CaseResult:
    file: str
    name: str
    failures: list[str]
    report: str = ""
    seconds: float = 0.0
    route: str | None = None
    authenticator: str | None = None


class Runner:
    def __init__(self, keys: TestKeys | None = None) -> None:
        self.keys = keys or TestKeys()

    async def run_case(self, loaded: LoadedConfig, case: dict[str, Any]) -> Outcome:
        unknown = set(case) - CASE_KEYS
        if unknown:
            raise CaseError(f"unknown key(s) {sorted(unknown)}; a case has {sorted(CASE_KEYS)}")
        runtime = TestRuntime(loaded, case.get("validators") or {})
        request = dict(case.get("request") or {})
        unknown = set(request) - REQUEST_KEYS
        if unknown:
            raise CaseError(f"unknown request key(s) {sorted(unknown)}; a request has {sorted(REQUEST_KEYS)}")
        values = await self._credentials(runtime, case)
        scope, body = self._scope(runtime.policy, request, values)
        gateway = WatchingGateway(runtime)
        sent_body = [body]
        replies: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if sent_body:
                return {"type": "http.request", "body": sent_body.pop(), "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            replies.append(message)

        await gateway(scope, receive, send)
        outcome = Outcome(audit=runtime.audit.lines[-1] if runtime.audit.lines else {})
        start = next((m for m in replies if m["type"] == "http.response.start"), None)
        if start is not None:
            outcome.status = start["status"]
            outcome.response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]]
        outcome.forwarded = runtime.sent[-1] if runtime.sent else None
        outcome.authenticator = outcome.audit.get("authenticator") or _decider(runtime.policy, outcome.audit,
                                                                                gateway.seen)
        outcome.undeclared = runtime.validators.undeclared
        outcome.scope = scope
        return outcome

    async def _credentials(self, runtime: TestRuntime, case: dict[str, Any]) -> dict[str, tuple[Authenticator, str]]:
        """The declared credentials, made: {kind: (the authenticator that reads it, its value)}."""
        made: dict[str, tuple[Authenticator, str]] = {}
        policy = runtime.policy
        loaded = policy.loaded
        now = int(time.time())
        if "jwt" in case:
            spec = case["jwt"] or {}
            auth = _authenticator(policy, "jwt", spec.get("authenticator"))
            cfg = loaded.authenticators[auth.name]
            alg = cfg.algorithms[0]
            claims: dict[str, Any] = {"sub": "test-user", "iat": now,
                                      "exp": now + int(_duration(spec.get("expires_in", "5m")))}
            for claim, wanted in (("iss", cfg.issuer), ("aud", cfg.audience)):
                if wanted:
                    claims[claim] = wanted[0] if isinstance(wanted, list) else wanted
            claims.update(spec.get("claims") or {})
            made["jwt"] = (auth, pyjwt.encode(claims, self.keys.private(alg), algorithm=alg))
        if "client_token" in case:
            spec = case["client_token"]
            client = spec if isinstance(spec, str) else (spec or {}).get("client")
            auth = _authenticator(policy, "client_token", None if isinstance(spec, str) else spec.get("authenticator"))
            made["client_token"] = (auth, (await runtime.client_tokens.mint(str(client)))["token"])
        if "ip_key" in case:
            spec = case["ip_key"] or {}
            auth = _authenticator(policy, "ip_key", spec.get("authenticator"))
            client = spec.get("client") or (loaded.config.clients[0].id if loaded.config.clients else "test-client")
            minutes = spec.get("expiry_minutes")
            claims_ = KeyClaims(user=str(spec.get("user", "test-user")), client=str(client), issued_at=now,
                                ip=spec.get("ip"), expires_at=now + int(float(minutes) * 60) if minutes else None,
                                single_use=bool(spec.get("single_use", False)), url_logout=spec.get("url_logout"))
            made["ip_key"] = (auth, keyring_for(loaded.config).seal(claims_))
        if "client_jwt" in case:
            spec = case["client_jwt"] or {}
            auth = _authenticator(policy, "client_jwt", spec.get("authenticator"))
            cfg = loaded.authenticators[auth.name]
            client = str(spec.get("client") or (loaded.config.clients[0].id if loaded.config.clients else ""))
            alg = _pick_alg(cfg.algorithms)
            await runtime.client_keys.register(client, self.keys.public_pem(alg))
            claims = {"iat": now, "exp": now + int(_duration(spec.get("expires_in", "5m"))),
                      "jti": f"test-{now}-{id(spec)}"}
            if cfg.id_from.kind == "claim":
                claims[cfg.id_from.name] = client
            claims.update(spec.get("claims") or {})
            made["client_jwt"] = (auth, pyjwt.encode(claims, self.keys.private(alg), algorithm=alg))
            made["client_id"] = (auth, client)
        return made

    def _scope(self, policy: Policy, request: dict[str, Any],
               made: dict[str, tuple[Authenticator, str]]) -> tuple[dict[str, Any], bytes]:
        def fill(value: Any) -> Any:
            if isinstance(value, str):
                for kind, (_, token) in made.items():
                    value = value.replace("{{" + kind + "}}", token)
                return value
            if isinstance(value, Mapping):
                return {fill(k): fill(v) for k, v in value.items()}
            if isinstance(value, list):
                return [fill(v) for v in value]
            return value

        text = json.dumps(request)
        placed = {kind for kind in made if "{{" + kind + "}}" in text}
        request = fill(request)
        headers: dict[str, str] = {str(k).lower(): str(v) for k, v in (request.get("headers") or {}).items()}
        query: list[tuple[str, str]] = [(str(k), str(v)) for k, v in (request.get("query") or {}).items()]
        cookies: dict[str, str] = {str(k): str(v) for k, v in (request.get("cookies") or {}).items()}
        form: dict[str, str] | None = ({str(k): str(v) for k, v in request["form"].items()}
                                       if isinstance(request.get("form"), Mapping) else None)
        body_json: Any = request.get("json")
        for kind, (auth, value) in made.items():
            if kind in placed:
                continue
            if kind == "client_id":
                source = auth.config.id_from  # type: ignore[attr-defined]
                if source.kind == "claim":
                    continue
            else:
                source = auth.sources[0]
            # Where its authenticator reads first, unless the case already put a value there.
            if source.kind == "header":
                headers.setdefault(source.name, f"Bearer {value}" if source.name == "authorization" else value)
            elif source.kind == "query":
                if not any(name == source.name for name, _ in query):
                    query.append((source.name, value))
            elif source.kind == "cookie":
                cookies.setdefault(source.name, value)
            elif source.kind == "form" or (source.kind == "body" and form is not None):
                form = {source.name: value, **(form or {})}
            elif source.kind == "body":
                body_json = {source.name: value, **(body_json or {})}
        url = urlsplit(str(request.get("url", "/")))
        raw_path = url.path or "/"
        query_string = url.query
        if query:
            query_string = "&".join(p for p in (query_string, urlencode(query, quote_via=quote)) if p)
        if cookies:
            jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
            headers["cookie"] = f"{headers['cookie']}; {jar}" if "cookie" in headers else jar
        body = b""
        if form is not None:
            body = urlencode(form).encode()
            headers.setdefault("content-type", "application/x-www-form-urlencoded")
        elif body_json is not None:
            body = json.dumps(body_json).encode()
            headers.setdefault("content-type", "application/json")
        elif request.get("body") is not None:
            body = str(request["body"]).encode()
        if body:
            headers["content-length"] = str(len(body))
        headers.setdefault("host", url.netloc or "localhost")
        client_ip = request.get("client_ip")
        peer = str(request.get("peer") or client_ip or "127.0.0.1")
        if client_ip and str(client_ip) != peer:  # the peer is a proxy that says who its client was
            headers["x-forwarded-for"] = ", ".join(p for p in (headers.get("x-forwarded-for"), str(client_ip)) if p)
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": str(request.get("method", "GET")).upper(), "scheme": url.scheme or "http",
            "path": unquote(raw_path), "raw_path": raw_path.encode("latin-1"), "root_path": "",
            "query_string": query_string.encode("latin-1"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
            "client": (peer, 50000), "server": ("sidecar-test", 8080),
        }
        return scope, body


def _decider(policy: Policy, audit: Mapping[str, Any], request: RequestView | None) -> str | None:
    """The authenticator that decided a refused request: the first of its route that found its credential."""
    route = audit.get("route")
    if route is None or request is None:
        return None
    plan = next((p for p in policy.plans if p.route.id == route), None)
    for auth in plan.authenticators if plan is not None else ():
        try:
            if auth.credential(request) is not None:
                return auth.name
        except Refusal:  # it refused the credential itself (too large, twice): it decided
            return auth.name
    return None


def _authenticator(policy: Policy, kind: str, name: str | None) -> Authenticator:
    if name is not None:
        auth = policy.authenticators.get(name)
        if auth is None or policy.loaded.authenticators[name].type != kind:
            raise CaseError(f"the policy has no {kind} authenticator named {name!r}")
        return auth
    found = [a for n, a in policy.authenticators.items() if policy.loaded.authenticators[n].type == kind]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise CaseError(f"the policy has {what} {kind} authenticators; name one with authenticator:")
    return found[0]


def _duration(value: Any) -> float:
    text = str(value).strip()
    if text.startswith("-"):
        return -parse_duration(text[1:])
    return parse_duration(value)


# --- expectations -------------------------------------------------------------------------------------------------


def compare(expect: Mapping[str, Any], outcome: Outcome) -> list[str]:
    """Each expectation that did not hold, said as `what: expected X, got Y`."""
    unknown = set(expect) - EXPECT_KEYS
    if unknown:
        return [f"unknown expectation(s) {sorted(unknown)}; use {sorted(EXPECT_KEYS)}"]
    out: list[str] = []
    audit = outcome.audit
    if "status" in expect and int(expect["status"]) != outcome.status:
        out.append(f"status: expected {expect['status']}, got {outcome.status}")
    for key in ("reason", "decision"):
        if key in expect and expect[key] != audit.get(key):
            out.append(f"{key}: expected {expect[key]!r}, got {audit.get(key)!r}")
    if "route" in expect and expect["route"] != audit.get("route"):
        got = audit.get("route")
        out.append(f"route: expected {expect['route']!r}, but the request matched route {got!r} instead"
                   if got else f"route: expected {expect['route']!r}, but no route matched")
    if "authenticator" in expect and expect["authenticator"] != outcome.authenticator:
        out.append(f"authenticator: expected {expect['authenticator']!r}, got {outcome.authenticator!r}")
    forwarded = outcome.forwarded
    if "forwarded" in expect and bool(expect["forwarded"]) != (forwarded is not None):
        out.append(f"forwarded: expected {bool(expect['forwarded'])}, got {forwarded is not None}")
    upstream = expect.get("upstream")
    if upstream is not None:
        unknown = set(upstream) - UPSTREAM_KEYS
        if unknown:
            out.append(f"unknown upstream expectation(s) {sorted(unknown)}; use {sorted(UPSTREAM_KEYS)}")
        elif forwarded is None:
            out.append("upstream: expected a forwarded request, but nothing reached the upstream")
        else:
            out.extend(_compare_upstream(upstream, forwarded))
    return out


def _compare_upstream(upstream: Mapping[str, Any], sent: Forwarded) -> list[str]:
    out: list[str] = []
    if "path" in upstream and upstream["path"] != sent.path:
        out.append(f"upstream path: expected {upstream['path']!r}, got {sent.path!r}")
    if "query" in upstream:
        wanted = upstream["query"]
        if isinstance(wanted, Mapping):
            got = dict(parse_qsl(sent.query, keep_blank_values=True))
            for name, value in wanted.items():
                if value is None and name in got:
                    out.append(f"upstream query: {name!r} should be absent, got {got[name]!r}")
                elif value is not None and got.get(name) != str(value):
                    out.append(f"upstream query {name!r}: expected {str(value)!r}, got {got.get(name)!r}")
        elif str(wanted or "") != sent.query:
            out.append(f"upstream query: expected {str(wanted or '')!r}, got {sent.query!r}")
    for name, value in (upstream.get("headers") or {}).items():
        got_values = sent.header(str(name))
        if not got_values:
            out.append(f"upstream header {name}: expected {value!r}, but it is absent")
        elif value is not True and str(value) not in got_values:
            out.append(f"upstream header {name}: expected {str(value)!r}, got {got_values[0]!r}")
    for name in upstream.get("headers_absent") or []:
        got_values = sent.header(str(name))
        if got_values:
            out.append(f"upstream header {name}: expected absent, got {_shorten(got_values[0])!r}")
    return out


def _shorten(value: str) -> str:
    return value if len(value) <= 40 else value[:37] + "..."


# --- files --------------------------------------------------------------------------------------------------------


@dataclass
class TestsFile:
    path: Path
    policy: Path
    env: dict[str, str]
    cases: list[dict[str, Any]]


def read_tests_file(path: Path, config: str | None) -> TestsFile:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise CaseError(f"{path}: expected a mapping with policy: and cases: [...]")
    unknown = set(data) - {"policy", "env", "cases"}
    if unknown:
        raise CaseError(f"{path}: unknown key(s) {sorted(unknown)}; a tests file has policy, env and cases")
    if config is not None:
        policy = Path(config)
    elif data.get("policy"):
        policy = path.parent / str(data["policy"])
    else:
        raise CaseError(f"{path}: name the policy it tests (policy: FILE, relative to the tests file) or --config")
    env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    return TestsFile(path, policy, env, data["cases"])


def load_policy(tests: TestsFile) -> LoadedConfig:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_REPORT_ONLY")}, **tests.env}
    return parse(tests.policy.read_text(encoding="utf-8"), str(tests.policy), env)


def describe_request(case: Mapping[str, Any]) -> str:
    request = case.get("request") or {}
    line = f"{str(request.get('method', 'GET')).upper()} {request.get('url', '/')}"
    extra = {k: v for k, v in request.items() if k not in ("method", "url")}
    declared = {k: case[k] for k in ("jwt", "client_token", "ip_key", "client_jwt", "validators") if k in case}
    return line + (f" {json.dumps(extra)}" if extra else "") + (f" with {json.dumps(declared)}" if declared else "")


async def run_file(runner: Runner, tests: TestsFile, loaded: LoadedConfig) -> list[CaseResult]:
    results = []
    for index, case in enumerate(tests.cases, 1):
        name = str(case.get("name") or f"case {index}") if isinstance(case, dict) else f"case {index}"
        started = time.perf_counter()
        result = CaseResult(str(tests.path), name, [])
        try:
            if not isinstance(case, dict):
                raise CaseError("a case is a mapping with request: and expect:")
            outcome = await runner.run_case(loaded, case)
            result.route, result.authenticator = outcome.audit.get("route"), outcome.authenticator
            result.failures = compare(case.get("expect") or {}, outcome)
            if result.failures:
                result.report = _report(loaded, case, outcome, result.failures)
        except (CaseError, ValueError, TypeError, KeyError) as exc:
            result.failures = [f"the case cannot be run: {exc}"]
            result.report = "  " + result.failures[0]
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results


def _report(loaded: LoadedConfig, case: Mapping[str, Any], outcome: Outcome, failures: list[str]) -> str:
    request = case.get("request") or {}
    lines = [f"  request:  {describe_request(case)}",
             f"  expected: {json.dumps(case.get('expect') or {})}",
             f"  got:      {outcome.summary()}"]
    lines += [f"  - {failure}" for failure in failures]
    if outcome.undeclared:
        lines.append(f"  validation calls with no declared reply: {', '.join(outcome.undeclared)}")
    scope = outcome.scope
    if scope:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        host = next((v for k, v in headers if k == "host"), "localhost")
        url = f"{scope['scheme']}://{host}{scope['raw_path'].decode('latin-1')}"
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        lines_in = [f"{k}: {v}" for k, v in headers if k != "host"]
        why = explain(loaded, scope["method"], url, lines_in, peer=scope["client"][0])
    else:
        why = explain(loaded, str(request.get("method", "GET")), str(request.get("url", "/")), [])
    lines.append("  why (sidecar explain):")
    lines += [f"    {line}" for line in why.splitlines()]
    return "\n".join(lines)


def write_junit(path: str, results: list[CaseResult]) -> None:
    suites = ET.Element("testsuites", tests=str(len(results)),
                        failures=str(sum(1 for r in results if r.failures)))
    by_file: dict[str, list[CaseResult]] = {}
    for result in results:
        by_file.setdefault(result.file, []).append(result)
    for file, cases in by_file.items():
        suite = ET.SubElement(suites, "testsuite", name=file, tests=str(len(cases)),
                              failures=str(sum(1 for r in cases if r.failures)),
                              time=f"{sum(r.seconds for r in cases):.3f}")
        for result in cases:
            element = ET.SubElement(suite, "testcase", classname=file, name=result.name, time=f"{result.seconds:.3f}")
            if result.failures:
                failure = ET.SubElement(element, "failure", message="; ".join(result.failures))
                failure.text = result.report
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def main(paths: list[str], config: str | None = None, junit: str | None = None, coverage: bool = False) -> int:
    runner = Runner()
    results: list[CaseResult] = []
    reached: dict[str, tuple[LoadedConfig, set[str], set[str]]] = {}
    broken = False
    for name in paths:
        try:
            tests = read_tests_file(Path(name), config)
            loaded = substitute_jwt_keys(load_policy(tests), runner.keys)
        except ConfigError as exc:
            print(f"ERROR {name}: the policy does not load:", *exc.errors, sep="\n  ")
            broken = True
            continue
        except (CaseError, OSError, yaml.YAMLError) as exc:
            print(f"ERROR {name}: {exc}")
            broken = True
            continue
        file_results = asyncio.run(run_file(runner, tests, loaded))
        entry = reached.setdefault(str(tests.policy), (loaded, set(), set()))
        for result in file_results:
            ok = not result.failures
            print(f"{'PASS' if ok else 'FAIL'}  {result.file} :: {result.name}")
            if not ok:
                print(result.report)
            if result.route:
                entry[1].add(result.route)
            if result.authenticator:
                entry[2].add(result.authenticator)
        results.extend(file_results)
    if coverage:
        for policy, (loaded, routes, auths) in reached.items():
            missed_routes = [r.id for r in loaded.config.routes if r.id not in routes]
            missed_auths = [a for a in loaded.authenticators if a not in auths]
            print(f"coverage {policy}: routes no case reached: {', '.join(missed_routes) or '(none)'}; "
                  f"authenticators no case reached: {', '.join(missed_auths) or '(none)'}")
    if junit:
        write_junit(junit, results)
    failed = sum(1 for r in results if r.failures)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.stdout.flush()
    return 1 if failed or broken or not results else 0
