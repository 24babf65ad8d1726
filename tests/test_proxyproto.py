"""PROXY protocol headers (sniport/wire/proxyproto.py) against haproxy's proxy-protocol.txt.

v1 (section 2.1): ``PROXY <TCP4|TCP6|UNKNOWN> <src> <dst> <sport> <dport>\\r\\n``, at most
107 bytes. v2 (section 2.2): the 12-byte signature, ver_cmd (0x21 = version 2, PROXY),
fam (0x11 TCP/IPv4, 0x21 TCP/IPv6, 0x31 UNIX stream, 0x00 UNSPEC), a 16-bit length, the
address block (12, 36, 216 or 0 bytes), then TLVs (type, length_hi, length_lo, value;
PP2_TYPE_AUTHORITY = 0x02, section 2.2.1). The decoder here is written from the spec,
independently of the encoder.
"""

from __future__ import annotations

import ipaddress
import string
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire.proxyproto import Endpoint, encode_v1, encode_v2

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------------------------
# v1


V1_CASES: list[tuple[str, Endpoint, Endpoint, bytes]] = [
    ("tcp4", ("192.0.2.1", 56324), ("198.51.100.7", 443),
     b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"),
    ("tcp6", ("2001:db8::1", 1234), ("2001:db8::2", 443),
     b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n"),
    ("tcp6-written-long", ("2001:0db8:0000:0000:0000:0000:0000:0001", 1), ("::1", 443),
     b"PROXY TCP6 2001:db8::1 ::1 1 443\r\n"),
    ("ports-0-and-65535", ("10.0.0.1", 0), ("10.0.0.2", 65535),
     b"PROXY TCP4 10.0.0.1 10.0.0.2 0 65535\r\n"),
    ("ipv4-mapped-both", ("::ffff:192.0.2.1", 5555), ("::ffff:198.51.100.7", 443),
     b"PROXY TCP4 192.0.2.1 198.51.100.7 5555 443\r\n"),
    ("ipv4-mapped-and-ipv4", ("::ffff:192.0.2.1", 5555), ("198.51.100.7", 443),
     b"PROXY TCP4 192.0.2.1 198.51.100.7 5555 443\r\n"),
    ("scoped-ipv6", ("fe80::1%eth0", 40000), ("fe80::2%eth0", 443),
     b"PROXY TCP6 fe80::1 fe80::2 40000 443\r\n"),
    ("unix-unnamed-client", "", "/run/sniport.sock", b"PROXY UNKNOWN\r\n"),
    ("unix-abstract", "", "@sniport", b"PROXY UNKNOWN\r\n"),
    ("unix-to-tcp", "", ("192.0.2.1", 443), b"PROXY UNKNOWN\r\n"),
    ("tcp-to-unix", ("192.0.2.1", 5555), "/run/sniport.sock", b"PROXY UNKNOWN\r\n"),
    ("ipv4-to-ipv6", ("192.0.2.1", 5555), ("2001:db8::2", 443), b"PROXY UNKNOWN\r\n"),
    ("mapped-to-ipv6", ("::ffff:192.0.2.1", 5555), ("2001:db8::2", 443), b"PROXY UNKNOWN\r\n"),
]


@pytest.mark.parametrize(("src", "dst", "expected"), [c[1:] for c in V1_CASES],
                         ids=[c[0] for c in V1_CASES])
def test_v1_exact_bytes(src: Endpoint, dst: Endpoint, expected: bytes) -> None:
    assert encode_v1(src, dst) == expected


def test_v1_longest_line_fits_107_bytes() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    line = encode_v1((longest, 65535), (longest, 65535))
    assert line == f"PROXY TCP6 {longest} {longest} 65535 65535\r\n".encode()
    assert len(line) == 104 <= 107


def decode_v1(line: bytes) -> tuple[str, IP | None, IP | None, int | None, int | None]:
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    assert len(line) <= 107
    words = line[:-2].decode("ascii").split(" ")
    assert words[0] == "PROXY"
    if words[1] == "UNKNOWN":
        return ("UNKNOWN", None, None, None, None)
    proto, src, dst, sport, dport = words[1:]
    for port in (sport, dport):
        assert port == str(int(port)) and 0 <= int(port) <= 65535  # decimal, no leading zero
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    assert s.version == d.version == (4 if proto == "TCP4" else 6)
    assert proto in {"TCP4", "TCP6"}
    return (proto, s, d, int(sport), int(dport))


def unmapped(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(), ports, st.ip_addresses(), ports)
def test_v1_round_trip(src: IP, sport: int, dst: IP, dport: int) -> None:
    line = encode_v1((str(src), sport), (str(dst), dport))
    s, d = unmapped(src), unmapped(dst)
    if s.version != d.version:
        assert decode_v1(line) == ("UNKNOWN", None, None, None, None)
    else:
        proto = "TCP4" if s.version == 4 else "TCP6"
        assert decode_v1(line) == (proto, s, d, sport, dport)


# ---------------------------------------------------------------------------------------------
# v2


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def padded(path: bytes) -> bytes:
    return path + bytes(108 - len(path))


V2_CASES: list[tuple[str, Endpoint, Endpoint, str | None, bytes]] = [
    ("tcp4-authority", ("192.0.2.1", 56324), ("198.51.100.7", 443), "example.com",
     SIG + h("21 11 001a  c0000201 c6336407 dc04 01bb  02 000b") + b"example.com"),
    ("tcp4", ("192.0.2.1", 56324), ("198.51.100.7", 443), None,
     SIG + h("21 11 000c  c0000201 c6336407 dc04 01bb")),
    ("tcp4-empty-authority", ("192.0.2.1", 56324), ("198.51.100.7", 443), "",
     SIG + h("21 11 000c  c0000201 c6336407 dc04 01bb")),
    ("tcp4-from-mapped", ("::ffff:10.1.2.3", 1), ("10.0.0.1", 443), None,
     SIG + h("21 11 000c  0a010203 0a000001 0001 01bb")),
    ("tcp6-authority", ("2001:db8::1", 1234), ("2001:db8::2", 443), "vpn.example.com",
     SIG + h("21 21 0036  20010db8000000000000000000000001 20010db8000000000000000000000002"
             " 04d2 01bb  02 000f") + b"vpn.example.com"),
    ("tcp6-scoped", ("fe80::1%eth0", 65535), ("fe80::2%eth0", 0), None,
     SIG + h("21 21 0024  fe800000000000000000000000000001 fe800000000000000000000000000002"
             " ffff 0000")),
    ("unix-authority", "", "/run/sniport.sock", "a.example",
     SIG + h("21 31 00e4") + bytes(108) + padded(b"/run/sniport.sock")
     + h("02 0009") + b"a.example"),
    ("unix-abstract", "/run/client.sock", "@sniport", None,
     SIG + h("21 31 00d8") + padded(b"/run/client.sock") + padded(b"\0sniport")),
    ("unspec-unix-to-tcp", "", ("192.0.2.1", 443), None, SIG + h("21 00 0000")),
    ("unspec-authority", ("192.0.2.1", 5555), "/run/sniport.sock", "x.example",
     SIG + h("21 00 000c  02 0009") + b"x.example"),
    ("unspec-ipv4-to-ipv6", ("192.0.2.1", 5555), ("2001:db8::2", 443), None,
     SIG + h("21 00 0000")),
]


@pytest.mark.parametrize(("src", "dst", "authority", "expected"), [c[1:] for c in V2_CASES],
                         ids=[c[0] for c in V2_CASES])
def test_v2_exact_bytes(src: Endpoint, dst: Endpoint, authority: str | None,
                        expected: bytes) -> None:
    assert encode_v2(src, dst, authority) == expected


@dataclass(frozen=True)
class V2Header:
    command: int  # 0 LOCAL, 1 PROXY
    family: int  # 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX
    transport: int  # 0 UNSPEC, 1 STREAM, 2 DGRAM
    src: object
    dst: object
    tlvs: tuple[tuple[int, bytes], ...]


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0" and raw.strip(b"\0"):
        return "@" + raw[1:].rstrip(b"\0").decode()  # Linux abstract namespace
    return raw.rstrip(b"\0").decode()


def decode_v2(data: bytes) -> V2Header:
    """Section 2.2 of proxy-protocol.txt, the whole of ``data`` being one header."""
    assert data[:12] == SIG
    ver_cmd, fam = data[12], data[13]
    assert ver_cmd >> 4 == 2
    length = int.from_bytes(data[14:16], "big")
    payload = data[16:]
    assert len(payload) == length
    family, transport = fam >> 4, fam & 0x0F
    src: object = None
    dst: object = None
    if family == 1:
        size = 12
        src = (ipaddress.IPv4Address(payload[0:4]), int.from_bytes(payload[8:10], "big"))
        dst = (ipaddress.IPv4Address(payload[4:8]), int.from_bytes(payload[10:12], "big"))
    elif family == 2:
        size = 36
        src = (ipaddress.IPv6Address(payload[0:16]), int.from_bytes(payload[32:34], "big"))
        dst = (ipaddress.IPv6Address(payload[16:32]), int.from_bytes(payload[34:36], "big"))
    elif family == 3:
        size = 216
        src, dst = _unix_path(payload[:108]), _unix_path(payload[108:216])
    else:
        assert family == 0 and transport == 0
        size = 0
    assert len(payload) >= size
    tlvs = []
    pos = size
    while pos < len(payload):
        assert pos + 3 <= len(payload)
        kind, n = payload[pos], int.from_bytes(payload[pos + 1 : pos + 3], "big")
        assert pos + 3 + n <= len(payload)
        tlvs.append((kind, payload[pos + 3 : pos + 3 + n]))
        pos += 3 + n
    return V2Header(ver_cmd & 0x0F, family, transport, src, dst, tuple(tlvs))


authorities = st.one_of(
    st.none(),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}",
                  fullmatch=True),
)


