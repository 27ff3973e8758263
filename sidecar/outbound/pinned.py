"""Outbound calls to addresses named in configuration (the validation webservices of `sidecar.authn.remote_check`).

The operator wrote these URLs, and the usual validation service sits in the same pod or network, so internal
addresses are allowed by default. An operator who wants the guard webhooks always have sets
`allow_private: false`: a URL naming a public host can still resolve to loopback, a private network or the
cloud metadata address (169.254.169.254), and an attacker who controls DNS, or a typo, would then point the
sidecar at internal services (SSRF). With the guard on, the host is resolved once, *every* address must be
public (by `sidecar.outbound.guard.forbidden_reason`, as for webhooks: `::ffff:127.0.0.1` is loopback), and
the connection is pinned to the checked address. The TLS server name and the `Host` header still carry
the configured name, so certificate checks are unchanged. Resolving again at connect time would reopen
the hole (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import httpx

from sidecar.outbound.guard import forbidden_reason

__all__ = ["PrivateAddress", "pinned_target"]


class PrivateAddress(Exception):
    """The host resolves to an address that is not global, and `allow_private: false` is set."""


def _public(address: str) -> bool:
    # One definition of "internal" for every outbound call: the webhook guard's (NAT64, 6to4 and mapped IPv6
    # unwrapped; RFC 1918, RFC 6598, link-local, documentation and reserved ranges refused).
    return forbidden_reason(ipaddress.ip_address(address.split("%", 1)[0])) is None


async def pinned_target(url: str, allow_private: bool) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The URL to connect to, the headers and the request extensions that pin it to a checked address."""
    parsed = httpx.URL(url)
    if allow_private:
        return parsed, {}, {}
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"cannot resolve the host ({exc.strerror or exc})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(_public(a) for a in addresses):
        raise PrivateAddress("the host resolves to a loopback, private or link-local address, and allow_private: "
                             "false is set; remove that line if that is intended")
    netloc = parsed.netloc.decode("ascii")
    extensions: dict[str, Any] = {"sni_hostname": host} if parsed.scheme == "https" else {}
    # Connection: close, because the client's pool keys connections by address: a kept-alive connection whose
    # TLS session was verified for one name could otherwise carry a request for another name on that address.
    return parsed.copy_with(host=addresses[0]), {"Host": netloc, "Connection": "close"}, extensions
