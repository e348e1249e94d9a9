"""The client IP behind reverse proxies (analytics_sdk._proxies): moved here from examples/fastapi_app.py."""

from __future__ import annotations

import ipaddress

import pytest

from analytics_sdk import ConfigurationError
from analytics_sdk._proxies import LOOPBACK, client_ip, forwarded_hops, parse_networks

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.9", [], "203.0.113.9"),  # no proxy
        ("192.0.2.50", ["1.2.3.4"], "192.0.2.50"),  # untrusted peer: its header is ignored
        ("10.0.0.5", ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),  # right-most hop not ours
        ("10.0.0.5", ["6.6.6.6, 203.0.113.9, 10.1.1.1"], "203.0.113.9"),  # skip our inner proxy
        ("10.0.0.5", ["6.6.6.6", "203.0.113.9"], "203.0.113.9"),  # two headers = one list
        ("10.0.0.5", ["10.0.0.7"], "10.0.0.7"),  # all ours: an internal request
        ("10.0.0.5", ["203.0.113.9, not-an-ip, 10.2.2.2"], None),  # garbage where a proxy wrote
        ("10.0.0.5", ["2001:db8::1"], "2001:db8::1"),
        ("::ffff:10.0.0.5", ["203.0.113.9"], "203.0.113.9"),  # IPv4 peer on an IPv6 socket
        ("testclient", [], None),
        (None, [], None),
    ],
)
def test_x_forwarded_for_is_read_right_to_left(
    peer: str | None, headers: list[str], expected: str | None
) -> None:
    assert client_ip(peer, forwarded_hops(headers), NETS) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (['for=198.51.100.1, for="203.0.113.9:4711";proto=https'], "203.0.113.9"),
        (['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        (["for=6.6.6.6;by=10.0.0.1", "For=203.0.113.9, for=10.1.1.1"], "203.0.113.9"),  # case, 2 headers
        (["for=6.6.6.6, for=unknown"], None),  # RFC 7239 "unknown" where our proxy wrote: unknown
        (["for=_hidden"], None),  # an obfuscated identifier is not an address
        (["proto=https"], None),  # an element without for=
    ],
)
def test_forwarded_header_is_read_right_to_left(headers: list[str], expected: str | None) -> None:
    assert client_ip("10.0.0.5", forwarded_hops(headers, "forwarded"), NETS) == expected


def test_an_empty_trusted_list_trusts_nobody() -> None:
    assert client_ip("127.0.0.1", ["6.6.6.6"], []) == "127.0.0.1"
    assert client_ip("127.0.0.1", ["6.6.6.6"], LOOPBACK) == "6.6.6.6"


def test_parse_networks() -> None:
    assert parse_networks("10.0.0.0/8, ::1 ,,") == (NETS[0], NETS[1])
    assert parse_networks(["192.0.2.7", NETS[0]]) == (ipaddress.ip_network("192.0.2.7/32"), NETS[0])
    assert parse_networks("") == ()
    with pytest.raises(ConfigurationError, match=r"trusted_proxies='10\.0\.0\.5/8': is not an IP network"):
        parse_networks("10.0.0.5/8")
    with pytest.raises(ConfigurationError, match=r"trusted_proxies='proxy\.internal'"):
        parse_networks(["proxy.internal"])
