"""Incremental, bounded parser of the TLS ClientHello (sans-IO).

Job: from the first bytes a client sends, tell whether they are TLS and, once the whole
ClientHello handshake message has arrived, extract what routing needs: the SNI host_name,
the ALPN protocol list, supported_versions and the legacy version, and whether Encrypted
ClientHello was offered.

ECH (RFC 9849): ``Hello.ech`` is True when the hello carries an ``encrypted_client_hello``
extension. It means "offered", nothing more: a real ClientHelloOuter and a GREASE one
(RFC 9849 section 6.2; Chromium sends GREASE ECH on every connection) look alike on the
wire, so a router cannot tell them apart. Either way the SNI reported is the outer one (the
public name), and routing uses it; the extension's payload is not checked here — the TLS
endpoint that receives the connection judges it.

Rules:
- No I/O here (no asyncio, socket or ssl import): bytes in, a typed outcome out.
- Three outcomes of ``feed``: ``Hello`` (complete), ``NeedMore`` (with a lower bound on the
  bytes still missing), ``NotTLS``; anything broken raises ``MalformedHello`` with a reason.
- The handshake message may be spread over several TLS records (RFC 8446 section 5.1) and the
  records over any number of TCP segments; both are reassembled.
- Bounded: the records carrying the hello may total at most ``MAX_HELLO_BYTES``.
- Whatever follows the hello (ChangeCipherSpec, early data) is not looked at.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

MAX_HELLO_BYTES = 16 * 1024

RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
# RFC 8446 section 5.1: a TLSPlaintext fragment is at most 2^14 bytes.
MAX_RECORD_PAYLOAD = 1 << 14

EXT_SERVER_NAME = 0  # RFC 6066 section 3
EXT_ALPN = 16  # RFC 7301 section 3.1
EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 section 4.2.1
# RFC 9849 section 5 (also the codepoint of the later drafts, which clients deployed).
# Earlier experimental codepoints are deliberately not counted: encrypted_server_name 0xffce
# of the ESNI drafts and the interim ECH draft codepoints (e.g. 0xfe08 of draft -08) were
# opt-in experiments that current clients no longer send; "offered" means RFC 9849's ECH.
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
NAME_TYPE_HOST_NAME = 0
_PRINTABLE = re.compile(rb"[\x21-\x7e]+")


class MalformedHello(Exception):
    """The bytes claim to be a TLS ClientHello but break its grammar; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is several times slower
class Hello:
    """A complete ClientHello. ``size`` counts the record bytes that carried it."""

    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[int, ...]
    legacy_version: int
    size: int
    # Last and defaulted: Hello is also built positionally with the five fields above.
    ech: bool = False  # an encrypted_client_hello extension was offered (real or GREASE)


@dataclass(slots=True)
class NeedMore:
    """The hello is incomplete; at least ``at_least`` more bytes must arrive."""

    at_least: int


@dataclass(frozen=True, slots=True)
class NotTLS:
    """The first byte is not a TLS handshake record: some other protocol."""


NOT_TLS = NotTLS()

Outcome = Hello | NeedMore | NotTLS


