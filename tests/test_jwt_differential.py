"""The hand-written JWS path (`sidecar.authn.jws`, behind the `jwt` authenticator) against PyJWT's `jwt.decode`.

The hand-written path exists for speed, and twice it silently dropped a check PyJWT makes (`crit`, a null `exp`). So
the same generated tokens — random header members (alg variants, kid and typ of every type, crit, b64, jku, jwk,
duplicated names), random claims (null, strings, bools, NaN, ±Infinity, huge numbers, nesting), segment spellings —
signed with real keys go to both, with equivalent options, and must get the same verdict. Where sidecar refuses
on purpose what PyJWT accepts, `stricter()` says so, rule by rule, with the reason. Sidecar must never accept what
PyJWT refuses, and must never raise anything but a refusal (anything else would be a 500). `client_jwt` goes
through the same `Token` and `check_claims`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
import warnings
from typing import Any

import jwt
import pytest
from conftest import b64url
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sidecar.authn.base import Credential
from sidecar.authn.jwt import JwtAuthenticator, JwtConfig
from sidecar.errors import Unauthenticated
from sidecar.issuer.signing_keys import IDENTITY_TOKEN_TYPE

with warnings.catch_warnings():  # as in test_properties.py: hypothesis's patch writer warns on import
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PUBLIC = EC_KEY.public_key()
HS_SECRET = "differential-test-secret-0123456789abcdef"
ALGORITHMS = ["ES256", "HS256"]
LEEWAY = 30
ISSUER, AUDIENCE = "https://idp.test", "api"
MISSING = object()  # a member left out

# Two configurations: every claim check on, and none beyond exp/nbf/iat.
CONFIGS = {
    "strict": {"issuer": ISSUER, "audience": AUDIENCE, "required_claims": ["tenant"]},
    "plain": {},
}
AUTHENTICATORS = {
    name: JwtAuthenticator("diff", JwtConfig(
        type="jwt", algorithms=ALGORITHMS, secret=HS_SECRET, leeway=LEEWAY,
        keys=[EC_PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
              .decode()], **options), context=None)  # type: ignore[arg-type]  # static keys: no context used
    for name, options in CONFIGS.items()
}


def json_object(pairs: list[tuple[str, Any]]) -> str:
    """A JSON object written member by member, so that a name may appear twice (RFC 7515 §5.2: the last wins)."""
    written = [f"{json.dumps(name)}:{json.dumps(value)}" for name, value in pairs if value is not MISSING]
    return "{" + ",".join(written) + "}"


# --- what is generated ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children,
                                                                                  max_size=3)),
    max_leaves=6,
)
ODD = st.one_of(st.none(), st.booleans(), st.just(""), st.integers(-3, 3), st.lists(st.text(max_size=3), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))

# Offsets from now kept ≥ 20 s off every boundary (±LEEWAY), so the two clocks, a few ms apart, agree.
OFFSETS = [-10**7, -3600, -120, -60, -10, 0, 10, 60, 120, 3600, 10**7]
times = st.builds(lambda offset, fraction: int(time.time()) + offset + fraction, st.sampled_from(OFFSETS),
                  st.sampled_from([0, 0.25, 0.75]))
odd_times = st.one_of(
    st.none(), st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0, -5, 1e11 + 1]),
    st.sampled_from([10**20, -10**20, 10**400]), st.sampled_from(["", "123", "2000000000", " 2000000000 ", "1e9", "x"]),
    times.map(str), st.lists(times, max_size=1), st.just({}),
)
timestamps = st.sampled_from([True] * 3 + [False]).flatmap(lambda plain: times if plain else odd_times)
strings_or_odd = st.one_of(st.text(max_size=5), ODD)

CLAIM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "exp": timestamps, "nbf": timestamps, "iat": timestamps,
    "iss": st.one_of(st.just(ISSUER), st.just(ISSUER), st.just("https://other.test"), ODD, st.just([ISSUER])),
    "aud": st.one_of(st.just(AUDIENCE), st.just([AUDIENCE]), st.just([AUDIENCE, "x"]), st.just([AUDIENCE, 1]),
                     st.just(["x"]), ODD),
    "sub": st.one_of(st.just("user-1"), st.just("user-1"), ODD),
    "jti": st.one_of(st.just("j-1"), ODD),
    "scope": st.one_of(st.just("read write"), st.just(["read"]), st.just(["read", 1]), ODD),
    "scp": st.one_of(st.just(["read"]), st.just("read"), ODD),
    "client_id": st.one_of(st.just("c-1"), st.integers(0, 3), st.floats(allow_nan=False, width=16), ODD),
    "azp": st.one_of(st.just("c-2"), ODD),
    "tenant": st.one_of(st.just("t-1"), st.just("t-1"), ODD),
    "x": json_values,
}
HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "alg": st.one_of(st.sampled_from(["ES256", "HS256", "RS256", "none", "None", "", "es256", "HS512"]), ODD,
                     st.just(["ES256"])),
    "kid": st.one_of(st.just("k-1"), st.integers(), ODD),
    "typ": st.one_of(st.sampled_from(["JWT", "at+jwt", IDENTITY_TOKEN_TYPE]), ODD),
    "crit": st.one_of(st.sampled_from([["b64"], ["exp"], ["b64", "x"], ["x"], [], "b64", [1]]), ODD),
    "b64": st.one_of(st.booleans(), st.booleans(), st.sampled_from(["false", 0, 1, None])),
    "cty": st.sampled_from(["JWT", "json", 1]),
    "jku": st.sampled_from(["http://127.0.0.1:9/jwks.json", 1]),
    "x5u": st.just("http://127.0.0.1:9/cert.pem"),
    "jwk": st.just({"kty": "oct", "k": b64url(HS_SECRET.encode())}),
    "x": json_values,
}


def mostly(good: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` four times in six, else `other` or the member left out: most tokens come close to acceptable, so the
    boundary between accept and refuse is where the examples are."""
    # Not `one_of`: it flattens `other`'s own branches into its own, and `good` would be one branch among many.
    return st.sampled_from(["good"] * 4 + ["other", "missing"]).flatmap(
        lambda pick: st.just(good) if pick == "good" else other if pick == "other" else st.just(MISSING))


