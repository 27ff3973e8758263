"""Loading the configuration: read the YAML with line numbers, substitute `${VAR}`, validate into the typed
model (model.py) once, and turn every problem into `FILE:LINE: place: message` with the fix."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sidecar.authn.registry import REGISTRY
from sidecar.config.model import DEFAULT_CONFIG, Config, LoadedConfig
from sidecar.config.types import Model
from sidecar.config.yaml_lines import ConfigError, Loc, YamlDocument
from sidecar.proxy.routing import shadowed_routes


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG


# Set by `sidecar run --report-only` (and inherited by its workers and reloads): every route is report-only.
REPORT_ONLY_VARIABLE = "SIDECAR_REPORT_ONLY"


def load(path: str, env: Mapping[str, str] | None = None) -> LoadedConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}:1: (file): cannot read the file ({exc.strerror}); check --config"]) from None
    return parse(text, path, os.environ if env is None else env)


def parse(text: str, filename: str, env: Mapping[str, str]) -> LoadedConfig:
    """Every problem in one pass (YAML, unset variables, schema, authenticators, references), sorted by line."""
    doc = YamlDocument(text, filename, env)
    errors = list(doc.errors)
    if doc.data is None:  # a syntax error, or nothing at all: there is nothing to check further
        raise ConfigError(errors or [f"{filename}:1: (top): the file is empty; start from policies/demo.yaml"])
    if not isinstance(doc.data, dict):
        raise ConfigError([*errors, f"{filename}:1: (top): expected a mapping with version: 1, upstream and routes"])

    data = dict(doc.data)
    raw_authenticators = data.pop("authenticators", None) or {}
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "authenticators": {}})
    except ValidationError as exc:
        errors.extend(_messages(doc, exc, (), Config))

    authenticators: dict[str, Any] = {}
    if not isinstance(raw_authenticators, dict):
        errors.append(doc.error(("authenticators",), "expected a mapping of name: {type: ...}"))
        raw_authenticators = {}
    for name, raw in raw_authenticators.items():
        loc: Loc = ("authenticators", name)
        kind = raw.get("type") if isinstance(raw, dict) else None
        if not isinstance(kind, str) or kind not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            what = f"unknown authenticator type {kind!r}" if kind else "missing type"
            errors.append(doc.error((*loc, "type"), f"{what}; use one of: {known}"))
            continue
        model = REGISTRY[kind].config_model
        try:
            authenticators[name] = model.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_messages(doc, exc, loc, model))

    # From the raw data, so a schema error elsewhere does not hide a dangling name or a duplicated id.
    errors.extend(_cross_references(doc, data, raw_authenticators))
    if errors:
        raise ConfigError(errors)
    assert config is not None
    config = config.model_copy(update={"authenticators": authenticators})
    if env.get(REPORT_ONLY_VARIABLE, "") not in ("", "0"):  # `sidecar run --report-only`: every route reports only
        routes = [route.model_copy(update={"mode": "report_only"}) for route in config.routes]
        config = config.model_copy(update={"routes": routes})
    return LoadedConfig(config, filename, authenticators, _warnings(doc, config, authenticators))


# What pydantic's type errors expected, said as a YAML writer would (its own wording names Python types).
_EXPECTED = {
    "string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list", "tuple_type": "a list",
    "set_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}
_HOW = {
    "a list": "write [a, b] or one `- item` per line", "a mapping": "write key: value lines indented under it",
    "true or false": "write true or false", "a whole number": "write digits only, such as 30",
    "a number": "write a number such as 1.5", "text": "quote the value to make it text",
}
_LIMITS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
           "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}


def _messages(doc: YamlDocument, exc: ValidationError, prefix: Loc, model: type[Model]) -> list[str]:
    """pydantic's errors as `FILE:LINE: place: message` with the fix. A value that fits no member of a union
    gives one line ("expected text or a list"), and a list's bad item is named rather than the list itself."""
    out: list[str] = []
    expected: dict[Loc, tuple[list[str], Any]] = {}  # place: (what would have fitted, what was there)
    for error in exc.errors(include_url=False):
        full = (*prefix, *error["loc"])
        if doc.came_from_unset(full):
            continue  # already reported: environment variable ... is not set
        known = doc.known_loc(full)
        kind = _EXPECTED.get(error["type"])
        if kind is None:
            out.append(doc.error(known, _message(error, full, model)))
        else:
            expected.setdefault(known, ([], error.get("input")))[0].append(kind)
    deeper = {loc[:n] for loc in expected for n in range(len(loc))}
    for known, (kinds, value) in expected.items():
        if known in deeper:
            continue  # a union's list member failing further down says more than "expected text" here
        kinds = list(dict.fromkeys(kinds))
        how = ", or ".join(_HOW[kind] for kind in kinds)
        out.append(doc.error(known, f"expected {' or '.join(kinds)}, not {_kind_of(value)}; {how}"))
    return out


