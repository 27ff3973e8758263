"""Value types shared by every part of the configuration: durations, credential sources, networks, keys."""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Model(BaseModel):
    """Every config object: unknown keys are errors (they are usually typos), and objects are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 300s, 5m, 1h or 250ms")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration; write it as 300s, 5m, 1h or 250ms")


# The JSON Schema (`sidecar schema`) describes what the YAML may say, not the parsed value.
_DURATION_SCHEMA = {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION.pattern}],
                    "description": "A duration: 250ms, 300s, 5m, 1h (a bare number is seconds).", "examples": ["300s"]}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network such as 10.0.0.0/8") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(parse_network),
                    WithJsonSchema({"type": "string", "description": "An IP address or CIDR network.",
                                    "examples": ["10.0.0.0/8"]})]

SOURCE_KINDS = ("header", "query", "form", "cookie", "body")


class Source(Model):
    """Where a credential is read: `header:Authorization`, `query:access_token`, `form:key`, `cookie:NAME`,
    `body.token` (a JSON or form body field)."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"body.{self.name}" if self.kind == "body" else f"{self.kind}:{self.name}"


def parse_source(value: Any) -> Source:
    if isinstance(value, Source):
        return value
    text = str(value).strip()
    if text.startswith("body."):
        kind, name = "body", text[5:]
    elif text.startswith("form.") or text.startswith("query."):
        kind, _, name = text.partition(".")
    else:
        kind, _, name = text.partition(":")
    if kind not in SOURCE_KINDS or not name:
        raise ValueError(
            f"{value!r} is not a credential source; write header:NAME, query:NAME, form:NAME, cookie:NAME or body.FIELD"
        )
    return Source(kind=kind, name=name.lower() if kind == "header" else name)


CredentialSource = Annotated[Source, BeforeValidator(parse_source), WithJsonSchema({
    "type": "string", "pattern": r"^(header:|query:|form:|cookie:|query\.|form\.|body\.).+",
    "description": "Where the credential is read: header:NAME, query:NAME, form:NAME, cookie:NAME or body.FIELD.",
    "examples": ["header:Authorization", "query:access_token"]})]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


def load_public_key(value: Any) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo or PKCS#1), raw or base64 of the PEM, or a certificate."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a PEM public key (-----BEGIN PUBLIC KEY-----), or the base64 of one")
    text = value.strip()
    if "-----BEGIN" not in text:
        try:
            text = base64.b64decode(text, validate=False).decode("ascii").strip()
        except (ValueError, UnicodeDecodeError):
            raise ValueError(
                "not a PEM public key nor base64 of one; paste the -----BEGIN PUBLIC KEY----- block"
            ) from None
    data = text.encode()
    try:
        if "CERTIFICATE" in text:
            from cryptography import x509

            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(
            "not a valid PEM public key; paste the whole -----BEGIN PUBLIC KEY----- block (or RSA PUBLIC KEY)"
        ) from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValueError(f"RSA key of {key.key_size} bits is too weak; use 2048 bits or more")
    if not isinstance(key, PublicKey):
        raise ValueError("unsupported key type; use RSA, EC (P-256/P-384/P-521) or Ed25519")
    return key


def _check_public_key(value: str) -> str:
    load_public_key(value)
    return value


PublicKeyPem = Annotated[str, AfterValidator(_check_public_key)]  # validated per item: errors name the item


def load_private_key(value: Any) -> Any:
    if not isinstance(value, str) or "-----BEGIN" not in value:
        raise ValueError("expected a PEM private key; generate one with `sidecar keygen`")
    try:
        return serialization.load_pem_private_key(value.strip().encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("not a valid unencrypted PEM private key; generate one with `sidecar keygen`") from None

MAX_PEM = 16 * 1024
ClientPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def load_client_public_key(value: Any) -> ClientPublicKey:
    """A client's key: PEM or base64 of PEM, PKCS#1 or SubjectPublicKeyInfo; RSA of 2048 bits or more, or EC
    P-256 — the keys of the only algorithms `client_jwt` accepts (RS256, PS256, ES256)."""
    if isinstance(value, str) and len(value) > MAX_PEM:
        raise ValueError(f"the key is longer than {MAX_PEM} characters; send one PEM public key")
    key = load_public_key(value)
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return key
        raise ValueError(f"EC keys must be on P-256 (ES256); this one is on {key.curve.name}")
    raise ValueError("client keys must be RSA (2048 bits or more) or EC P-256: client_jwt accepts RS256, PS256, ES256")
