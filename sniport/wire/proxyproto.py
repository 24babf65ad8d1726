"""PROXY protocol headers, versions 1 and 2 (sans-IO).

Job: build the header a passthrough upstream reads first, so that it learns the real client
address although the TCP connection comes from sniport.

Rules (haproxy's proxy-protocol.txt, the specification of both versions):
- v1 is one text line of at most 107 bytes ending in CRLF; sources that are not TCP over IP
  (a client on a unix socket) are sent as ``PROXY UNKNOWN``.
- v2 is binary: 12-byte signature, version/command, family/protocol, a 16-bit length, the
  addresses, then TLVs. The SNI goes in PP2_TYPE_AUTHORITY, the ALPN choice is unknown to a
  proxy that does not terminate TLS, so the client's first ALPN offer is not sent.
- Both endpoints must be of the same family; a mismatch is sent as UNKNOWN (v1) / UNSPEC (v2).
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_CMD_PROXY = 0x21  # version 2, command PROXY
V2_FAM_UNSPEC = 0x00
V2_TCP4 = 0x11
V2_TCP6 = 0x21
V2_UNIX_STREAM = 0x31
PP2_TYPE_AUTHORITY = 0x02

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


def encode_v2(src: Endpoint, dst: Endpoint, authority: str | None = None) -> bytes:
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
    return V2_SIGNATURE + struct.pack("!BBH", V2_CMD_PROXY, fam, len(body)) + body


def _unix_path(path: str) -> bytes:
    # Abstract names (Linux) start with NUL; paths are padded to 108 bytes.
    raw = ("\0" + path[1:]).encode() if path.startswith("@") else path.encode()
    return raw[:108].ljust(108, b"\0")
