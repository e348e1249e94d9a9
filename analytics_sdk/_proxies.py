"""The client's IP address behind reverse proxies: the peer, or a forwarded address vouched for by ours.

A request reaches the application from its *peer*: the client itself, or a proxy. Only a proxy we run
(a *trusted* one) may tell us who its own peer was, by appending that address to ``X-Forwarded-For``
(or a ``for=`` element to ``Forwarded``, RFC 7239). Whatever stands left of the last address our
proxies wrote was sent by the client and may be forged. So the header is read right to left: while
the address in hand is one of our proxies, step to the hop it reported; the first address that is not
ours is the client. Every hop ours means an internal request (the left-most hop is the client). A hop
that is not an IP address where one of our proxies wrote it (``unknown``, an obfuscated ``_id``,
garbage) makes the address unknown: ``None``, never a guess.

Exactly one header is read, the one our proxies write. Reading both would let a client forge the one
our proxies pass through untouched, whose right-most entry would then be the client's own invention.
An empty list of trusted networks trusts nobody: the peer is the client, whatever the headers say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Literal

from ._exceptions import ConfigurationError

__all__ = ["LOOPBACK", "ForwardedHeader", "Network", "client_ip", "forwarded_hops", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]

#: The default trust: a proxy on the same host (nginx in front of uvicorn), as uvicorn's own
#: ``--forwarded-allow-ips`` default does.
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def parse_networks(value: str | Iterable[str | Network]) -> tuple[Network, ...]:
    """Networks from ``"10.0.0.0/8, ::1"`` or an iterable of strings and networks; a bare address is a
    single host. A bad entry raises :class:`ConfigurationError` naming it."""
    parts = value.split(",") if isinstance(value, str) else value
    networks: list[Network] = []
    for part in parts:
        if isinstance(part, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(part)
            continue
        text = str(part).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:  # host bits set ("10.0.0.5/8") or not an address at all
            raise ConfigurationError("trusted_proxies", text, f"is not an IP network ({exc})") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # An IPv4 client reaching an IPv6 socket shows up as ::ffff:a.b.c.d: compare and store it as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(element: str) -> str:
    """The ``for=`` value of one ``Forwarded`` element, unquoted, without brackets or port."""
    for pair in element.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() != "for":
            continue
        value = value.strip().strip('"')
        if value.startswith("["):  # "[2001:db8::1]:4711"
            return value[1:].partition("]")[0]
        if value.count(":") == 1:  # "192.0.2.60:8080"
            return value.partition(":")[0]
        return value
    return ""  # an element without for=: not an address


def forwarded_hops(values: Iterable[str], header: ForwardedHeader = "x-forwarded-for") -> list[str]:
    """The hops written in every occurrence of ``header``, in order (several headers are one list)."""
    hops = [hop for value in values for hop in value.split(",")]
    if header == "forwarded":
        return [_forwarded_for(element) for element in hops]
    return hops


def client_ip(peer: str | None, hops: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: the peer, or the right-most hop not ours (see the module docstring).

    ``hops`` as :func:`forwarded_hops` returns them. ``None`` when the address is unknown: no peer
    (a unix socket), a peer that is not an address (a test client's ``"testclient"``), or garbage
    where one of our proxies wrote.
    """
    address = _address(peer) if peer else None
    if address is None:
        return None
    remaining = list(hops)
    while any(address in net for net in trusted):
        if not remaining:
            return str(address)  # every hop is ours: an internal request
        address = _address(remaining.pop())
        if address is None:
            return None
    return str(address)
