"""`sidecar schema`: the configuration's JSON Schema, generated from the pydantic models (config/model.py and
each authenticator's config model from the registry, one variant per `type`), so it cannot drift from what
`sidecar check` accepts. Descriptions come from the models' docstrings and from `DESCRIPTIONS` (the README's
reference, shortened); a committed copy lives in schema/sidecar.schema.json (a test fails when it is stale).

Editors read it through the YAML language server: `# yaml-language-server: $schema=...` on the first line."""

from __future__ import annotations

import json
from typing import Annotated, Any, Union

from pydantic import Field, create_model

from sidecar.authn.registry import REGISTRY
from sidecar.config.model import Config

# (definition name or "Config", property) -> description. The README's reference is the source.
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("Config", "version"): "Always 1.",
    ("Config", "upstream"): "Default upstream for every route: http(s)://host:port, optionally with a base path.",
    ("Config", "trusted_proxies"): "Only these peers' X-Forwarded-For is believed (addresses or CIDR networks).",
    ("Config", "redis"): "Redis URL (redis://, rediss://, redis+sentinel://, redis+cluster://, unix://); empty: "
                         "in-process cache, single process only.",
    ("Config", "cache"): "The verdict cache.",
    ("Config", "identity"): "The identity headers the upstream receives.",
    ("Config", "admin"): "The admin API (its own port).",
    ("Config", "keys"): "Secrets protecting IP-bound keys and session cookies (32+ bytes; several for rotation).",
    ("Config", "timeouts"): "Upstream connect and read timeouts.",
    ("Config", "authenticators"): "Named, reusable authenticators; each has a type.",
    ("Config", "clients"): "Partners and licences: their token hashes, secrets, keys, routes and scopes.",
    ("Config", "routes"): "First match in file order wins; no match: 404 no_route.",
    ("Config", "issuer"): "The token and key endpoints (/_sidecar/oauth2/token, JWKS, /_sidecar/keys).",
    ("Config", "webhooks"): "Signed callbacks (Standard Webhooks) for events.",
    ("Config", "webhook_retry"): "Default retry schedule of webhook deliveries.",
    ("Config", "tracing"): "OpenTelemetry tracing (needs the otel extra); OTEL_* variables win over these keys.",
    ("CacheConfig", "ttl"): "How long an accepted verdict is kept (never past the token's exp).",
    ("CacheConfig", "negative_ttl"): "How long a refusal is kept.",
    ("CacheConfig", "max_entries"): "Verdicts kept in each process.",
    ("CacheConfig", "stale_if_error"): "Serve a cached verdict up to this age when the validating dependency is "
                                       "down (0: fail closed).",
    ("IdentityConfig", "header_prefix"): "Prefix of the identity headers; incoming headers with it are removed.",
    ("IdentityConfig", "signed_token"): "Also send X-Auth-Token, a 30 s JWT signed by the issuer key.",
    ("AdminConfig", "token"): "Bearer token of the admin API; empty turns the admin API off.",
    ("RouteConfig", "id"): "Stable route id: used in the audit log, metrics and client route lists.",
    ("RouteConfig", "auth"): "Authenticator names, tried in order.",
    ("RouteConfig", "require"): "Checked on every request, cached verdict or not.",
    ("RouteConfig", "upstream"): "Upstream of this route (overrides the top-level one).",
    ("RouteConfig", "emit"): "Webhook events raised from the upstream's reply.",
    ("RouteConfig", "login_url"): "Browsers (Accept: text/html) are redirected here on 401, with return_to.",
    ("RouteConfig", "max_body"): "Bound, in bytes, on a body an authenticator reads (413 above it).",
    ("RouteConfig", "audit"): "false: no audit line for this route (health probes); metrics still count it.",
    ("MatchConfig", "methods"): "HTTP methods; omitted: any.",
    ("MatchConfig", "path"): "Glob on the normalised path: * is one segment, ** any number.",
    ("MatchConfig", "path_regex"): "A regular expression on the normalised path, instead of path.",
    ("MatchConfig", "host"): "Host name (may start with *.), matched without the port.",
}

EXAMPLES: dict[tuple[str, str], list[Any]] = {
    ("Config", "upstream"): ["http://backend:8080"],
    ("Config", "redis"): ["${SIDECAR_REDIS_URL:-}", "redis://redis:6379/0"],
    ("Config", "trusted_proxies"): [["10.0.0.0/8"]],
    ("CacheConfig", "ttl"): ["300s"],
    ("RouteConfig", "auth"): [["partner_jwt", "client_token"]],
    ("MatchConfig", "path"): ["/api/v1/transactions/**"],
}


# `${VAR}` and `${VAR:-default}`: allowed wherever the YAML wants a number or a boolean, since an editor sees the
# file before substitution (the value is checked by `sidecar check` once substituted).
VARIABLE = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}
SOURCE = {"type": "string", "pattern": r"^(header:|query:|form:|cookie:|claim:|query\.|form\.|body\.).+",
          "description": "header:NAME, query:NAME, form:NAME, cookie:NAME, body.FIELD (client_jwt id_from: also "
                         "claim:NAME).", "examples": ["header:Authorization", "body.id"]}


def _accept_what_the_loader_coerces(node: Any) -> Any:
    """The loader is lenient in places the generated schema is not (a `mode="before"` validator, pydantic's lax
    bool and int parsing): widen the schema there, so that every file `sidecar check` accepts validates."""
    if isinstance(node, list):
        return [_accept_what_the_loader_coerces(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("$ref") == "#/$defs/Source":
        return dict(SOURCE)
    node = {key: _accept_what_the_loader_coerces(value) for key, value in node.items()}
    if node.get("type") in ("boolean", "integer", "number"):
        kept = {key: node.pop(key) for key in ("default", "title", "description", "examples") if key in node}
        return {"anyOf": [node, VARIABLE], **kept}
    return node


def config_schema() -> dict[str, Any]:
    variants = tuple(kind.config_model for kind in REGISTRY.values())
    authenticator = Annotated[Union[variants], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
    root = create_model("Config", __base__=Config, __doc__=Config.__doc__,
                        authenticators=(dict[str, authenticator], {}))
    schema = root.model_json_schema(by_alias=True, mode="validation")
    definitions = schema.get("$defs", {})
    definitions.pop("Source", None)
    jwt_keys = definitions["JwtConfig"]["properties"]["keys"]
    jwt_keys["anyOf"].insert(0, {"type": "string", "description": "One PEM public key."})
    definitions["ClientConfig"]["properties"]["id"] = {"anyOf": [{"type": "string"}, {"type": "integer"}],
                                                       "title": "Id"}
    for name in ("RemoteCheck", "RemoteConfig"):
        method = definitions[name]["properties"]["method"]
        method["enum"] = [*method["enum"], *(m.lower() for m in method["enum"])]
    schema = _accept_what_the_loader_coerces(schema)
    definitions = schema["$defs"]
    for (model, key), text in DESCRIPTIONS.items():
        target = schema if model == "Config" else definitions.get(model)
        if target is not None and key in target.get("properties", {}):
            target["properties"][key].setdefault("description", text)
    for (model, key), examples in EXAMPLES.items():
        target = schema if model == "Config" else definitions.get(model)
        if target is not None and key in target.get("properties", {}):
            target["properties"][key]["examples"] = examples
    schema.update(title="sidecar configuration (sidecar.yaml)",
                  description="The sidecar configuration, version 1. Durations take ms, s, m, h; ${VAR} and "
                              "${VAR:-default} are replaced from the environment.")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, sort_keys=False) + "\n"
