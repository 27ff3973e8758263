"""`sidecar demo`: the demo policies in front of the bundled echo upstream, an in-process cache, and curl
lines that show each kind of credential accepted and refused."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx


def _port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


def demo_policy_path() -> Path:
    return Path(str(resources.files("sidecar.policies").joinpath("demo.yaml")))


def examples(url: str, keys: Any, client_token: str, reader_key: str) -> list[tuple[str, str, dict[str, str], int]]:
    """(what it shows, path, headers, expected status) for each demo request."""
    good = keys.token({"iss": "https://idp.demo", "aud": "billing", "scope": "invoices:read"}, lifetime=3600)
    expired = keys.token({"iss": "https://idp.demo", "aud": "billing", "scope": "invoices:read"}, lifetime=-120)
    other_aud = keys.token({"iss": "https://idp.demo", "aud": "someone-else", "scope": "invoices:read"})
    return [
        ("anonymous route: accepted", "/public/status", {}, 200),
        ("JWT with the right scope: accepted (the backend sees X-Auth-*, not the token)",
         "/api/invoices/42?month=11", {"Authorization": f"Bearer {good}"}, 200),
        ("JWT as ?access_token=: accepted, and removed from the forwarded query",
         f"/api/invoices/42?access_token={good}&month=11", {}, 200),
        ("no credential: refused 401", "/api/invoices/42", {}, 401),
        ("garbage token: refused 401", "/api/invoices/42", {"Authorization": "Bearer not-a-jwt"}, 401),
        ("expired JWT: refused 401", "/api/invoices/42", {"Authorization": f"Bearer {expired}"}, 401),
        ("JWT for another audience: refused 401", "/api/invoices/42", {"Authorization": f"Bearer {other_aud}"}, 401),
        ("JWT without the payments:write scope: refused 403", "/api/payments/1",
         {"Authorization": f"Bearer {good}"}, 403),
        ("client token: accepted (X-Auth-Client: demo-partner)", "/api/transactions/7",
         {"X-Client-Token": client_token}, 200),
        ("unknown client token: refused 401", "/api/transactions/7", {"X-Client-Token": "sct_not-a-real-token"}, 401),
        ("client token on a route outside the client's routes: refused 403 route_not_allowed", "/api/reports/1",
         {"X-Client-Token": client_token}, 403),
        ("IP-bound key (from POST /_sidecar/keys): accepted, key not forwarded, session cookie set",
         f"/pub/magazine/1?key={reader_key}&page=3", {}, 200),
        ("tampered key: refused 401", f"/pub/magazine/1?key={reader_key[:-4]}AAAA", {}, 401),
        ("token the customer's webservice says S to: accepted", "/portal/home?token=good-123", {}, 200),
        ("token the webservice says N to: refused 401", "/portal/home?token=bad-123", {}, 401),
        ("forged identity header: stripped (the echo shows the sidecar's own)", "/public/status",
         {"X-Auth-Subject": "admin"}, 200),
        ("no route: refused 404", "/nowhere", {}, 404),
    ]


async def _validator(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The customer's `valida_token` webservice of seed 001: prints S for tokens starting good-, else N."""
    if scope["type"] != "http":
        return
    answer = b"S" if b"token=good-" in scope.get("query_string", b"") else b"N"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": answer})


def run_demo(argv: list[str] | None = None) -> int:
    from sidecar.echo import EchoApp
    from sidecar.server.runner import Serving, bind
    from sidecar.state.client_token_store import new_token, token_hash
    from sidecar.testing import KeyPair, serve_in_thread

    self_test = "--self-test" in (argv if argv is not None else sys.argv)
    keys = KeyPair()
    client_token = new_token()
    with serve_in_thread(EchoApp(), _port(8081)) as upstream_url, serve_in_thread(_validator, _port(8082)) as vurl:
        os.environ["SIDECAR_DEMO_UPSTREAM"] = upstream_url
        os.environ["SIDECAR_DEMO_VALIDATOR"] = vurl
        os.environ["SIDECAR_DEMO_JWT_PUBLIC_KEY"] = keys.public_pem
        os.environ["SIDECAR_DEMO_CLIENT_TOKEN_SHA256"] = token_hash(client_token)
        port, admin_port = _port(8080), _port(9901)
        serving = Serving(str(demo_policy_path()), bind("127.0.0.1", port), bind("127.0.0.1", admin_port))
        url = f"http://127.0.0.1:{port}"
        import asyncio
        import threading

        thread = threading.Thread(target=lambda: asyncio.run(serving.run()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not serving.started.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        print(f"sidecar demo: proxy on {url}, admin on http://127.0.0.1:{admin_port}, echo upstream on {upstream_url}")
        print(f"policies: {demo_policy_path()}")
        print(f"demo client token (client demo-partner): {client_token}\n")
        print("# a partner's server asks for a reader's key, bound to the reader's IP and 10 minutes:")
        key_body = {"user": "reader-1", "ip": "127.0.0.1", "expiry_minutes": 10}
        print(f"curl -X POST -H 'X-Client-Token: {client_token}' -H 'Content-Type: application/json' "
              f"-d '{json.dumps(key_body)}' {url}/_sidecar/keys")
        reply = httpx.post(url + "/_sidecar/keys", json=key_body, headers={"X-Client-Token": client_token})
        reader_key = reply.json().get("key", "") if reply.status_code == 200 else ""
        print(f"#   -> {reply.status_code} {reply.text.strip()}\n")
        failures = 0 if reader_key else 1
        for what, path, headers, expected in examples(url, keys, client_token, reader_key):
            flags = " ".join(f"-H '{k}: {v}'" for k, v in headers.items())
            print(f"# {what}")
            print(f"curl -i {flags + ' ' if flags else ''}'{url}{path}'")
            if self_test:
                status = httpx.get(url + path, headers=headers).status_code
                ok = status == expected
                failures += not ok
                print(f"#   -> {status} {'ok' if ok else f'UNEXPECTED (wanted {expected})'}")
            print()
        if self_test:
            serving.stop()
            thread.join(10)
            return 1 if failures else 0
        print("Press Ctrl-C to stop.")
        try:
            while thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            serving.stop()
            thread.join(10)
    return 0