def members(values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """A few members with names drawn from `values` (repeats allowed)."""
    return st.lists(st.sampled_from(sorted(values)).flatmap(lambda name: st.tuples(st.just(name), values[name])),
                    max_size=3)


NOT_AN_OBJECT = st.sampled_from(["[]", '"x"', "1", "null", "{", '{"a":1', "", "[{}]"])


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, str]:
    """(the configuration's name, a token)."""
    signed_with = draw(st.sampled_from(ALGORITHMS))
    if draw(st.sampled_from([True] * 9 + [False])):
        alg = draw(mostly(signed_with, HEADER_VALUES["alg"]))
        header = json_object([("alg", alg), *draw(members(HEADER_VALUES))])
    else:
        header = draw(NOT_AN_OBJECT)
    if draw(st.sampled_from([True] * 9 + [False])):
        good = {"exp": int(time.time()) + 300, "iss": ISSUER, "aud": AUDIENCE, "tenant": "t-1"}
        base = [(name, draw(mostly(value, CLAIM_VALUES[name]))) for name, value in good.items()]
        payload = json_object([*base, *draw(members(CLAIM_VALUES))])
    else:
        payload = draw(NOT_AN_OBJECT)
    spelling = draw(st.sampled_from(["plain"] * 8 + ["padded", "spare_bits"]))
    return draw(st.sampled_from(sorted(CONFIGS))), encode(header, payload, signed_with, spelling)


def encode(header: str, payload: str, alg: str, spelling: str = "plain") -> str:
    segments = [b64url(header.encode()), b64url(payload.encode())]
    if spelling == "padded":  # base64 padding, signed as sent (PyJWT tolerates it: AWS ALB pads)
        segments = [s + "=" * (-len(s) % 4) for s in segments]
    signing_input = ".".join(segments).encode()
    key = HS_SECRET.encode() if alg == "HS256" else EC_KEY
    signature = b64url(jwt.get_algorithm_by_name(alg).sign(signing_input, key))
    if spelling == "padded":
        signature += "=" * (-len(signature) % 4)
    elif spelling == "spare_bits":  # the last character's unused low bits set: another spelling of the same bytes
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        signature = signature[:-1] + alphabet[alphabet.index(signature[-1]) | 1]
    return f"{signing_input.decode()}.{signature}"


# --- the two verdicts -------------------------------------------------------------------------------------------


def sidecar_accepts(config: str, token: str) -> bool:
    try:
        asyncio.run(AUTHENTICATORS[config].verify(Credential("token", token), None))  # type: ignore[arg-type]
    except Unauthenticated:
        return False
    return True


def pyjwt_accepts(config: str, token: str) -> bool:
    options = CONFIGS[config]
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        return False
    key = HS_SECRET if isinstance(alg, str) and alg.startswith("HS") else EC_PUBLIC
    try:
        jwt.decode(token, key, algorithms=ALGORITHMS, leeway=LEEWAY, issuer=options.get("issuer"),
                   audience=options.get("audience"),
                   # sidecar: exp is always required; aud is checked only when an audience is configured.
                   options={"require": ["exp", *options.get("required_claims", [])],
                            "verify_aud": "audience" in options})
    except jwt.PyJWTError:
        return False
    return True


