"""parse_host_header (sniport.hostnames): a Host header value, validated before anything
looks at it (RFC 9110 section 7.2, RFC 3986 section 3.2.2).

The review's Host check compared only what follows the first dot, so ``evil/.w.example.com``
was served by a ``*.example.com``-style site and forwarded upstream as Host. These tables and
properties pin what is accepted: DNS-shaped names, dotted-quad IPv4, bracketed IPv6, a port.
"""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sniport.hostnames import HostNameError, parse_host_header

# No deadline: the machine is shared, and timing is not what these properties are about.
PROPS = settings(deadline=None, max_examples=200)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("A.W.Example.COM.:8443", ("a.w.example.com", 8443)),  # lower case, one dot removed
        ("example.com.", ("example.com", None)),
        ("example.com:", ("example.com", None)),  # RFC 3986 section 3.2.3: port may be empty
        ("example.com:443", ("example.com", 443)),
        ("example.com:1", ("example.com", 1)),
        ("example.com:65535", ("example.com", 65535)),
        ("example.com:00443", ("example.com", 443)),  # port = *DIGIT: leading zeros are digits
        ("localhost", ("localhost", None)),
        ("localhost:8443", ("localhost", 8443)),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example", None)),  # an A-label
        ("_acme-challenge.example.com", ("_acme-challenge.example.com", None)),
        ("a-b.c_d.example", ("a-b.c_d.example", None)),
        ("1.example.com", ("1.example.com", None)),  # digits, but not in the last label
        ("example.123abc", ("example.123abc", None)),  # not all digits: a name
        ("example.0xg", ("example.0xg", None)),  # not hex after "0x": a name
        ("a" * 63 + ".example", ("a" * 63 + ".example", None)),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, (".".join(["a" * 63] * 3) + "." + "b" * 61,
                                                      None)),  # 253 characters
        (".".join(["a" * 63] * 3) + "." + "b" * 61 + ".",
         (".".join(["a" * 63] * 3) + "." + "b" * 61, None)),  # the trailing dot not counted
        # IPv4: four decimal parts 0-255
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("127.0.0.1.", ("127.0.0.1", None)),
        ("0.0.0.0", ("0.0.0.0", None)),
        ("255.255.255.255:1", ("255.255.255.255", 1)),
        # IPv6 literals (RFC 3986 section 3.2.2): brackets kept, lower case
        ("[::1]", ("[::1]", None)),
        ("[::1]:443", ("[::1]", 443)),
        ("[::1]:", ("[::1]", None)),
        ("[2001:DB8::A]", ("[2001:db8::a]", None)),
        ("[2001:db8:0:0:0:0:0:1]:8443", ("[2001:db8:0:0:0:0:0:1]", 8443)),
        ("[::ffff:192.0.2.1]", ("[::ffff:192.0.2.1]", None)),
    ],
)
def test_parse_host_header(value: str, expected: tuple[str, int | None]) -> None:
    assert parse_host_header(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        # The review's cases: served, and forwarded upstream as Host
        "evil/.w.example.com",
        "a b.w.example.com",
        "2130706433/.w.example.com",
        "2130706433",  # 127.0.0.1 to a browser (WHATWG URL "ends in a number")
        # empty and empty labels
        "",
        ".",
        "..",
        ":443",
        ".example.com",
        "a..example.com",
        "example.com..",
        # characters outside letters, digits, "-", "_"
        "evil/",
        "user@example.com",
        "example.com@evil",
        "a\\b.example.com",
        "a\tb",
        " example.com",
        "example.com ",
        "example.com\r\n",
        "exa%6dple.com",  # no percent-encoding
        "ex*ample.com",
        "*.example.com",
        "b\xfccher.example",  # a U-label: clients send A-labels
        "example.com/",
        "example.com?",
        "example.com#",
        "ex\x00ample.com",
        "example,com",
        "[example.com]",
        # label and name lengths
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 3) + "." + "b" * 62,  # 254 characters
        # ends in a number, but not an IPv4 address
        "1.2.3.4.5",
        "1.2.3",
        "1.2.3.256",
        "01.2.3.4",  # leading zeros: octal to some parsers
        "127.1",
        "0x7f.0.0.1",
        "0x7f000001",
        "example.0x7f",
        "example.0X",
        "example.123",
        "evil.2130706433",
        # ports
        "example.com:99999",
        "example.com:65536",
        "example.com:0",
        "example.com:123456",
        "example.com:+443",
        "example.com:-1",
        "example.com: 443",
        "example.com:44 3",
        "example.com:\u0664\u0664\u0663",  # Arabic-Indic digits
        "example.com:443:443",
        "example.com:https",
        "example.com::443",
        # IP literals
        "[::1]x",
        "[::1]443",
        "[::1",
        "::1",
        "[::1]:99999",
        "[]",
        "[::1%eth0]",  # a zone id
        "[::1%25eth0]",
        "[v1.fe80::a+en1]",  # IPvFuture
        "[192.0.2.1]",
        "[::g]",
        "[1:2:3:4:5:6:7:8:9]",
        "[::1]]",
        "[[::1]]",
        "[ ::1]",
    ],
)
def test_parse_host_header_refuses(value: str) -> None:
    with pytest.raises(HostNameError):
        parse_host_header(value)


