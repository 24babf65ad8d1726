"""The PROXY protocol decoder (``sniport.wire.proxyproto.parse``) against haproxy's
proxy-protocol.txt: section 2.1 (v1 text line, at most 107 bytes, no heading zeroes in ports),
section 2.2 (v2 binary: signature, ver_cmd, fam, length, addresses, TLVs), 2.2.5 (CRC32C).

Three outcomes only (house rule 2): ``Proxied`` with the exact header ``length``, ``NeedMore``
for a valid prefix, ``Invalid(reason)``; never an exception.
"""

from __future__ import annotations

import ipaddress
import string
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    Invalid,
    NeedMore,
    Proxied,
    crc32c,
    encode_v1,
    encode_v2,
    parse,
)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # section 2.2, written out independently
HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03"  # the start of a TLS ClientHello


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(body) if length is None else length) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("::1").packed
              + struct.pack("!HH", 1, 2))


def with_crc(header: bytes) -> bytes:
    """``header`` ends in a zeroed PP2_TYPE_CRC32C value: fill it in (section 2.2.5)."""
    return header[:-4] + struct.pack("!I", crc32c(header))


# ---------------------------------------------------------------------------------------------
# CRC32C: the check value of the Castagnoli CRC and RFC 3720 appendix B.4.


@pytest.mark.parametrize(("data", "expected"), [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


# ---------------------------------------------------------------------------------------------
# Valid headers: (id, data, version, command, source, dest, header length).

Addr = tuple[str, int] | None
VALID: list[tuple[str, bytes, int, str, Addr, Addr, int]] = [
    ("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n", 1, "PROXY",
     ("192.0.2.1", 56324), ("198.51.100.7", 443), 45),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 ::1 1 443\r\n", 1, "PROXY",
     ("2001:db8::1", 1), ("::1", 443), 34),
    ("v1-tcp6-long-form-normalized", b"PROXY TCP6 2001:0DB8:0:0:0:0:0:1 ::1 0 65535\r\n", 1,
     "PROXY", ("2001:db8::1", 0), ("::1", 65535), 46),
    ("v1-tcp6-mapped-kept", b"PROXY TCP6 ::ffff:192.0.2.1 ::1 5 6\r\n", 1, "PROXY",
     ("::ffff:c000:201", 5), ("::1", 6), 37),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", 1, "PROXY", None, None, 15),
    ("v1-unknown-with-junk", b"PROXY UNKNOWN ffff::1 \xff whatever 1 2\r\n", 1, "PROXY",
     None, None, 38),
    ("v1-unknown-bare-cr-lf-in-junk", b"PROXY UNKNOWN a\rb\nc\r\n", 1, "PROXY", None, None, 21),
    ("v1-longest-tcp6-107",
     b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n", 1, "PROXY",
     ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
     ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), 104),
    ("v1-unknown-exactly-107", b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", 1, "PROXY",
     None, None, 107),
    ("v2-tcp4", v2(0x21, 0x11, IPV4_BLOCK), 2, "PROXY",
     ("192.0.2.1", 56324), ("198.51.100.7", 443), 28),
    ("v2-udp4", v2(0x21, 0x12, IPV4_BLOCK), 2, "PROXY",
     ("192.0.2.1", 56324), ("198.51.100.7", 443), 28),
    ("v2-tcp6", v2(0x21, 0x21, IPV6_BLOCK), 2, "PROXY", ("2001:db8::1", 1), ("::1", 2), 52),
    ("v2-udp6", v2(0x21, 0x22, IPV6_BLOCK), 2, "PROXY", ("2001:db8::1", 1), ("::1", 2), 52),
    ("v2-unix-stream", v2(0x21, 0x31, bytes(216)), 2, "PROXY", None, None, 232),
    ("v2-unix-dgram", v2(0x21, 0x32, bytes(216)), 2, "PROXY", None, None, 232),
    ("v2-unspec", v2(0x21, 0x00, b""), 2, "PROXY", None, None, 16),
    ("v2-local", v2(0x20, 0x00, b""), 2, "LOCAL", None, None, 16),
    # Section 2.2: LOCAL discards the block, family included, whatever it holds.
    ("v2-local-health-check-with-block", v2(0x20, 0x11, IPV4_BLOCK), 2, "LOCAL",
     None, None, 28),
    ("v2-local-unknown-family", v2(0x20, 0x77, b"junk"), 2, "LOCAL", None, None, 20),
    ("v2-tcp4-noop-tlvs", v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_NOOP, b"")
                             + tlv(PP2_TYPE_NOOP, b"\0" * 5)), 2, "PROXY",
     ("192.0.2.1", 56324), ("198.51.100.7", 443), 39),
    ("v2-tcp4-crc", with_crc(v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, bytes(4)))), 2,
     "PROXY", ("192.0.2.1", 56324), ("198.51.100.7", 443), 35),
]


