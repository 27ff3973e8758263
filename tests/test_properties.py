"""Properties that must hold for every input (hypothesis): path normalisation, glob matching, the config loader and
the decoders of keys and signed values. Each property's example count is kept small so the file runs in seconds;
the inputs that once broke a property are pinned with `@example` so they are tried on every run."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import warnings

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.authn.hmac_values import InvalidValue, sign, verify
from sidecar.authn.ip_key_sealing import InvalidKey, KeyClaims, Keyring
from sidecar.config.loader import parse
from sidecar.config.yaml_lines import ConfigError
from sidecar.errors import BadRequest
from sidecar.proxy.routing import glob_to_regex, matching_path, normalise_path
from sidecar.proxy.upstream_request import target

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

with warnings.catch_warnings():
    # When a property fails, hypothesis's pytest plugin imports its patch writer (libcst, whose typing-inspect warns
    # on import); under `filterwarnings = error` that import would turn the falsifying example into an INTERNALERROR.
    # Importing it here first, warning silenced, makes the plugin's import a no-op.
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

# --- path normalisation ---------------------------------------------------------------------------------------

PIECES = ["/", "/", "/", ".", "..", "%2e", "%2E", ".%2e", "%2e.", "%2f", "%2F", "%5c", "%5C", "%00", "\\", "\x00",
          ";", ";x=1", "a", "b", "admin", "%41", "%7e", "%7E", "~", "%", "%z", "%zz", "%c0%ae", "%e2%82%ac", " ", "é",
          "?", "#", "%25", "%252e", "-", "_", "*", ":", "@", "!", "$", "'", "(", "+", "=", "\x7f", "\n"]
raw_paths = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=14).map(lambda parts: ("/" + "".join(parts)).encode("utf-8")),
    st.lists(st.sampled_from(PIECES), max_size=14).map(lambda parts: "".join(parts).encode("utf-8")),
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b"/" + b),
)


@FAST
@given(raw_paths)
def test_normalisation_is_canonical_or_bad_request(raw: bytes) -> None:
    """normalise_path raises only BadRequest; its result starts with '/', is ASCII, has no dot-segment, no encoded
    separator or NUL, and is a fixed point (normalising it again changes nothing)."""
    try:
        path = normalise_path(raw)
    except BadRequest:
        return
    assert path.startswith("/")
    assert path.isascii()
    segments = path.split("/")[1:]
    assert "." not in segments and ".." not in segments
    assert "/../" not in path + "/" and "/./" not in path + "/"
    assert not re.search(r"%(2f|5c|00)", path, re.IGNORECASE)
    assert "\\" not in path and "\x00" not in path
    assert not any(segment.split(";", 1)[0] in (".", "..") for segment in segments)
    assert normalise_path(path.encode("ascii")) == path


@FAST
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "%2e%2e", "%2E.", ""]), max_size=12))
def test_normalisation_never_climbs_above_the_root(segments: list[str]) -> None:
    """A path whose `..` segments outnumber the segments before them is refused; otherwise the depth is exact."""
    raw = "/" + "/".join(segments)
    depth, climbed = 0, False
    for segment in segments:
        if segment in ("..", "%2e%2e", "%2E."):
            climbed = climbed or depth == 0
            depth = max(depth - 1, 0)
        elif segment in ("a", "b"):
            depth += 1
    try:
        path = normalise_path(raw.encode())
    except BadRequest:
        assert climbed
        return
    assert not climbed
    assert len([s for s in path.split("/") if s]) == depth


@FAST
@given(raw_paths)
def test_the_upstream_path_is_the_matched_path(raw: bytes) -> None:
    """What the upstream receives is the normalised path, byte for byte, after the configured base path."""
    try:
        path = normalise_path(raw)
    except BadRequest:
        return
    assert target("", path, b"") == path.encode("ascii")
    assert target("/base", path, b"q=1") == b"/base" + path.encode("ascii") + b"?q=1"
    assert matching_path(path) == matching_path(matching_path(path))


# --- glob matching --------------------------------------------------------------------------------------------

segment = st.from_regex(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,8}", fullmatch=True).filter(lambda s: s not in (".", ".."))
literal_paths = st.lists(segment, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts))


@FAST
@given(literal_paths)
def test_a_literal_path_matches_its_own_glob(path: str) -> None:
    """A pattern without wildcards matches exactly itself (not a prefix, not with a trailing segment)."""
    regex = re.compile(glob_to_regex(path))
    assert regex.match(path)
    assert not regex.match(path + "/x")
    assert not regex.match(path + "x")


@FAST
@given(literal_paths, st.lists(segment, max_size=5))
def test_double_star_matches_the_prefix_and_everything_under_it(prefix: str, rest: list[str]) -> None:
    """`/a/**` matches `/a`, `/a/` and any `/a/...`, never `/ab` or a sibling."""
    regex = re.compile(glob_to_regex(prefix + "/**"))
    assert regex.match(prefix)
    assert regex.match(prefix + "/")
    assert regex.match(prefix + "/" + "/".join(rest))
    assert not regex.match(prefix + "x")
    assert not regex.match(prefix + "x/" + "/".join(rest))


@FAST
@given(literal_paths, segment, segment)
def test_single_star_is_exactly_one_segment(prefix: str, one: str, two: str) -> None:
    """`/a/*` matches `/a/x`, never `/a` nor `/a/x/y`."""
    regex = re.compile(glob_to_regex(prefix + "/*"))
    assert regex.match(f"{prefix}/{one}")
    assert not regex.match(prefix)
    assert not regex.match(f"{prefix}/{one}/{two}")


# --- the config loader ----------------------------------------------------------------------------------------

YAML_TOKENS = ["version: 1\n", "upstream: http://127.0.0.1:9\n", "routes:\n", "authenticators:\n", "  - ", "  ",
               "id: r\n", "match: {path: /**}\n", "auth: [a]\n", "a: {type: jwt}\n", "type: anonymous\n", "&x ", "*x",
               "!!binary ", "!!python/object:os.system ", "!!str ", "!!int ", "!!float ", "!!set ", "!!omap ",
               "? ", ": ", "- ", "{", "}", "[", "]", ",", "\"", "'", "|\n", ">\n", "\t", "\n", "#", "%YAML 1.1\n",
               "---\n", "...\n", "${X}", "${X:-d}", "~", "null", ".nan", ".inf", "1e999", "0x1f", "é", "\x00", "\ufeff"]
yamlish = st.lists(st.sampled_from(YAML_TOKENS), max_size=25).map("".join)

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
              st.sampled_from(["/**", "/a/*", "http://127.0.0.1:1", "anonymous", "jwt", "remote", "ip_key", "1s",
                               "10ms", "-1s", "${X}"])),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["version", "upstream", "routes", "authenticators", "clients", "id", "match",
                                         "path", "auth", "type", "keys", "url", "from", "require", "cache", "ttl",
                                         "webhooks", "issuer", "secret", "tokens", "x"]), children, max_size=5),
    ),
    max_leaves=20,
)


@SLOW
@given(st.one_of(st.text(max_size=200), yamlish))
@example("a: &x [*x]\n")
@example("version: 1\nupstream: http://127.0.0.1:9\nroutes: &r [*r]\n")
@example("- !!binary xx\n")
@example("!!python/object:os.system x\n")
@example("a: !!int\n")
@example("a: !!float x\n")
@example("a: !!timestamp 2020-99-99\n")
def test_config_loader_raises_only_config_errors(text: str) -> None:
    """Any text: the loader returns a configuration or raises ConfigError (FILE:LINE messages), nothing else."""
    try:
        parse(text, "f.yaml", {})
    except ConfigError as exc:
        assert exc.errors and all(error.startswith("f.yaml:") for error in exc.errors)


@SLOW
@given(st.dictionaries(st.sampled_from(["version", "upstream", "routes", "authenticators", "clients", "keys",
                                        "cache", "identity", "webhooks", "issuer", "trusted_proxies"]),
                       json_values, max_size=6))
def test_config_loader_raises_only_config_errors_for_any_structure(data: dict[str, object]) -> None:
    """Any mapping of known top-level keys to any JSON: a configuration or ConfigError, nothing else."""
    try:
        parse(json.dumps(data), "f.yaml", {"X": "x"})
    except ConfigError as exc:
        assert exc.errors


# --- key and signed-value decoding -----------------------------------------------------------------------------

KEYRING = Keyring((b"k" * 32, b"l" * 40))
SESSION_KEY = b"s" * 32


@FAST
@given(st.one_of(st.text(max_size=300), st.text(max_size=300).map(lambda t: "ab_" + t),
                 st.binary(max_size=200).map(lambda b: "ab_" + base64.urlsafe_b64encode(b).decode().rstrip("="))))
def test_ip_key_decoder_refuses_garbage_without_crashing(text: str) -> None:
    """Keyring.open on any text raises InvalidKey (it cannot forge a key)."""
    try:
        KEYRING.open(text)
    except InvalidKey:
        return
    raise AssertionError(f"garbage opened as a key: {text!r}")


@FAST
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"u": json_values, "c": json_values, "t": json_values}).map(
                     lambda d: json.dumps(d).encode())))
@example(b'{"u":"a","c":"b","t":1e999}')
@example(b'{"u":"a","c":"b","t":-1e999}')
def test_ip_key_claims_decoder_refuses_garbage_without_crashing(data: bytes) -> None:
    """KeyClaims.unpack (the plaintext inside a key) returns claims or raises InvalidKey, nothing else."""
    try:
        claims = KeyClaims.unpack(data)
    except InvalidKey:
        return
    assert isinstance(claims.issued_at, int)


@FAST
@given(st.one_of(st.text(max_size=200), st.text(max_size=100).map(lambda t: "v1." + t),
                 st.tuples(st.text(max_size=40), st.text(max_size=40)).map(lambda p: f"v1.{p[0]}.{p[1]}")))
@example("v1.\u00e9.AAAA")
@example("v1.a\udcff.AAAA")
@example("v1.a.A")
@example("v1.A.AAAAA")
def test_signed_value_decoder_refuses_garbage_without_crashing(text: str) -> None:
    """signed_values.verify on any text (a cookie value) raises InvalidValue; it never crashes."""
    try:
        verify([SESSION_KEY], text)
    except InvalidValue:
        return
    raise AssertionError(f"garbage verified: {text!r}")


def signed_raw(payload: bytes) -> str:
    """A value correctly signed over an arbitrary payload: what a holder of the key could make."""
    body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    mac = hmac.new(SESSION_KEY, f"v1.{body}".encode(), hashlib.sha256).digest()
    return f"v1.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


@FAST
@given(st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["exp", "sub", "a"]), json_values).map(
                     lambda d: json.dumps(d).encode())))
@example(b'{"exp": 1e999}')
@example(b'{"exp": NaN}')
def test_signed_value_payloads_are_checked_after_the_signature(payload: bytes) -> None:
    """A well-signed value whose payload is any bytes: claims with a finite, future exp, or InvalidValue."""
    try:
        claims = verify([SESSION_KEY], signed_raw(payload))
    except InvalidValue:
        return
    assert isinstance(claims, dict)
    assert isinstance(claims["exp"], int | float) and 0 < claims["exp"] < 1e11


@FAST
@given(st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=4), st.integers(1, 10**10))
def test_signed_values_round_trip(claims: dict[str, str], exp: int) -> None:
    """What sign() makes, verify() reads back unchanged (with fresh=False: the expiry may be past)."""
    value = sign(SESSION_KEY, {**claims, "exp": exp})
    assert verify([SESSION_KEY], value, fresh=False) == {**claims, "exp": exp}
