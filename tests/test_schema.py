"""`sidecar schema` (issue 16): the configuration's JSON Schema, its committed copy, and the chart's
values.schema.json — checked with the jsonschema package against real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sidecar.authn.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted(p for p in (ROOT / "policies").glob("*.yaml") if not p.name.endswith(".tests.yaml"))


def printed_schema() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "sidecar", "schema"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = printed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_what_sidecar_schema_prints():
    """schema/sidecar.schema.json is up to date (regenerate: sidecar schema > schema/sidecar.schema.json)."""
    committed = json.loads((ROOT / "schema" / "sidecar.schema.json").read_text())
    assert committed == printed_schema(), "stale: run `sidecar schema > schema/sidecar.schema.json`"


def test_every_authenticator_type_is_its_own_variant_discriminated_on_type(validator):
    """authenticators.* is a oneOf with one variant per registered type, discriminated on `type`."""
    entry = validator.schema["properties"]["authenticators"]["additionalProperties"]
    assert set(entry["discriminator"]["mapping"]) == set(REGISTRY)
    assert len(entry["oneOf"]) == len(REGISTRY)
    assert validator.schema["properties"]["routes"]["description"]
    assert validator.schema["$defs"]["CacheConfig"]["properties"]["ttl"]["default"] == 300.0


@pytest.mark.parametrize("policy", POLICIES, ids=[p.name for p in POLICIES])
def test_every_bundled_policy_validates(validator, policy: Path):
    """Every file in policies/ validates as an editor sees it (before ${VAR} substitution)."""
    data = yaml.safe_load(policy.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert errors == []


@pytest.mark.parametrize(("where", "typo"), [
    ((), "upstrem"),
    (("cache",), "negativ_ttl"),
    (("authenticators", "partner_jwt"), "jwks_ur"),
    (("routes", 0), "requires"),
])
def test_a_typod_key_is_rejected(validator, where: tuple, typo: str):
    """A misspelt key anywhere (top level, nested block, inside an authenticator, in a route) fails validation."""
    data = yaml.safe_load((ROOT / "policies" / "demo.yaml").read_text())
    data.setdefault("cache", {})
    data["authenticators"]["partner_jwt"] = {"type": "jwt", "jwks_url": "https://idp.example/jwks.json"}
    target = data
    for key in where:
        target = target[key]
    target[typo] = "x"
    errors = list(validator.iter_errors(data))
    assert errors, f"{typo} was accepted"


def test_a_wrong_authenticator_type_is_rejected(validator):
    """An unknown `type:` (or a key of another type's variant) is no valid authenticator."""
    data = yaml.safe_load((ROOT / "policies" / "demo.yaml").read_text())
    data["authenticators"]["x"] = {"type": "jwtt"}
    assert list(validator.iter_errors(data))
    data["authenticators"]["x"] = {"type": "anonymous", "jwks_url": "https://idp.example/jwks.json"}
    assert list(validator.iter_errors(data))


def test_helm_values_validate_against_the_chart_schema():
    """helm/sidecar/values.yaml validates against helm/sidecar/values.schema.json; a typo'd or mistyped value
    does not."""
    chart = ROOT / "helm" / "sidecar"
    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    check = jsonschema.Draft7Validator(schema)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert [e.message for e in check.iter_errors(values)] == []
    assert list(check.iter_errors({**values, "workerz": 2}))
    assert list(check.iter_errors({**values, "workers": "two"}))
    assert list(check.iter_errors({**values, "metricsPort": "x"}))
