"""Credentials for the benchmark: an RSA key, RS256 JWTs (a few, or many never-seen ones) and a client token."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import secrets
import signal
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://bench.local"
AUDIENCE = "bench"
TOKEN_TTL = 3600
MAX_REUSE_AGE = 40 * 60  # reuse cached tokens while they have at least ~20 minutes left
CHUNK = 5000


class KeyPair:
    def __init__(self, private_pem: bytes) -> None:
        self.private_pem = private_pem
        key = serialization.load_pem_private_key(private_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.private_key = key
        self.public_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )


def load_or_create_key(cache: Path) -> KeyPair:
    """The bench's RSA 2048 key, kept in the (git-ignored) cache so generated tokens stay valid."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "jwt-key.pem"
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return KeyPair(path.read_bytes())


def claims(sub: str, now: int) -> dict[str, object]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now + TOKEN_TTL, "iat": now, "scope": "read"}


def sign(key: KeyPair, sub: str, now: int | None = None) -> str:
    return jwt.encode(claims(sub, now or int(time.time())), key.private_key, algorithm="RS256")


_worker_key: KeyPair | None = None


def _init_worker(pem: bytes) -> None:
    global _worker_key
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must end us quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _worker_key = KeyPair(pem)


def _sign_range(args: tuple[int, int, int, str]) -> list[str]:
    start, stop, now, run_id = args
    assert _worker_key is not None
    return [sign(_worker_key, f"user-{run_id}-{i}", now) for i in range(start, stop)]


def fresh_tokens(key: KeyPair, count: int, cache: Path, min_valid: float = 0.0) -> list[str]:
    """``count`` distinct RS256 tokens, reused from the cache when recent enough (and, with ``min_valid``, valid for
    at least that many more seconds), else generated in parallel."""
    meta_path, tok_path = cache / "jwt-tokens.json", cache / "jwt-tokens.txt"
    key_id = hashlib.sha256(key.private_pem).hexdigest()[:16]
    if meta_path.exists() and tok_path.exists():
        meta = json.loads(meta_path.read_text())
        age = time.time() - meta.get("created", 0)
        fresh = age < MAX_REUSE_AGE and TOKEN_TTL - age >= min_valid
        if fresh and meta.get("key") == key_id and meta.get("count", 0) >= count:
            toks = tok_path.read_text().split()
            if len(toks) >= count:
                print(f"  reusing {count:,} cached JWTs from {tok_path}", flush=True)
                return toks[:count]
    now = int(time.time())
    run_id = secrets.token_hex(4)
    workers = max(1, os.cpu_count() or 1)
    print(f"  signing {count:,} RS256 tokens on {workers} processes (cached for later runs) ...", flush=True)
    t0 = time.monotonic()
    jobs = [(s, min(s + CHUNK, count), now, run_id) for s in range(0, count, CHUNK)]
    out: list[str] = []
    # Pool.__exit__ terminates the workers, also on Ctrl-C or the bench's time limit.
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (key.private_pem,)) as pool:
        for part in pool.imap(_sign_range, jobs):
            out.extend(part)
    print(f"  signed in {time.monotonic() - t0:.1f}s", flush=True)
    tmp = tok_path.with_suffix(".tmp")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(tok_path)
    meta_path.write_text(json.dumps({"created": now, "key": key_id, "count": count}))
    return out


def expires_at(token: str) -> int:
    """The ``exp`` claim of one of our tokens, read without verifying it."""
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def client_token() -> str:
    """A token shaped like the sidecar's: ``sct_`` + base64url (no padding) of 32 random bytes."""
    return "sct_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def sha256_ref(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
