"""Where a webhook may post: never into the server's own network unless the operator says so.

A webhook URL comes from whoever may add one (the server token's holder, or the
operator's --webhook), and the server then makes requests to it from inside
its network: http://169.254.169.254/ (cloud metadata), http://127.0.0.1:5432/,
http://[fd00:ec2::254]/ or a decimal http://2130706433/ (127.0.0.1) would make
it a proxy into places the caller cannot reach (SSRF; red team, issue #17 item
9). Loopback, private, link-local, carrier-grade NAT, reserved, multicast and
unspecified addresses are refused unless the server runs with
`--webhook-allow-private` (a receiver on the same machine or LAN, as the tests
and a self-hosted Slack bridge have): when the URL is added, for addresses
written into it, and again before every delivery, for the addresses its host
name resolves to then (a name may point anywhere, and may change).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_FLAG = "--webhook-allow-private"
CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: Alibaba's metadata service is in it


def shown(url: str) -> str:
    """`url` as logs may show it: scheme and host only. The path of a Slack or Teams incoming-webhook
    URL is its credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def literal_address(host: str | None) -> Address | None:
    """The address a URL's host spells directly: dotted, IPv6, or the integer and hex forms that
    resolvers accept (2130706433, 0x7f000001 are 127.0.0.1); None for a name."""
    if not host:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(int(host, 0))
    except ValueError:
        return None


def is_internal(address: Address) -> bool:
    """An address of the server's own machine or network, or one no public receiver has."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in CGNAT)
    )


def refusal(url: str) -> str | None:
    """Why `url` may not be added (its host is an internal address written out), or None."""
    address = literal_address(urlsplit(url).hostname)
    if address is not None and is_internal(address):
        return (
            f"webhook URL {url!r} points at an internal address ({address}); "
            f"start the server with {ALLOW_FLAG} to allow it"
        )
    return None


def delivery_refusal(url: str) -> str | None:
    """Why a delivery to `url` may not be made now: its host resolves to an internal address. None when
    it may (or does not resolve: the attempt then fails as unreachable, and is retried)."""
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        return None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if is_internal(address):
            return (
                f"{parts.hostname} resolves to an internal address ({address}): not delivered ({ALLOW_FLAG} allows it)"
            )
    return None