class ClientHelloParser:
    """Feed it the client's bytes in order, as they arrive; it keeps its place.

    After an outcome other than ``NeedMore`` the parser is finished and must not be fed again.
    """

    __slots__ = ("_consumed", "_handshake", "_header", "_record_left", "_total")

    def __init__(self) -> None:
        self._handshake = bytearray()  # reassembled handshake-layer bytes
        self._header = bytearray()  # a record header being collected
        self._record_left = 0  # payload bytes of the current record not yet seen
        self._consumed = 0  # record-layer bytes taken so far
        self._total = -1  # full handshake message length, once its header is known

    def feed(self, data: bytes | bytearray | memoryview) -> Outcome:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._record_left == 0:
                take = min(RECORD_HEADER - len(self._header), len(view) - pos)
                self._header += view[pos : pos + take]
                pos += take
                first = self._consumed == 0
                self._consumed += take
                if first and self._header[0] != CONTENT_HANDSHAKE:
                    return NOT_TLS  # the very first byte decides: TLS or another protocol
                if len(self._header) < RECORD_HEADER:
                    continue
                self._start_record()
            else:
                take = min(self._record_left, len(view) - pos)
                self._handshake += view[pos : pos + take]
                pos += take
                self._consumed += take
                self._record_left -= take
                outcome = self._check_handshake()
                if outcome is not None:
                    return outcome
        return self._need_more()

    def _start_record(self) -> None:
        header = self._header
        ctype, major, length = header[0], header[1], (header[3] << 8) | header[4]
        self._header = bytearray()
        if ctype != CONTENT_HANDSHAKE:
            # RFC 8446 section 5.1: handshake messages may not be interleaved with other types.
            raise MalformedHello(f"record type {ctype} before the ClientHello was complete")
        if major != 3:
            raise MalformedHello(f"record version {major}.{header[2]} is not TLS")
        if length == 0:
            raise MalformedHello("empty handshake record")  # forbidden by RFC 8446 section 5.1
        if length > MAX_RECORD_PAYLOAD:
            raise MalformedHello(f"record of {length} bytes exceeds 2^14")
        # The bytes of this record that can still belong to the hello count against the cap.
        wanted = length if self._total < 0 else min(length, self._total - len(self._handshake))
        if self._consumed + wanted > MAX_HELLO_BYTES:
            raise MalformedHello(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")
        self._record_left = length

    def _check_handshake(self) -> Outcome | None:
        hs = self._handshake
        if self._total < 0:
            if len(hs) < HANDSHAKE_HEADER:
                return None
            if hs[0] != HANDSHAKE_CLIENT_HELLO:
                raise MalformedHello(f"first handshake message has type {hs[0]}, not ClientHello")
            self._total = HANDSHAKE_HEADER + ((hs[1] << 16) | (hs[2] << 8) | hs[3])
            # The smallest record overhead is one header per 2^14 bytes of payload.
            records = -(-self._total // MAX_RECORD_PAYLOAD)
            if self._total + records * RECORD_HEADER > MAX_HELLO_BYTES:
                raise MalformedHello(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")
        if len(hs) < self._total:
            return None
        # Bytes of the same record after the hello belong to another handshake message;
        # a ClientHello is alone in its flight (RFC 8446 section 4), so they are ignored.
        size = self._consumed - (len(hs) - self._total)
        return parse_client_hello_body(memoryview(hs)[HANDSHAKE_HEADER : self._total], size)

    def _need_more(self) -> NeedMore:
        if self._record_left == 0:
            missing_header = RECORD_HEADER - len(self._header)
            if self._total < 0:
                return NeedMore(missing_header + max(1, HANDSHAKE_HEADER - len(self._handshake)))
            return NeedMore(missing_header + self._total - len(self._handshake))
        # The rest of the header or of the message; when the current record ends first,
        # another record header too.
        if self._total < 0:
            missing = HANDSHAKE_HEADER - len(self._handshake)
        else:
            missing = self._total - len(self._handshake)
        return NeedMore(missing + (RECORD_HEADER if missing > self._record_left else 0))


class _Reader:
    """Bounds-checked big-endian reads over a memoryview (RFC 8446 section 3 vectors)."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.what = what

    def left(self) -> int:
        return self.end - self.pos

    def uint(self, n: int) -> int:
        if self.pos + n > self.end:
            raise MalformedHello(f"{self.what} truncated")
        value = int.from_bytes(self.buf[self.pos : self.pos + n], "big")
        self.pos += n
        return value

    def vector(self, len_bytes: int, what: str) -> memoryview:
        n = self.uint(len_bytes)
        if self.pos + n > self.end:
            raise MalformedHello(f"{what} overruns {self.what}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def parse_client_hello_body(body: memoryview, size: int) -> Hello:
    """Parse the ClientHello body (RFC 8446 section 4.1.2; RFC 5246 section 7.4.1.2).

    A well-formed hello, the case of every connection, takes the fast path; anything it
    does not recognise goes through the careful path, which names what is wrong."""
    hello = _fast_path(bytes(body), size)
    return hello if hello is not None else _careful_path(body, size)


def _fast_path(b: bytes, size: int) -> Hello | None:
    """Plain indexing, no error reporting: None as soon as anything is unusual."""
    end = len(b)
    if end < 35:
        return None
    pos = 35 + b[34]  # legacy_version(2) random(32) session_id<0..32>
    if b[34] > 32 or pos + 2 > end:
        return None
    n = (b[pos] << 8) | b[pos + 1]  # cipher_suites
    if n < 2 or n & 1:
        return None
    pos += 2 + n
    if pos >= end or b[pos] < 1:  # compression_methods
        return None
    pos += 1 + b[pos]
    if pos + 2 > end:
        return None
    if ((b[pos] << 8) | b[pos + 1]) != end - pos - 2:  # the extensions fill the rest
        return None
    pos += 2
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech = False
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            return None
        ext_type = (b[pos] << 8) | b[pos + 1]
        length = (b[pos + 2] << 8) | b[pos + 3]
        pos += 4
        stop = pos + length
        if stop > end or ext_type in seen:
            return None
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            # One host_name, the list filling the extension (RFC 6066 section 3).
            if (length < 6 or ((b[pos] << 8) | b[pos + 1]) != length - 2 or b[pos + 2] != 0
                    or ((b[pos + 3] << 8) | b[pos + 4]) != length - 5):
                return None
            raw = b[pos + 5 : stop]
            if _PRINTABLE.fullmatch(raw) is None:
                return None
            sni = raw.decode("ascii")
        elif ext_type == EXT_ALPN:
            if length < 3 or ((b[pos] << 8) | b[pos + 1]) != length - 2:
                return None
            names: list[str] = []
            i = pos + 2
            while i < stop:
                k = b[i]
                if k == 0 or i + 1 + k > stop:
                    return None
                names.append(b[i + 1 : i + 1 + k].decode("latin-1"))
                i += 1 + k
            alpn = tuple(names)
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            k = b[pos] if length else 0
            if length < 3 or k != length - 1 or k & 1:
                return None
            versions = struct.unpack(f"!{k // 2}H", b[pos + 1 : stop])
        elif ext_type == EXT_ENCRYPTED_CLIENT_HELLO:
            # Last in the chain: the other extensions pay one more comparison, nothing else.
            ech = True
        pos = stop
    return Hello(sni, alpn, versions, (b[0] << 8) | b[1], size, ech)


def _careful_path(body: memoryview, size: int) -> Hello:
    r = _Reader(body, "ClientHello")
    legacy_version = r.uint(2)
    if r.left() < 32:
        raise MalformedHello("ClientHello truncated")
    r.pos += 32  # random
    session_id = r.vector(1, "session_id")
    if len(session_id) > 32:
        raise MalformedHello("session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if len(suites) < 2 or len(suites) % 2:
        raise MalformedHello("cipher_suites length is not a positive even number")
    if len(r.vector(1, "compression_methods")) < 1:
        raise MalformedHello("no compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech = False
    if r.left() == 0:
        # A TLS 1.0-1.2 hello may end here: no extensions at all.
        return Hello(None, (), (), legacy_version, size)
    block = bytes(r.vector(2, "extensions"))
    if r.left():
        raise MalformedHello("bytes after the extensions")
    # The extension walk is the per-connection hot spot: plain indexing on bytes.
    seen: set[int] = set()
    pos, end = 0, len(block)
    while pos < end:
        if pos + 4 > end:
            raise MalformedHello("extensions truncated")
        ext_type = (block[pos] << 8) | block[pos + 1]
        length = (block[pos + 2] << 8) | block[pos + 3]
        pos += 4
        if pos + length > end:
            raise MalformedHello(f"extension {ext_type} overruns extensions")
        if ext_type in seen:
            # RFC 8446 section 4.2: no more than one extension of the same type.
            raise MalformedHello(f"extension {ext_type} repeated")
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            sni = _parse_server_name(memoryview(block)[pos : pos + length])
        elif ext_type == EXT_ALPN:
            alpn = _parse_alpn(memoryview(block)[pos : pos + length])
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            versions = _parse_supported_versions(memoryview(block)[pos : pos + length])
        elif ext_type == EXT_ENCRYPTED_CLIENT_HELLO:
            ech = True
        pos += length
    return Hello(sni, alpn, versions, legacy_version, size, ech)


def _parse_server_name(data: memoryview) -> str | None:
    # RFC 6066 section 3: ServerNameList; at most one name per name_type.
    if len(data) == 0:
        return None  # the form a *server* sends; tolerated, means no name
    outer = _Reader(data, "server_name")
    names = _Reader(outer.vector(2, "server_name_list"), "server_name_list")
    if outer.left() or names.left() == 0:
        raise MalformedHello("server_name list length mismatch")
    host: str | None = None
    while names.left():
        name_type = names.uint(1)
        name = names.vector(2, "server name")
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise MalformedHello("more than one host_name in server_name")
        if len(name) == 0:
            raise MalformedHello("empty host_name")
        raw = bytes(name)
        # The HostName is ASCII (A-labels for internationalised names); no NUL or controls.
        if _PRINTABLE.fullmatch(raw) is None:
            raise MalformedHello("host_name is not printable ASCII")
        host = raw.decode("ascii")
    return host


def _parse_alpn(data: memoryview) -> tuple[str, ...]:
    # RFC 7301 section 3.1: ProtocolNameList protocol_name_list<2..2^16-1>, names <1..2^8-1>.
    outer = _Reader(data, "ALPN")
    lst = _Reader(outer.vector(2, "ALPN list"), "ALPN list")
    if outer.left() or lst.left() == 0:
        raise MalformedHello("ALPN list length mismatch")
    protocols: list[str] = []
    while lst.left():
        proto = lst.vector(1, "ALPN protocol")
        if len(proto) == 0:
            raise MalformedHello("empty ALPN protocol name")
        protocols.append(bytes(proto).decode("latin-1"))
    return tuple(protocols)


def _parse_supported_versions(data: memoryview) -> tuple[int, ...]:
    # RFC 8446 section 4.2.1: ProtocolVersion versions<2..254> in the ClientHello.
    outer = _Reader(data, "supported_versions")
    lst = outer.vector(1, "supported_versions list")
    if outer.left() or len(lst) < 2 or len(lst) % 2:
        raise MalformedHello("supported_versions length mismatch")
    return struct.unpack(f"!{len(lst) // 2}H", lst)
