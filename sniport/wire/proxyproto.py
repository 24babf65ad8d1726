"""PROXY protocol headers, versions 1 and 2 (sans-IO): the encoder and the decoder.

Job: build the header a passthrough upstream reads first, so that it learns the real client
address although the TCP connection comes from sniport; and read the header a load balancer
puts in front of a connection to us (``parse``), saying exactly how many bytes it takes so the
caller consumes those and leaves the TLS ClientHello behind it untouched.

Rules (haproxy's proxy-protocol.txt, the specification of both versions):
- v1 is one text line of at most 107 bytes ending in CRLF; sources that are not TCP over IP
  (a client on a unix socket) are sent as ``PROXY UNKNOWN``.
- v2 is binary: 12-byte signature, version/command, family/protocol, a 16-bit length, the
  addresses, then TLVs. The SNI goes in PP2_TYPE_AUTHORITY, the ALPN choice is unknown to a
  proxy that does not terminate TLS, so the client's first ALPN offer is not sent.
- Both endpoints must be of the same family; a mismatch is sent as UNKNOWN (v1) / UNSPEC (v2).

Decoder rules (house rule 2: complete, need more, typed error, and a byte cap):
- ``parse`` returns ``Proxied``, ``NeedMore`` or ``Invalid``; it never raises on any input.
  The version is told by the signature (section 2.2: the v2 signature cannot begin a v1 line
  nor any valid protocol start); a prefix of either signature is NeedMore, anything else is
  Invalid at once, so a client sending a ClientHello directly is refused on its first byte.
- v1 (section 2.1) is strict: single spaces, addresses in the family the line names (no IPv6
  scope), ports in [0..65535] without leading zeros ("heading zeroes are not permitted"),
  ``UNKNOWN`` followed by anything up to CRLF. No CRLF within 107 bytes is Invalid.
- v2 (section 2.2): version 2 only; commands LOCAL and PROXY only; families UNSPEC, INET,
  INET6 and UNIX over STREAM or DGRAM only ("must be rejected as invalid by receivers"). LOCAL
  discards the whole block, family included (the spec: use the real endpoints). The declared
  length must hold the addresses of the family, and the TLVs must fill the rest exactly. A
  declared length over ``max_v2`` is Invalid as soon as the 16-byte fixed part is in.
- PP2_TYPE_CRC32C (section 2.2.5), when present, is checked over the whole header with its
  own value zeroed; PP2_TYPE_NOOP is skipped; PP2_TYPE_AUTHORITY must be UTF-8;
  PP2_TYPE_UNIQUE_ID is at most 128 bytes; other TLVs (PP2_TYPE_SSL and its sub-TLVs
  included) are kept raw. A type given twice: the last one wins (CRC32C twice is Invalid).
- CRC32C is hand-written (a 256-entry table, Castagnoli 0x82F63B78 reflected): the PyPI
  packages (``crc32c``, LGPL; ``google-crc32c``) are C extensions, a compiled runtime
  dependency for a checksum computed at most once per connection over at most
  16 + ``max_v2`` bytes. It is tested against the RFC 3720 B.4 vectors.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_CMD_LOCAL = 0x20  # version 2, command LOCAL
V2_CMD_PROXY = 0x21  # version 2, command PROXY
V2_FAM_UNSPEC = 0x00
V2_TCP4 = 0x11
V2_UDP4 = 0x12
V2_TCP6 = 0x21
V2_UDP6 = 0x22
V2_UNIX_STREAM = 0x31
V2_UNIX_DGRAM = 0x32
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
V1_MAX = 107  # section 2.1: the longest line, CRLF included

# An endpoint: (ip, port) for TCP, a path (str, "" for an unnamed socket) for unix sockets.
Endpoint = tuple[str, int] | str


def _ip(endpoint: Endpoint) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(endpoint, tuple):
        addr = ipaddress.ip_address(endpoint[0].split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return addr
    return None


def encode_v1(src: Endpoint, dst: Endpoint) -> bytes:
    s, d = _ip(src), _ip(dst)
    if s is None or d is None or s.version != d.version:
        return b"PROXY UNKNOWN\r\n"
    assert isinstance(src, tuple) and isinstance(dst, tuple)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Endpoint, dst: Endpoint, authority: str | None = None, *,
              tlvs: Iterable[tuple[int, bytes]] = (), crc: bool = False) -> bytes:
    """The v2 header; ``tlvs`` follow the authority as given, ``crc`` appends PP2_TYPE_CRC32C."""
    s, d = _ip(src), _ip(dst)
    if s is not None and d is not None and s.version == d.version:
        assert isinstance(src, tuple) and isinstance(dst, tuple)
        fam = V2_TCP4 if s.version == 4 else V2_TCP6
        body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    elif isinstance(src, str) and isinstance(dst, str):
        fam = V2_UNIX_STREAM
        body = _unix_path(src) + _unix_path(dst)
    else:
        fam, body = V2_FAM_UNSPEC, b""
    if authority:
        value = authority.encode("ascii")
        body += struct.pack("!BH", PP2_TYPE_AUTHORITY, len(value)) + value
    for kind, value in tlvs:
        body += struct.pack("!BH", kind, len(value)) + value
    if crc:
        # Section 2.2.5: the checksum covers the whole header with its own value zeroed.
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + bytes(4)
    header = V2_SIGNATURE + struct.pack("!BBH", V2_CMD_PROXY, fam, len(body)) + body
    if crc:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def _unix_path(path: str) -> bytes:
    # Abstract names (Linux) start with NUL; paths are padded to 108 bytes.
    raw = ("\0" + path[1:]).encode() if path.startswith("@") else path.encode()
    return raw[:108].ljust(108, b"\0")


# ---------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), for PP2_TYPE_CRC32C. Why hand-written: see the module docstring.


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Decoder


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Proxied:
    """A complete header. ``length`` is the number of bytes it takes at the start of the data;
    the caller consumes exactly that many. ``source``/``dest`` are None when the connection's
    own addresses stand (LOCAL, UNKNOWN, UNSPEC) and for unix sockets."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: Address | None
    dest: Address | None
    length: int
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def authority(self) -> str | None:
        value = self.tlvs.get(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")  # checked by parse

    @property
    def alpn(self) -> bytes | None:
        return self.tlvs.get(PP2_TYPE_ALPN)

    @property
    def unique_id(self) -> bytes | None:
        return self.tlvs.get(PP2_TYPE_UNIQUE_ID)

    def client_ip(self) -> str | None:
        """The source address as text, an IPv4-mapped IPv6 address given as its IPv4 form."""
        if self.source is None:
            return None
        addr = ipaddress.ip_address(self.source[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """A valid prefix. ``at_least``: the data must reach this many bytes before anything new
    can be said (the whole header for v2 once its fixed part is in), e.g. for SO_RCVLOWAT."""

    at_least: int


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str


Result = Proxied | NeedMore | Invalid

_V1_SIGNATURE = b"PROXY "
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # section 2.1: no heading zeroes
_V2_ADDRESS_LEN = {0x1: 12, 0x2: 36, 0x3: 216}  # by family: INET, INET6, UNIX
_V2_FAMILIES = {V2_FAM_UNSPEC, V2_TCP4, V2_UDP4, V2_TCP6, V2_UDP6, V2_UNIX_STREAM,
                V2_UNIX_DGRAM}


def parse(data: bytes, *, max_v2: int = 4096) -> Result:
    """Decode the PROXY header at the start of ``data`` (whatever follows is left alone)."""
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data, max_v2) if n == len(V2_SIGNATURE) else NeedMore(16)
    n = min(len(data), len(_V1_SIGNATURE))
    if data[:n] == _V1_SIGNATURE[:n]:
        return _parse_v1(data) if n == len(_V1_SIGNATURE) else NeedMore(n + 1)
    return Invalid("not a PROXY protocol header")


def _parse_v1(data: bytes) -> Result:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            return Invalid(f"v1 line over {V1_MAX} bytes")
        # Refuse early what cannot become a v1 line: a wrong protocol, a bare LF or CR in a
        # TCP line (after UNKNOWN anything goes until the CRLF, section 2.1).
        rest = data[len(_V1_SIGNATURE):]
        if not any(p.startswith(rest[:len(p)]) for p in _V1_PROTOCOLS):
            return Invalid("v1: unknown protocol")
        if not rest.startswith(b"UNKNOWN") and (b"\n" in rest or b"\r" in rest[:-1]):
            return Invalid("v1: CR and LF must come together as CRLF")
        return NeedMore(len(data) + 1)
    length = end + 2
    line = data[len(_V1_SIGNATURE):end]
    if line.startswith(b"UNKNOWN") and line[7:8] in (b"", b" "):
        # Section 2.1: the receiver must ignore anything presented before the CRLF.
        return Proxied(1, "PROXY", None, None, length)
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return Invalid("v1: not ASCII")
    fields = text.split(" ")
    if len(fields) != 5 or fields[0] not in ("TCP4", "TCP6"):
        return Invalid("v1: expected PROXY TCP4|TCP6 <src> <dst> <sport> <dport>")
    proto, src, dst, sport, dport = fields
    kind = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    try:
        if "%" in src or "%" in dst:
            raise ValueError("scoped address")
        s_ip, d_ip = kind(src), kind(dst)
    except ValueError:
        return Invalid(f"v1: bad address for {proto}")
    ports = []
    for port in (sport, dport):
        if not _PORT.fullmatch(port) or int(port) > 0xFFFF:
            return Invalid(f"v1: bad port {port!r}")
        ports.append(int(port))
    return Proxied(1, "PROXY", (str(s_ip), ports[0]), (str(d_ip), ports[1]), length)


def _parse_v2(data: bytes, max_v2: int) -> Result:
    if len(data) < 16:
        return NeedMore(16)
    ver_cmd, fam, declared = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        return Invalid(f"v2: version {ver_cmd >> 4} is not 2")
    if ver_cmd not in (V2_CMD_LOCAL, V2_CMD_PROXY):
        return Invalid(f"v2: unknown command {ver_cmd & 0xF}")
    if declared > max_v2:
        return Invalid(f"v2 length {declared} over {max_v2}")
    length = 16 + declared
    if ver_cmd == V2_CMD_PROXY:
        if fam not in _V2_FAMILIES:
            return Invalid(f"v2: unknown family/protocol 0x{fam:02x}")
        if declared < _V2_ADDRESS_LEN.get(fam >> 4, 0):
            return Invalid(f"v2: length {declared} too short for the addresses of 0x{fam:02x}")
    if len(data) < length:
        return NeedMore(length)
    if ver_cmd == V2_CMD_LOCAL:
        # Section 2.2: LOCAL discards the protocol block, family included.
        return Proxied(2, "LOCAL", None, None, length)
    header = data[:length]
    addr_len = _V2_ADDRESS_LEN.get(fam >> 4, 0)
    tlvs = _parse_tlvs(header, 16 + addr_len)
    if isinstance(tlvs, Invalid):
        return tlvs
    source = dest = None
    if fam >> 4 in (0x1, 0x2):
        size = 4 if fam >> 4 == 0x1 else 16
        raw = header[16:16 + addr_len]
        kind = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
        sport, dport = struct.unpack_from("!HH", raw, 2 * size)
        source = (str(kind(raw[:size])), sport)
        dest = (str(kind(raw[size:2 * size])), dport)
    return Proxied(2, "PROXY", source, dest, length, tlvs)


def _parse_tlvs(header: bytes, pos: int) -> dict[int, bytes] | Invalid:
    tlvs: dict[int, bytes] = {}
    crc_at = -1
    while pos < len(header):
        if len(header) - pos < 3:
            return Invalid("v2: TLVs do not fill the declared length")
        kind, size = struct.unpack_from("!BH", header, pos)
        start, pos = pos + 3, pos + 3 + size
        if pos > len(header):
            return Invalid(f"v2: TLV 0x{kind:02x} overruns the declared length")
        value = header[start:pos]
        if kind == PP2_TYPE_NOOP:
            continue
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                return Invalid("v2: CRC32C TLV is not 4 bytes")
            if crc_at >= 0:
                return Invalid("v2: CRC32C TLV given twice")
            crc_at = start
        elif kind == PP2_TYPE_AUTHORITY:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return Invalid("v2: authority is not UTF-8")
        elif kind == PP2_TYPE_UNIQUE_ID and size > 128:
            return Invalid("v2: unique id over 128 bytes")
        tlvs[kind] = value
    if crc_at >= 0:
        zeroed = header[:crc_at] + bytes(4) + header[crc_at + 4:]
        if crc32c(zeroed) != struct.unpack_from("!I", header, crc_at)[0]:
            return Invalid("v2: CRC32C mismatch")
    return tlvs
