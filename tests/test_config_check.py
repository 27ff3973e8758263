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
    path.write_text(f"version: 1\nupstream: http://127.0.0.1:9\nadmin:\n  token: ${{{UNSET}:-fallback}}\nroutes: []\n")

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