def _message(error: Any, loc: Loc, model: type[Model]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, _keys_at(model, error["loc"][:-1]) or _known_keys() - {key}, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        return f"unknown key {key!r}; {suggestion}remove it or fix the spelling (unknown keys are refused)"
    if kind == "missing":
        return f"{loc[-1]!s} is required; add {loc[-1]!s}: here"
    if kind == "literal_error":
        return f"{_shown(error.get('input'))} is not accepted here; write {ctx.get('expected', 'an allowed value')}"
    if kind in _LIMITS:
        name, words = _LIMITS[kind]
        return f"must be {words} {ctx.get(name)}, not {_shown(error.get('input'))}"
    if kind == "too_short":
        return "needs at least one entry; add one" if ctx.get("min_length") == 1 else (
            f"needs at least {ctx.get('min_length')} entries; add more")
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} entries; remove some"
    if kind in ("value_error", "assertion_error"):
        return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"this value is not accepted for {loc[-1]!s}; see the README for what it takes"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, float) and not value.is_integer():
        return "a fraction"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "an empty value" if value is None else "something else"


def _shown(value: Any) -> str:
    """A short value for a message about a fixed choice or a number (never a secret: those are free text)."""
    if value is None or isinstance(value, bool):
        return "an empty value" if value is None else str(value).lower()
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _keys_at(model: type[Model], loc: Loc) -> set[str]:
    """The keys the model at `loc` takes (empty when the path goes through something that is not one model)."""
    for part in loc:
        if isinstance(part, int):
            continue  # a list item: the model is the list's
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        inner = _models_in(field.annotation) if field is not None else []
        if len(inner) != 1:
            return set()
        model = inner[0]
    return {field.alias or name for name, field in model.model_fields.items()}


def _models_in(annotation: Any) -> list[type[Model]]:
    if isinstance(annotation, type) and issubclass(annotation, Model):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]


def _known_keys() -> set[str]:
    keys: set[str] = set()
    models: list[Any] = [Config, *(entry.config_model for entry in REGISTRY.values())]
    seen: set[Any] = set()
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            keys.add(field.alias or name)
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(arg, type) and issubclass(arg, Model):
                    models.append(arg)
                for inner in getattr(arg, "__args__", ()):
                    if isinstance(inner, type) and issubclass(inner, Model):
                        models.append(inner)
    return keys