@pytest.mark.parametrize(("data", "version", "command", "source", "dest", "length"),
                         [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid(data: bytes, version: int, command: str, source: Addr, dest: Addr,
               length: int) -> None:
    assert len(data) == length
    result = parse(data + HELLO)
    assert isinstance(result, Proxied), result
    assert (result.version, result.command, result.source, result.dest, result.length) == (
        version, command, source, dest, length)
    assert parse(data) == result  # nothing after the header needed


# ---------------------------------------------------------------------------------------------
# Invalid headers: (id, data, reason substring).

INVALID: list[tuple[str, bytes, str]] = [
    ("tls-hello", HELLO, "not a PROXY protocol header"),
    ("http", b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    ("lowercase-proxy", b"proxy TCP4", "not a PROXY protocol header"),
    ("v1-no-space", b"PROXYTCP4", "not a PROXY protocol header"),
    ("v2-sig-broken-at-end", SIG[:11] + b"\x0b", "not a PROXY protocol header"),
    ("v1-no-crlf-in-107", b"PROXY UNKNOWN " + b"x" * 93, "v1 line over 107 bytes"),
    ("v1-crlf-at-108", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "v1 line over 107 bytes"),
    ("v1-unknown-protocol", b"PROXY UDP4 ", "unknown protocol"),
    ("v1-unknown-glued", b"PROXY UNKNOWNX\r\n", "expected PROXY TCP4|TCP6"),
    ("v1-lf-alone", b"PROXY TCP4 1.2.3.4\n", "CRLF"),
    ("v1-cr-alone", b"PROXY TCP4 1.2.3.4\rx", "CRLF"),
    ("v1-double-space", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "expected PROXY"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected PROXY"),
    ("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected PROXY"),
    ("v1-tab", b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", "expected PROXY"),
    ("v1-family-mismatch", b"PROXY TCP4 ::1 ::2 1 2\r\n", "bad address"),
    ("v1-family-mismatch-6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-octet-over-255", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-octet-leading-zero", b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-scoped-ipv6", b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", "bad address"),
    ("v1-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
    ("v1-port-over-65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
    ("v1-port-sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port"),
    ("v1-port-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(), "not ASCII"),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", "bad port"),
    ("v2-version-1", v2(0x11, 0x11, IPV4_BLOCK), "version 1 is not 2"),
    ("v2-version-3", v2(0x31, 0x11, IPV4_BLOCK), "version 3 is not 2"),
    ("v2-command-2", v2(0x22, 0x11, IPV4_BLOCK), "unknown command 2"),
    ("v2-family-4", v2(0x21, 0x41, IPV4_BLOCK), "unknown family"),
    ("v2-transport-3", v2(0x21, 0x13, IPV4_BLOCK), "unknown family"),
    ("v2-unspec-with-transport", v2(0x21, 0x01, b""), "unknown family"),
    ("v2-over-cap", v2(0x21, 0x11, b"", length=9000), "v2 length 9000 over 4096"),
    ("v2-tcp4-short", v2(0x21, 0x11, IPV4_BLOCK[:11]), "too short for the addresses"),
    ("v2-tcp6-short", v2(0x21, 0x21, IPV4_BLOCK), "too short for the addresses"),
    ("v2-unix-short", v2(0x21, 0x31, bytes(215)), "too short for the addresses"),
    ("v2-tlv-stub", v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00"), "TLVs do not fill"),
    ("v2-tlv-overrun", v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00\x05abcd"), "overruns"),
    ("v2-crc-mismatch", v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\0\0\0\1")),
     "CRC32C mismatch"),
    ("v2-crc-wrong-size", v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\0\0\0")),
     "not 4 bytes"),
    ("v2-crc-twice", v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, bytes(4))
                        + tlv(PP2_TYPE_CRC32C, bytes(4))), "given twice"),
    ("v2-authority-not-utf8", v2(0x21, 0x11, IPV4_BLOCK + tlv(0x02, b"\xff")), "not UTF-8"),
    ("v2-unique-id-129", v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_UNIQUE_ID, bytes(129))),
     "unique id over 128"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid(data: bytes, reason: str) -> None:
    result = parse(data + HELLO)
    assert isinstance(result, Invalid), result
    assert reason in result.reason


def test_clienthello_refused_on_first_byte() -> None:
    assert parse(b"\x16") == Invalid("not a PROXY protocol header")
    # "P" may begin v1 and "\r" v2: both wait.
    assert isinstance(parse(b"P"), NeedMore)
    assert isinstance(parse(b"\r"), NeedMore)
    assert isinstance(parse(b""), NeedMore)


def test_cap_is_checked_before_the_body_arrives() -> None:
    head = v2(0x21, 0x11, b"", length=4097)
    assert parse(head) == Invalid("v2 length 4097 over 4096")
    assert isinstance(parse(head, max_v2=5000), NeedMore)
    assert parse(v2(0x21, 0x00, b"", length=100), max_v2=99) == Invalid("v2 length 100 over 99")
    # Exactly at the cap is accepted.
    body = IPV4_BLOCK + tlv(PP2_TYPE_NOOP, bytes(4096 - 12 - 3))
    result = parse(v2(0x21, 0x11, body))
    assert isinstance(result, Proxied) and result.length == 16 + 4096


def test_need_more_says_how_much() -> None:
    assert parse(SIG[:5]) == NeedMore(16)
    header = v2(0x21, 0x11, IPV4_BLOCK)
    assert parse(header[:16]) == NeedMore(28)
    assert parse(b"PROXY TCP4 1.2") == NeedMore(15)


def test_tlvs_and_their_properties() -> None:
    ssl = bytes([0x07]) + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3")  # kept raw
    body = (IPV4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + tlv(0x02, "bücher.example".encode())
            + tlv(PP2_TYPE_UNIQUE_ID, bytes(128)) + tlv(PP2_TYPE_SSL, ssl)
            + tlv(0xE0, b"custom") + tlv(0xE0, b"last wins") + tlv(PP2_TYPE_NOOP, b"x"))
    result = parse(v2(0x21, 0x11, body))
    assert isinstance(result, Proxied)
    assert result.alpn == b"h2"
    assert result.authority == "bücher.example"
    assert result.unique_id == bytes(128)
    assert result.tlvs[PP2_TYPE_SSL] == ssl
    assert result.tlvs[0xE0] == b"last wins"
    assert PP2_TYPE_NOOP not in result.tlvs
    bare = parse(v2(0x21, 0x11, IPV4_BLOCK))
    assert isinstance(bare, Proxied)
    assert (bare.tlvs, bare.alpn, bare.authority, bare.unique_id) == ({}, None, None, None)


def test_unspec_carries_tlvs() -> None:
    # Our own encoder sends UNSPEC with the SNI when the endpoints' families differ.
    result = parse(encode_v2(("192.0.2.1", 1), ("2001:db8::1", 2), "a.example"))
    assert isinstance(result, Proxied)
    assert (result.source, result.dest, result.authority) == (None, None, "a.example")


def test_crc_over_the_whole_header() -> None:
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), "a.example",
                       tlvs=[(PP2_TYPE_ALPN, b"h2")], crc=True)
    result = parse(header)
    assert isinstance(result, Proxied) and result.length == len(header)
    assert result.tlvs[PP2_TYPE_CRC32C] == header[-4:]
    # The checksum covers the fixed part too, not only the addresses and TLVs: TCP4 -> UDP4.
    assert parse(header[:13] + b"\x12" + header[14:]) == Invalid("v2: CRC32C mismatch")


def test_encode_v2_unchanged_without_the_new_options() -> None:
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    assert encode_v2(src, dst, "a") == encode_v2(src, dst, "a", tlvs=(), crc=False)
    assert encode_v2(src, dst) == SIG + bytes([0x21, 0x11, 0, 12]) + bytes(
        [192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2])


@pytest.mark.parametrize(("source", "expected"), [
    (("::ffff:192.0.2.1", 1), "192.0.2.1"),
    (("2001:db8::1", 1), "2001:db8::1"),
    (("192.0.2.1", 1), "192.0.2.1"),
    (None, None),
])
def test_client_ip_unmaps(source: tuple[str, int] | None, expected: str | None) -> None:
    assert Proxied(2, "PROXY", source, source, 16).client_ip() == expected


def test_v2_mapped_source_kept_as_given() -> None:
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    result = parse(v2(0x21, 0x21, mapped + ipaddress.IPv6Address("::1").packed + bytes(4)))
    assert isinstance(result, Proxied)
    assert result.source == ("::ffff:c000:201", 0)
    assert result.client_ip() == "192.0.2.1"


# ---------------------------------------------------------------------------------------------
# Properties

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)
rest = st.binary(max_size=64)
authorities = st.none() | st.text(string.ascii_lowercase + string.digits + ".-", min_size=1,
                                  max_size=60)
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _expected(ip: IP) -> str:
    # The encoder sends IPv4-mapped addresses as IPv4 (a v1 TCP4 line, a v2 INET block).
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


pairs = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))


@settings(max_examples=150, deadline=None)
@given(pairs, ports, ports, authorities, rest, st.booleans(), st.booleans())
def test_round_trip(ips: tuple[IP, IP], sport: int, dport: int, authority: str | None,
                    trailing: bytes, use_v2: bool, crc: bool) -> None:
    src, dst = (str(ips[0]), sport), (str(ips[1]), dport)
    header = (encode_v2(src, dst, authority, crc=crc) if use_v2 else encode_v1(src, dst))
    result = parse(header + trailing)
    assert isinstance(result, Proxied), result
    assert result.length == len(header)
    assert result.version == (2 if use_v2 else 1)
    assert result.command == "PROXY"
    s, d = (ipaddress.ip_address(_expected(ip)) for ip in ips)
    if s.version != d.version:  # an IPv4-mapped address facing a true IPv6 goes as UNKNOWN
        assert (result.source, result.dest, result.client_ip()) == (None, None, None)
    else:
        assert result.source == (str(s), sport)
        assert result.dest == (str(d), dport)
        assert result.client_ip() == str(s)
    if use_v2:
        assert result.authority == (authority or None)


def _valid_headers() -> st.SearchStrategy[bytes]:
    tcp = st.builds(lambda ips, sp, dp, a, v, c: (
        encode_v2((str(ips[0]), sp), (str(ips[1]), dp), a, crc=c) if v
        else encode_v1((str(ips[0]), sp), (str(ips[1]), dp))),
        pairs, ports, ports, authorities, st.booleans(), st.booleans())
    fixed = st.sampled_from([c[1] for c in VALID])
    return st.one_of(tcp, fixed)


@settings(max_examples=60, deadline=None)
@given(_valid_headers())
def test_every_strict_prefix_needs_more(header: bytes) -> None:
    for n in range(len(header)):
        result = parse(header[:n])
        assert isinstance(result, NeedMore), (n, result)
        assert result.at_least > n


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail: V2_SIGNATURE + tail, st.binary(max_size=300)),
    st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=120)),
    st.builds(lambda tail: b"PROXY TCP4 " + tail, st.text(string.printable, max_size=100)
              .map(str.encode)),
))
def test_random_bytes_only_three_outcomes(data: bytes) -> None:
    result = parse(data, max_v2=256)
    assert isinstance(result, Proxied | NeedMore | Invalid)
    if isinstance(result, Proxied):
        assert 0 < result.length <= len(data)
        assert parse(data[:result.length], max_v2=256) == result


