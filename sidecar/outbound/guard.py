"""Which addresses the sidecar may call out to (SPEC §8), and HTTP clients that keep to them.

The one outbound-safety guard, used by webhook deliveries (always, unless a webhook sets `allow_private: true`)
and by validation services (`sidecar.authn.remote_check`, only when one sets `allow_private: false`: the operator
wrote those URLs and they usually point inside the pod or network).

A webhook URL chosen by a partner, or a DNS answer an attacker controls, could point the sidecar at itself,
at the pod network or at the cloud metadata service (169.254.169.254) — server-side request forgery. So,
unless the webhook sets `allow_private: true`, every address the host resolves to must be public: not
loopback, RFC 1918 private, carrier-grade NAT (RFC 6598), link-local, unique-local (RFC 4193), unspecified,
multicast, documentation or reserved — with IPv4 embedded in IPv6 (`::ffff:127.0.0.1`, NAT64, 6to4)
unwrapped first. Hosts are also read the way `inet_aton` reads them, since resolvers do: `2130706433`,
`0x7f000001`, `0177.0.0.1` and `127.1` are all 127.0.0.1.

Pinning: the check and the connection must use the same address, or a name that answered "public" to the
check could answer "127.0.0.1" to the connect (DNS rebinding). Rather than rewrite URLs, the client plugs
a network backend into httpcore: httpcore hands it (host, port) to open a TCP connection; it resolves the
name once, checks every address, and connects to a checked one. Everything above the TCP socket is
untouched — the `Host` header, the TLS SNI and the certificate check all still use the name in the URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

__all__ = ["GuardedBackend", "ServiceClient", "UnsafeDestination", "delivery_client", "forbidden_reason",
           "literal_address", "url_refusal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_V4, _V6 = ipaddress.IPv4Network, ipaddress.IPv6Network
# Checked in order: the first match names the reason. Anything not listed must still be `is_global`.
_FORBIDDEN: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified ('this network')"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private (RFC 1918)"),
    (_V4("172.16.0.0/12"), "private (RFC 1918)"),
    (_V4("192.168.0.0/16"), "private (RFC 1918)"),
    (_V4("100.64.0.0/10"), "carrier-grade NAT (RFC 6598)"),
    (_V4("169.254.0.0/16"), "link-local, where cloud metadata services live"),
    (_V4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    (_V4("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (_V4("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (_V4("198.18.0.0/15"), "reserved (benchmarking)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fc00::/7"), "unique-local (RFC 4193)"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated)"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("100::/64"), "reserved (discard)"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("64:ff9b:1::/48"), "NAT64 local-use (RFC 8215)"),
)
_NAT64 = _V6("64:ff9b::/96")
_V4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


class UnsafeDestination(Exception):
    """The host resolves to an address calls may not go to (and `allow_private` does not allow it)."""


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself, without DNS — in any spelling a resolver accepts — or None."""
    host = host.strip().removesuffix(".")  # a fully qualified spelling, `127.0.0.1.`, is the same address
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    return _inet_aton(host)


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 as inet_aton(3) reads it: 1 to 4 parts, each decimal, octal (0…) or hex (0x…); the last part
    fills the remaining bytes, so `127.1` is 127.0.0.1 and `2130706433` is too."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.match(p) for p in parts):
        return None
    values = [_inet_part(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(parts)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    return ipaddress.IPv4Address(number * 256 ** (5 - len(parts)) + last)


def _inet_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    return int(part, 8) if len(part) > 1 and part[0] == "0" else int(part)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64, 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why deliveries may not go to this address (e.g. "loopback"), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = forbidden_reason(inner)
            return f"{reason}, as {inner} inside an IPv6 address" if reason else None
    for network, reason in _FORBIDDEN:
        if ip.version == network.version and ip in network:
            return reason
    return None if ip.is_global else "reserved (not a global address)"


RECEIVER = {"webhook": "receiver", "validator": "service"}


def url_refusal(url: str, allow_private: bool = False, what: str = "webhook") -> str | None:
    """For `sidecar check`: why this URL is refused without DNS (a literal private address or `localhost`),
    or None. Names that need DNS are checked at delivery time only. Webhook receivers are guarded unless they
    set `allow_private: true`; validators (URLs the operator chose) only when they set `allow_private: false`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not a {what} URL; write https://host[:port]/path"
    if allow_private:
        return None
    host = parts.hostname.removesuffix(".")  # `localhost.` is the same name, fully qualified
    reason: str | None
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 §6.3: always loopback
        reason, address = "loopback", host
    else:
        ip = literal_address(host)
        reason, address = (forbidden_reason(ip), str(ip)) if ip is not None else (None, "")
    if reason is None:
        return None
    if what != "webhook":  # validators allow internal addresses unless the operator turned the guard on
        return (f"the {what} URL points at {address} ({reason}), where calls are refused because this {what} sets "
                f"allow_private: false; remove that line if the {RECEIVER[what]} is meant to be internal")
    return (f"the {what} URL points at {address} ({reason}), where deliveries are refused; use a "
            f"public URL, or set allow_private: true on this {what} if the {RECEIVER[what]} is meant to be internal")


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's TCP connector, resolving once, checking every address, and connecting to a checked one."""

    def __init__(self, allow_private: bool, resolve: Resolver | None = None, what: str = "webhook") -> None:
        self.allow_private = allow_private
        self._what = what
        self._resolve = resolve or _system_resolve
        self._inner = httpcore.AnyIOBackend()

    async def addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        literal = literal_address(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            try:
                candidates = await asyncio.wait_for(self._resolve(host, port), timeout)
            except (OSError, TimeoutError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not self.allow_private:
            for address in candidates:
                # One bad answer refuses them all: a name that mixes public and internal answers is an attack.
                reason = forbidden_reason(ipaddress.ip_address(address.split("%", 1)[0]))
                if reason:
                    raise UnsafeDestination(f"{host} resolves to {address} ({reason}); {self._refusal()}")
        return candidates

    def _refusal(self) -> str:
        if self._what == "webhook":
            return "deliveries there are refused unless the webhook sets allow_private: true"
        return (f"calls there are refused because this {self._what} sets allow_private: false; remove that line if "
                "that is intended")

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in await self.addresses(host, port, timeout):
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not outbound destinations")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, backend: GuardedBackend, limits: httpx.Limits, verify: ssl.SSLContext | bool) -> None:
        super().__init__(trust_env=False, limits=limits)
        # httpx's one private attribute the sidecar uses (the httpx version is capped in pyproject.toml): httpx has no
        # public way to choose httpcore's network backend, and `_pool` is what its request path sends through.
        # tests/test_dependency_internals.py fails with a clear message if a new httpx changes that.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=backend,
        )


def delivery_client(allow_private: bool, max_connections: int = 32, resolve: Resolver | None = None,
                    verify: ssl.SSLContext | bool = True, what: str = "webhook") -> httpx.AsyncClient:
    """An HTTP client for webhook deliveries (or, with `what`, other outbound calls): guarded and pinned as
    above, pooled, no redirects, no proxy from the environment (timeouts are set per request)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = _GuardedTransport(GuardedBackend(allow_private, resolve, what), limits, verify)
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, timeout=10.0)


class ServiceClient(httpx.AsyncClient):
    """The client for services the configuration names (validation services, JWKS): internal addresses
    allowed, as the operator wrote these URLs; `guarded` is its twin for validators that set
    `allow_private: false` — a separate pool, so a connection made unchecked is never reused by a checked call."""

    def __init__(self, timeout: float = 5.0, resolve: Resolver | None = None) -> None:
        super().__init__(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False)
        self.guarded = delivery_client(False, resolve=resolve, what="validator")

    async def aclose(self) -> None:
        await self.guarded.aclose()
        await super().aclose()

    async def __aexit__(self, *exc_info: Any) -> None:  # httpx's `async with` closes without calling aclose()
        await self.guarded.aclose()
        await super().__aexit__(*exc_info)