def _cross_references(doc: YamlDocument, data: dict[str, Any], authenticators: dict[str, Any]) -> list[str]:
    """Names that must point at something defined, and ids that must be unique, read from the raw data."""
    errors = []
    routes, clients = _mappings(data.get("routes")), _mappings(data.get("clients"))
    route_ids = [_name(route.get("id")) for _, route in routes]
    client_ids = [_name(client.get("id")) for _, client in clients]
    for k, ((i, route), route_id) in enumerate(zip(routes, route_ids, strict=True)):
        if route_id is not None and route_ids.index(route_id) != k:
            errors.append(doc.error(("routes", i, "id"), f"route id {route_id!r} is used twice; ids must be unique"))
        for j, name in _names(route.get("auth")):
            if name not in authenticators:
                known = ", ".join(sorted(map(str, authenticators))) or "none defined"
                errors.append(doc.error(
                    ("routes", i, "auth", j),
                    f"unknown authenticator {name!r}; define it under authenticators (known: {known})",
                ))
        require = route.get("require")
        for j, required in _names(require.get("clients") if isinstance(require, dict) else None):
            if required not in client_ids:
                errors.append(doc.error(("routes", i, "require", "clients", j),
                                        f"unknown client {required!r}; add it under clients or fix the id"))
    for k, ((i, client), client_id) in enumerate(zip(clients, client_ids, strict=True)):
        if client_id is not None and client_ids.index(client_id) != k:
            errors.append(doc.error(("clients", i, "id"), f"client id {client_id!r} is used twice; ids must be unique"))
        for j, route_id in _names(client.get("routes")):
            if route_id not in route_ids:
                errors.append(doc.error(("clients", i, "routes", j),
                                        f"unknown route {route_id!r}; list route ids from routes"))
    return errors


def _mappings(value: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)] if isinstance(value, list) else []


def _names(value: Any) -> list[tuple[int, str]]:
    if not isinstance(value, list):
        return []  # not a list: the schema check says so
    return [(j, name) for j, item in enumerate(value) if (name := _name(item)) is not None]


def _name(value: Any) -> str | None:
    """An id or a name as the schema reads it (client ids may be written as numbers)."""
    if isinstance(value, bool):
        return None
    return str(value) if isinstance(value, str | int) and str(value) else None


# Placeholders seen in examples and tutorials (including this project's own, before they were removed).
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "example", "default", "placeholder",
                 "not-for-production", "password", "secret", "demo", "test", "0123456789", "123456", "xxxxxx")


def weak_admin_token(token: str | None) -> str | None:
    """Why an admin token is guessable, or None. Unset (empty) is not weak: the admin API then refuses every call."""
    if not token:
        return None
    if len(token) < 32:
        return f"admin.token is only {len(token)} characters"
    lowered = token.lower()
    if any(word in lowered for word in _PLACEHOLDERS) or len(set(token)) < 10:
        return "admin.token looks like a placeholder or a default"
    return None


def _warnings(doc: YamlDocument, config: Config, authenticators: dict[str, Any]) -> list[str]:

    warnings = []
    problem = weak_admin_token(config.admin.token)
    if problem:
        warnings.append(doc.error(("admin", "token"), f"{problem}; anyone who can reach the admin port could "
                                  "guess it: use 32+ random characters, e.g. `openssl rand -hex 32`"))
    if config.issuer is not None and not config.issuer.signing_keys():
        warnings.append(doc.error(("issuer",), "issuer.signing_key is not set: there is no token endpoint (404) "
                                  "and no token is issued; set it to a key from `sidecar keygen`"))
    used = {name for route in config.routes for name in route.auth}
    for name in authenticators:
        if name not in used:
            warnings.append(doc.error(("authenticators", name), f"authenticator {name!r} is not used by any route"))
    if config.identity.signed_token and not (config.issuer and config.issuer.signing_keys()):
        warnings.append(doc.error(("identity", "signed_token"),
                                  "signed_token is on but issuer.signing_key is not set: no X-Auth-Token will be sent"))
    for earlier, later in shadowed_routes(config.routes):
        warnings.append(doc.error(
            ("routes", later),
            f"route {config.routes[later].id!r} is shadowed by route {config.routes[earlier].id!r} above it "
            "(first match wins); move it up or narrow the earlier match",
        ))
    for name, auth in authenticators.items():
        for message in getattr(auth, "warnings", lambda: [])():
            warnings.append(doc.error(("authenticators", name), message))
        if getattr(auth, "needs_keys_secret", False) and not config.keys.secrets():
            warnings.append(doc.error(
                ("authenticators", name),
                "keys.secret is not set: a random per-process secret is used, so keys and session cookies die "
                "with the process and cannot be shared by replicas; set keys.secret (32+ bytes)",
            ))
    return warnings