CRC_HEADERS = [
    encode_v2(("192.0.2.1", 40000), ("198.51.100.7", 443), "a.example", crc=True),
    encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 443), None,
              tlvs=[(PP2_TYPE_ALPN, b"h2")], crc=True),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CRC_HEADERS), st.data())
def test_flipped_byte_under_crc(header: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(header) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = header[:at] + bytes([header[at] ^ flip]) + header[at + 1:]
    result = parse(mutated + HELLO)
    assert isinstance(result, Proxied | NeedMore | Invalid)
    # A flip in the signature or the fixed part may turn it into another outcome (a longer
    # declared length waits, a LOCAL command discards the block); it is never the same header.
    if isinstance(result, Proxied):
        assert result != parse(header)


def test_every_byte_of_a_crc_header_is_covered() -> None:
    # Exhaustively: any single-bit flip is refused or changes the parse, and after the fixed
    # part it is refused. Except the CRC TLV's own type byte, which turns the checksum into
    # another TLV: nothing can protect the marker that says a checksum is there.
    header = CRC_HEADERS[0]
    original = parse(header)
    crc_type_at = len(header) - 7
    assert header[crc_type_at] == PP2_TYPE_CRC32C
    for at in range(len(header)):
        for bit in range(8):
            mutated = header[:at] + bytes([header[at] ^ (1 << bit)]) + header[at + 1:]
            result = parse(mutated + HELLO)
            assert result != original
            if at >= 16 and at != crc_type_at and isinstance(result, Proxied):
                pytest.fail(f"flip at {at} bit {bit} accepted: {result}")


# ---------------------------------------------------------------------------------------------
# Oracle: the PyPI ``proxy-protocol`` package decodes what we decode, the same way.

proxyprotocol = pytest.importorskip("proxyprotocol.detect")


@settings(max_examples=100, deadline=None)
@given(pairs, ports, ports, st.booleans())
def test_oracle_agrees(ips: tuple[IP, IP], sport: int, dport: int, use_v2: bool) -> None:
    src, dst = (str(ips[0]), sport), (str(ips[1]), dport)
    header = encode_v2(src, dst) if use_v2 else encode_v1(src, dst)
    theirs = proxyprotocol.ProxyProtocolDetect().unpack(header)
    ours = parse(header)
    assert isinstance(ours, Proxied)
    assert ours.length == len(header)
    if theirs.source is None:  # UNKNOWN / UNSPEC: an IPv4-mapped address facing a true IPv6
        assert ours.source is None and ours.dest is None
    else:
        assert ours.source == (str(theirs.source[0]), theirs.source[1])
        assert ours.dest == (str(theirs.dest[0]), theirs.dest[1])