def test_error_messages_are_bounded() -> None:
    with pytest.raises(HostNameError) as info:
        parse_host_header("a/" * 4000)
    assert len(str(info.value)) < 200


# ------------------------------------------------------------------------------------------
# Properties

_NAME_OUTPUT = re.compile(r"[a-z0-9._-]+")
_IPV6_OUTPUT = re.compile(r"\[[0-9a-f:.]+\]")

_LABEL = st.from_regex(r"[A-Za-z0-9_-]{1,63}", fullmatch=True)
_PIECES = st.sampled_from([
    "a", "Z", "0", "1", "255", "2130706433", "0x7f", "-", "_", ".", "..", ":", ":443", ":0",
    ":65536", "[", "]", "::1", "[::1]", "%", "%2e", "/", "@", " ", "\\", "\xe9", "xn--",
    "example", "com",
])
ANY_HOST = st.one_of(
    st.text(max_size=30),
    st.text(st.sampled_from("abcXYZ0129.:-_[]%/@ \\"), max_size=30),
    st.lists(_PIECES, max_size=10).map("".join),
    st.lists(_LABEL, min_size=1, max_size=5).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
PORTS = st.one_of(st.none(), st.integers(1, 65535))


def _with_port(host: str, port: int | None) -> str:
    return host + (f":{port}" if port else "")


@PROPS
@given(ANY_HOST, PORTS)
@example("A.W.Example.COM.", 8443)
@example("[2001:DB8::1]", None)
def test_accepted_values_round_trip(host: str, port: int | None) -> None:
    for value in (host, _with_port(host, port)):
        try:
            name, got_port = parse_host_header(value)
        except HostNameError:
            continue
        assert parse_host_header(_with_port(name, got_port)) == (name, got_port)
        # Only what a DNS name or an IP address is made of.
        assert _NAME_OUTPUT.fullmatch(name) or _IPV6_OUTPUT.fullmatch(name)
        assert len(name) <= 253
        assert not name.endswith(".")
        if _IPV6_OUTPUT.fullmatch(name):
            ipaddress.IPv6Address(name[1:-1])
        elif name.rsplit(".", 1)[-1].isdigit():
            assert str(ipaddress.IPv4Address(name)) == name  # a number only as an address


@PROPS
@given(st.lists(_LABEL, min_size=1, max_size=4), st.booleans(), PORTS)
def test_dns_shaped_names_are_accepted(labels: list[str], dot: bool, port: int | None) -> None:
    host = ".".join(labels)
    if len(host) > 253 or re.fullmatch(r"[0-9]+|0[xX][0-9A-Fa-f]*", labels[-1]):
        return  # too long, or ends in a number: refused, see the tables
    assert parse_host_header(_with_port(host + ("." if dot else ""), port)) == (
        host.lower(), port)


@PROPS
@given(st.ip_addresses(), PORTS)
def test_ip_addresses_are_accepted(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                   port: int | None) -> None:
    if isinstance(address, ipaddress.IPv4Address):
        host = expected = str(address)
    else:
        host = f"[{address.exploded.upper()}]"
        expected = host.lower()
    assert parse_host_header(_with_port(host, port)) == (expected, port)


@PROPS
@given(ANY_HOST, st.sampled_from(["/", "@", "\\", " ", "\t", "\n", "\r", "\x0b", "\x0c",
                                  "\xa0", "\u2028", "\u3000"]), st.data())
def test_separators_and_whitespace_are_always_refused(host: str, bad: str,
                                                      data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(host)))
    with pytest.raises(HostNameError):
        parse_host_header(host[:at] + bad + host[at:])
