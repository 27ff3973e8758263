"""`sidecar check` (SPEC §1, §2): every error at once as `FILE:LINE: place: message`, exit 1; a good file exits 0.

The files are hand-written YAML (not JSON) so that line numbers mean something; the expected lines are found
by searching the file for a marker, so editing a fixture cannot silently shift them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.testing import KeyPair

UNSET = "SIDECAR_TEST_SURELY_UNSET_VARIABLE"
ADMIN_TOKEN_VAR = "SIDECAR_TEST_ADMIN_TOKEN"

BAD = """\
version: 1
upstream: http://127.0.0.1:9
authenticators:
  partner:
    type: jwt
    jwks_url: https://idp.example/jwks.json
    isuer: https://idp.example
  legacy:
    type: jwt
    keys:
      - |
        -----BEGIN PUBLIC KEY-----
        bm90IGEga2V5IGF0IGFsbA==
        -----END PUBLIC KEY-----
routes:
  - id: api
    match: {path: /api/**}
    auth: [partner, legacy]
  - id: other
    match: {path: /other/**}
    auth:
      - partnr
"""


def _good(pem: str) -> str:
    return textwrap.dedent("""\
        version: 1
        upstream: http://127.0.0.1:9
        admin:
          token: ${%s}
        cache: {ttl: 5m, negative_ttl: 10s}
        authenticators:
          partner:
            type: jwt
            issuer: https://idp.example
            audience: api
            leeway: 30s
            keys:
              - |
        %s
          public:
            type: anonymous
        routes:
          - id: health
            match: {path: /health, methods: [GET]}
            auth: [public]
          - id: api
            match: {path: /api/**}
            auth: [partner]
            require: {scopes: [read]}
        """) % (ADMIN_TOKEN_VAR, textwrap.indent(pem.strip(), " " * 10))


def run_check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in (UNSET, ADMIN_TOKEN_VAR, "SIDECAR_CONFIG")}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                          capture_output=True, text=True, env=environment, timeout=60)


def line_of(text: str, marker: str) -> int:
    [line] = [i for i, content in enumerate(text.splitlines(), 1) if marker in content]
    return line


def error_lines(path: Path, output: str) -> list[tuple[int, str, str]]:
    """Every output line as (line, place, message); fails on a line not in the `FILE:LINE: place: message` form."""
    pattern = re.compile(rf"^{re.escape(str(path))}:(\d+): (\S+): (.+)$")
    parsed = []
    for text in output.splitlines():
        match = pattern.match(text)
        assert match, f"not FILE:LINE: place: message: {text!r}"
        parsed.append((int(match.group(1)), match.group(2), match.group(3)))
    return parsed


def test_check_reports_every_error_with_its_line(tmp_path: Path) -> None:
    """A typo'd key, a bad PEM and an unknown authenticator are all reported at their lines; exit 1."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(BAD)

    result = run_check(path)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    errors = error_lines(path, result.stderr)
    assert len(errors) == 3
    by_place = {place: (line, message) for line, place, message in errors}

    line, message = by_place["authenticators.partner.isuer"]
    assert line == line_of(BAD, "isuer:")
    assert "'isuer'" in message and "did you mean 'issuer'?" in message

    pem_errors = {place: line for place, (line, _) in by_place.items() if place.startswith("authenticators.legacy")}
    # The field (`keys:`) or its bad item is the right place; either way the line is in the legacy block.
    assert pem_errors in ({"authenticators.legacy.keys": line_of(BAD, "keys:")},
                          {"authenticators.legacy.keys[0]": line_of(BAD, "- |")})
    [pem_message] = [m for p, (_, m) in by_place.items() if p.startswith("authenticators.legacy")]
    assert "PEM" in pem_message

    line, message = by_place["routes[1].auth[0]"]
    assert line == line_of(BAD, "- partnr")
    assert "'partnr'" in message
    assert "partner" in message  # names the known authenticators


def test_check_reports_an_unset_variable_by_name(tmp_path: Path) -> None:
    """A referenced but unset ${VAR} is an error naming the variable, at its line; exit 1."""
    text = textwrap.dedent(f"""\
        version: 1
        upstream: http://127.0.0.1:9
        admin:
          token: ${{{UNSET}}}
        routes: []
        """)
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)

    result = run_check(path)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    [(line, place, message)] = error_lines(path, result.stderr)
    assert (line, place) == (line_of(text, UNSET), "admin.token")
    assert UNSET in message


def test_check_default_for_an_unset_variable_is_used(tmp_path: Path) -> None:
    """${VAR:-default} with VAR unset is not an error."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"version: 1\nupstream: ${{{UNSET}:-http://127.0.0.1:9}}\nroutes: []\n")

    result = run_check(path)

    assert (result.returncode, result.stderr) == (0, "")


@pytest.fixture(scope="module")
def good_text() -> str:
    return _good(KeyPair("EC").public_pem)


def test_check_accepts_a_good_file(tmp_path: Path, good_text: str) -> None:
    """A valid file, its ${VAR} set, exits 0 and says ok; no warnings."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(good_text)

    result = run_check(path, **{ADMIN_TOKEN_VAR: "an-admin-token-from-the-environment"})

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{path}: ok")


def test_check_uses_sidecar_config_from_the_environment(tmp_path: Path, good_text: str) -> None:
    """Without --config, $SIDECAR_CONFIG names the file."""
    path = tmp_path / "elsewhere.yaml"
    path.write_text(good_text)
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    environment.update({"SIDECAR_CONFIG": str(path), ADMIN_TOKEN_VAR: "token"})

    result = subprocess.run([sys.executable, "-m", "sidecar", "check"], capture_output=True, text=True,
                            env=environment, cwd=tmp_path, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok")


POLICIES = Path(__file__).resolve().parent.parent / "policies"


@pytest.mark.parametrize("policy", sorted(p.name for p in POLICIES.glob("*.yaml") if not p.name.endswith("tests.yaml")))
def test_every_example_policy_passes_check_with_a_clean_environment(policy: str) -> None:
    """Each file in policies/ passes `sidecar check` with no variable set, and has no guessable admin token."""
    clean = {name: os.environ[name] for name in ("PATH", "PYTHONPATH", "HOME") if name in os.environ}
    path = POLICIES / policy
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                            capture_output=True, text=True, env=clean, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (")
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines()), result.stderr
    assert "admin.token" not in result.stderr


MANY_KINDS = """\
version: 1
upstream: http://127.0.0.1:9
cache: {ttl: 5m, max_entries: lots}
admin: {token: "${UNSET_VARIABLE}"}
routes:
  - id: api
    match: {path: /api/**}
    auth: [partner, ghost]
  - id: api
    match: {path: /other/**}
    auth: partner
    max_body: -1
  - id: third
    match: {path: /third/**, method: [GET]}
    auth: [partner]
authenticators:
  partner:
    type: jwt
    jwks_url: https://idp.example/jwks.json
    leeway: [1]
""".replace("UNSET_VARIABLE", UNSET)

RAW_PYDANTIC = ("Input should", "Field required", "type=", "For further information", "Value error",
                "validation error", "pydantic", "List should", "Assertion failed")


def test_check_reports_every_kind_of_error_in_one_run_sorted_by_line(tmp_path: Path) -> None:
    """Schema errors, an unset variable, an unknown authenticator, a duplicated route id: all, by line, with fixes."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(MANY_KINDS)

    result = run_check(path)

    assert result.returncode == 1
    assert result.stdout == ""
    for wording in (*RAW_PYDANTIC, "Traceback"):
        assert wording not in result.stderr
    errors = error_lines(path, result.stderr)
    assert [line for line, _, _ in errors] == sorted(line for line, _, _ in errors)
    got = {place: (line, message) for line, place, message in errors}
    assert set(got) == {"cache.max_entries", "admin.token", "routes[0].auth[1]", "routes[1].id", "routes[1].auth",
                        "routes[1].max_body", "routes[2].match.method", "authenticators.partner.leeway"}
    expected = {  # place: (marker on its line, words of the message)
        "cache.max_entries": ("max_entries: lots", ("expected a whole number", "not text", "write digits")),
        "admin.token": ("admin:", (UNSET, "is not set", "export")),
        "routes[0].auth[1]": ("ghost", ("'ghost'", "define it under authenticators", "partner")),
        "routes[1].id": ("- id: api", ("'api' is used twice", "unique")),
        "routes[1].auth": ("auth: partner", ("expected a list", "not text", "[a, b]")),
        "routes[1].max_body": ("max_body: -1", ("must be at least 0", "not -1")),
        "routes[2].match.method": ("method: [GET]", ("unknown key 'method'", "did you mean 'methods'?")),
        "authenticators.partner.leeway": ("leeway:", ("not a duration", "300s")),
    }
    for place, (marker, words) in expected.items():
        line, message = got[place]
        if place == "routes[1].id":
            assert line == [i for i, text in enumerate(MANY_KINDS.splitlines(), 1) if marker in text][1]
        else:
            assert line == line_of(MANY_KINDS, marker), place
        for word in words:
            assert word in message, (place, message)


@pytest.mark.parametrize(("token", "problem"), [
    ("short-token", "only 11 characters"),
    ("change-me-admin-token-0123456789abcdef", "placeholder"),
    ("demo-admin-token-change-me-0123456789", "placeholder"),
])
def test_check_warns_on_a_short_or_default_admin_token(tmp_path: Path, token: str, problem: str) -> None:
    """A short or placeholder admin token passes `check` with a warning naming admin.token, its line and the fix."""
    text = f"version: 1\nupstream: http://127.0.0.1:9\nadmin:\n  token: ${{{ADMIN_TOKEN_VAR}}}\nroutes: []\n"
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)

    result = run_check(path, **{ADMIN_TOKEN_VAR: token})

    assert result.returncode == 0
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warning: {path}:{line_of(text, 'token:')}: admin.token: ")
    assert problem in warning and "openssl rand -hex 32" in warning
    assert token not in warning


def test_check_is_quiet_about_a_long_random_admin_token(tmp_path: Path) -> None:
    """A 64-hex-character admin token, as `openssl rand -hex 32` makes, draws no warning."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(f'version: 1\nupstream: http://127.0.0.1:9\nadmin: {{token: "${{{ADMIN_TOKEN_VAR}}}"}}\n'
                    "routes: []\n")

    result = run_check(path, **{ADMIN_TOKEN_VAR: "9c1f0e6a4b3d2c8e7f5a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"})

    assert (result.returncode, result.stderr) == (0, "")