def authority_tlvs(authority: str | None) -> tuple[tuple[int, bytes], ...]:
    return ((0x02, authority.encode()),) if authority else ()


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(), ports, st.ip_addresses(), ports, authorities)
def test_v2_round_trip_tcp(src: IP, sport: int, dst: IP, dport: int,
                           authority: str | None) -> None:
    header = decode_v2(encode_v2((str(src), sport), (str(dst), dport), authority))
    s, d = unmapped(src), unmapped(dst)
    if s.version != d.version:
        assert header == V2Header(1, 0, 0, None, None, authority_tlvs(authority))
    else:
        family = 1 if s.version == 4 else 2
        assert header == V2Header(1, family, 1, (s, sport), (d, dport),
                                  authority_tlvs(authority))


unix_paths = st.one_of(
    st.just(""),
    st.text(alphabet=string.ascii_letters + string.digits + "-_./", max_size=100)
    .map(lambda p: "/" + p),
    st.text(alphabet=string.ascii_letters + string.digits + "-_./", min_size=1, max_size=100)
    .map(lambda p: "@" + p),
)


@settings(max_examples=200, deadline=None)
@given(unix_paths, unix_paths, authorities)
def test_v2_round_trip_unix(src: str, dst: str, authority: str | None) -> None:
    data = encode_v2(src, dst, authority)
    assert len(data) == 16 + 216 + (3 + len(authority) if authority else 0)
    assert decode_v2(data) == V2Header(1, 3, 1, src, dst, authority_tlvs(authority))