def is_timestamp(value: Any) -> bool:
    """A JSON number, finite, from 1970 to the year 5138."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return 0 <= value <= 1e11


def stricter(token: str) -> str | None:
    """Why sidecar refuses this token although PyJWT accepts it; None when it should not. Only called on tokens
    PyJWT accepted, so header and payload are JSON objects."""
    if "=" in token:
        return "padding: RFC 7515 §2 base64url has none; PyJWT tolerates it for AWS ALB"
    header, claims = (json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))) for s in token.split(".")[:2])
    if "crit" in header:
        return "crit: sidecar understands no extension, not even b64 (PyJWT does b64)"
    if header.get("b64", True) is not True:
        return "b64: anything but true is an unencoded payload; PyJWT reads only false as such"
    if "typ" in header and not isinstance(header["typ"], str):
        return "typ: RFC 7515 §4.1.9 says a string; PyJWT does not look at typ"
    if header.get("typ") == IDENTITY_TOKEN_TYPE:
        return "typ: sidecar's own identity tokens are for backends, never a credential"
    for name in ("exp", "nbf", "iat"):
        if name in claims and not is_timestamp(claims[name]):
            return f"{name}: a finite number in [0, 1e11]; PyJWT takes int(value): '123', true, 1e30"
    scopes = claims.get("scope", claims.get("scp", ""))
    if not (isinstance(scopes, str) or (isinstance(scopes, list) and all(isinstance(s, str) for s in scopes))):
        return "scope/scp: sidecar reads scopes from them, so a malformed one is refused; PyJWT ignores them"
    client = claims.get("client_id") or claims.get("azp")
    if not isinstance(client, str | int | None):
        return "client_id/azp: sidecar forwards the client; PyJWT ignores it"
    return None


SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(tokens())
@example(("plain", encode('{"alg":"ES256","crit":["b64"],"b64":false}', '{"exp":9999999999}', "ES256")))
@example(("plain", encode('{"alg":"ES256","crit":["b64"],"b64":true}', '{"exp":9999999999}', "ES256")))
@example(("plain", encode('{"alg":"ES256","kid":7}', '{"exp":9999999999}', "ES256")))
@example(("plain", encode('{"alg":"ES256"}', '{"exp":null}', "ES256")))
@example(("plain", encode('{"alg":"ES256"}', '{"exp":9999999999,"nbf":null,"iat":null}', "ES256")))
@example(("plain", encode('{"alg":"ES256"}', '{"exp":Infinity}', "ES256")))
@example(("plain", encode('{"alg":"ES256"}', '{"exp":9999999999}', "ES256", "spare_bits")))
@example(("strict", encode('{"alg":"HS256"}', '{"exp":9999999999,"iss":"https://idp.test","aud":["api",1],'
                                               '"tenant":"t"}', "HS256")))
@example(("strict", encode('{"alg":"ES256"}', '{"exp":9999999999,"iss":"https://idp.test","aud":"api",'
                                               '"tenant":null}', "ES256")))
@example(("plain", encode('{"alg":"ES256"}', '{"exp":9999999999,"sub":7,"jti":1}', "ES256")))
@example(("plain", encode('{"alg":"ES256","alg":"HS256"}', '{"exp":9999999999}', "ES256")))
def test_hand_written_path_agrees_with_pyjwt(case: tuple[str, str]) -> None:
    """Same token, same options: sidecar accepts exactly what PyJWT accepts, minus the listed stricter rules."""
    config, token = case
    pyjwt = pyjwt_accepts(config, token)
    reason = stricter(token) if pyjwt else None
    expected = pyjwt and reason is None
    event("both accept" if expected else f"sidecar stricter: {reason.split(':')[0]}" if reason else "both refuse")
    assert sidecar_accepts(config, token) == expected, (
        f"sidecar {'accepted' if not expected else 'refused'}, PyJWT {'accepted' if pyjwt else 'refused'}"
        + (f" (sidecar is stricter: {reason})" if reason else ""))


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_both_accept_a_plain_token(config: str, alg: str) -> None:
    """The harness is not vacuous: a well-formed token with good claims is accepted by both."""
    now = int(time.time())
    token = encode(json.dumps({"alg": alg, "typ": "JWT"}), json.dumps(
        {"exp": now + 300, "iat": now, "nbf": now, "iss": ISSUER, "aud": AUDIENCE, "tenant": "t", "sub": "u",
         "scope": "read"}), alg)
    assert (sidecar_accepts(config, token), pyjwt_accepts(config, token)) == (True, True)
