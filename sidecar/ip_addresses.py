"""Reading client IP addresses, in one place: one spelling per address (IPv4-mapped IPv6 unwrapped, so
`::ffff:10.0.0.1` is `10.0.0.1`) for `trusted_proxies`, `require.ips`, a client's `allowed_ips` and the
address an `ip_key` is bound to. (Outbound host names, read the way resolvers read them, are
`sidecar.outbound.guard.literal_address`.)"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["IPAddress", "Network", "canonical_ip", "ip_in", "parse_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    """The address `text` spells, IPv4-mapped IPv6 unwrapped; ValueError when it is not an address."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def canonical_ip(text: str) -> str:
    """An address in one spelling (surrounding whitespace ignored); ValueError when it is not an address."""
    return str(parse_ip(text.strip()))


def ip_in(address: str, networks: Sequence[Network]) -> bool:
    """Whether an address lies in one of the networks; an unparsable one never does."""
    try:
        ip = parse_ip(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
