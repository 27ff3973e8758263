"""The benchmark cases and the sidecar YAML configuration each one runs with (SPEC section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from bench.wrk import WrkScript

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
REDIS_URL = "redis://127.0.0.1:6379/14"  # a DB number of our own; keys written there carry TTLs
ROUTE_COUNT = 1000
SOAK_MAX_ENTRIES = 2000  # rss_soak: the verdict cache's cache.max_entries (per worker), kept full and evicting


@dataclass
class Case:
    name: str
    target: str  # "upstream" | "nginx_proxy" | "sidecar" | "nginx_decision" | "nginx_auth_floor"
    path: str
    description: str
    light_default: bool = False
    needs_redis: bool = False
    transport: str | None = None  # sidecar cases: SIDECAR_FORWARD_TRANSPORT
    label: str = ""
    command: list[str] | None = None  # sidecar cases: the command that starts it (--baseline-cmd), else --sidecar-cmd
    opt_in: bool = False  # not in the default --cases list (the memory cases: minutes, not seconds)

    def __post_init__(self) -> None:
        self.label = self.label or self.name


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("upstream", "upstream", "/anon/x", "nginx `return 200` with a fixed 1 KB JSON body", light_default=True),
        Case(
            "nginx_proxy",
            "nginx_proxy",
            "/anon/x",
            "plain nginx proxy_pass with upstream keepalive",
            light_default=True,
        ),
        Case("anonymous", "sidecar", "/anon/x", "sidecar, anonymous route", light_default=True),
        Case(
            "jwt_cached",
            "sidecar",
            "/jwt/x",
            "sidecar, RS256 JWT route, 4 tokens repeated (warm cache)",
            light_default=True,
        ),
        Case(
            "jwt_cached_https",
            "sidecar",
            "/jwt/x",
            "jwt_cached with an https upstream (nginx ssl listener, keep-alive, private CA)",
        ),
        Case("jwt_new", "sidecar", "/jwt/x", "sidecar, RS256 JWT route, a never-seen token on every request"),
        Case("client_token", "sidecar", "/token/x", "sidecar, client-token route, Redis db 14", needs_redis=True),
        Case(
            "nginx_auth_decision",
            "nginx_decision",
            "/jwt/x",
            "nginx auth_request (examples/nginx/sidecar.conf) -> sidecar decision port (jwt_cached's route and "
            "tokens, warm cache) -> upstream",
            light_default=True,
        ),
        Case(
            "nginx_auth_floor",
            "nginx_auth_floor",
            "/jwt/x",
            "the same nginx auth_request recipe asking an nginx location that always says 200 (no auth): the floor",
            light_default=True,
        ),
        Case(
            "routes_1000",
            "sidecar",
            f"/r{ROUTE_COUNT - 1}/x",
            f"sidecar, {ROUTE_COUNT} routes, the last one matches (anonymous)",
        ),
        Case(
            "idle_conns",
            "sidecar",
            "/anon/x",
            "sidecar RSS (parent + workers) added by idle keep-alive client connections, each after one 200 "
            "(anonymous route)",
            opt_in=True,
        ),
        Case(
            "rss_soak",
            "sidecar",
            "/jwt/x",
            f"sidecar RSS during a long wrk run on a JWT route whose verdict cache is full "
            f"(cache.max_entries {SOAK_MAX_ENTRIES:,}) and evicting: pre-signed tokens rotated",
            opt_in=True,
        ),
    )
}
DEFAULT_CASES = [name for name, case in CASES.items() if not case.opt_in]
TRANSPORT_CASES = ("anonymous", "jwt_cached")  # run under every --transport value
JWT_CASES = ("jwt_cached", "jwt_cached_https", "jwt_new", "nginx_auth_decision", "nginx_auth_floor", "rss_soak")


@dataclass
class Creds:
    public_pem: str = ""
    jwt_few: list[str] = field(default_factory=list)
    client_token: str = ""
    client_token_ref: str = ""
    upstream_ca: str = ""  # the https upstream's CA file (jwt_cached_https)


def sidecar_config(case: Case, upstream_port: int, creds: Creds) -> str:
    """The YAML for one sidecar case: only the authenticators the case uses."""
    cfg: dict[str, Any] = {
        "version": 1,
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "admin": {"token": "${SIDECAR_ADMIN_TOKEN}"},
    }
    if case.needs_redis:
        cfg["redis"] = REDIS_URL
    if case.name in ("anonymous", "routes_1000", "idle_conns"):
        cfg["authenticators"] = {"public": {"type": "anonymous"}}
        if case.name != "routes_1000":
            cfg["routes"] = [{"id": "anon", "match": {"path": "/anon/**"}, "auth": ["public"]}]
        else:
            cfg["routes"] = [
                {"id": f"r{i}", "match": {"path": f"/r{i}/**"}, "auth": ["public"]} for i in range(ROUTE_COUNT)
            ]
    elif case.name in JWT_CASES:
        if case.name == "jwt_cached_https":
            cfg["upstream"] = f"https://127.0.0.1:{upstream_port}"
            cfg["upstream_tls"] = {"ca_file": creds.upstream_ca, "server_name": "localhost"}
        cfg["authenticators"] = {
            "bench_jwt": {
                "type": "jwt",
                "keys": [creds.public_pem],
                "issuer": "https://bench.local",
                "audience": "bench",
            }
        }
        cfg["routes"] = [{"id": "jwt", "match": {"path": "/jwt/**"}, "auth": ["bench_jwt"]}]
        if case.name == "nginx_auth_decision":
            cfg["trusted_proxies"] = ["127.0.0.1/32"]  # the nginx in front, as in the recipe
        if case.name == "rss_soak":
            cfg["cache"] = {"max_entries": SOAK_MAX_ENTRIES}
    elif case.name == "client_token":
        cfg["authenticators"] = {"bench_token": {"type": "client_token"}}
        cfg["clients"] = [{"id": "bench-client", "name": "Bench", "tokens": [creds.client_token_ref]}]
        cfg["routes"] = [{"id": "token", "match": {"path": "/token/**"}, "auth": ["bench_token"]}]
    else:
        raise ValueError(f"not a sidecar case: {case.name}")
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, width=1000)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PEM keys) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def case_headers(case: Case, creds: Creds) -> dict[str, str]:
    """Headers for a single request of the case (readiness check, light-load pass)."""
    if case.name in JWT_CASES:
        return {"Authorization": f"Bearer {creds.jwt_few[0]}"}
    if case.name == "client_token":
        return {"X-Client-Token": creds.client_token}
    return {}


def wrk_script(case: Case, creds: Creds, fresh_prefix: str = "") -> WrkScript:
    if case.name in ("jwt_cached", "jwt_cached_https", "nginx_auth_decision", "nginx_auth_floor"):
        return WrkScript("rotate", ["Authorization", *(f"Bearer {t}" for t in creds.jwt_few)])
    if case.name in ("jwt_new", "rss_soak"):
        return WrkScript("fresh", [fresh_prefix, "Authorization"])
    if case.name == "client_token":
        return WrkScript("plain", [f"X-Client-Token: {creds.client_token}"])
    return WrkScript("plain", [])
