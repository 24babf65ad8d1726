"""First-bytes protocol detection on the TLS port (sans-IO).

Job: tell from the first bytes a client sends on a TLS listener whether it speaks TLS, SSH or
plaintext HTTP/1.x, so that the caller can hand the connection to the ClientHello parser, to a
``[[passthrough]] protocol = "ssh"`` block, or to ``[default] non_tls = "http"``. Nothing is
consumed: the caller peeks, and whatever was peeked is passed on untouched (house rule 3).

Rules (house rule 2: three outcomes, a byte cap, a time cap):
- ``detect`` returns ``Detected``, ``NeedMore`` or ``Unknown``; it never raises on any data.
  Empty data is ``NeedMore(1)``. A prefix that could still begin a known protocol (several of
  them, maybe: "S" begins both "SSH-" and an HTTP method token) is ``NeedMore`` until it decides.
- Byte cap: ``max_bytes`` (default 512). ``NeedMore`` is never returned once ``len(data) >=
  max_bytes``; only the first ``max_bytes`` bytes are looked at. The time cap is the caller's:
  a client that sends nothing, or too little, within its timeout is closed there, not here.
- TLS (RFC 8446 section 5.1, RFC 5246 section 6.2.1): content type 22 (handshake) and a record
  version 0x03 0x00..0x04. Three bytes decide; the ClientHello parser checks the rest.
- SSH (RFC 4253 section 4.2): the client's first line is ``SSH-protoversion-softwareversion
  SP comments CR LF``, at most 255 bytes with CR LF. protoversion is "2.0", or "1.99" (section
  5.1, a compatible 2.0 client); "1.5" and the like are SSH-1, refused. softwareversion is
  printable US-ASCII without whitespace and "-", and not empty; comments are printable US-ASCII.
  A lone LF ends the line too, as OpenSSH accepts it. The line (without its end) is returned.
  Data starting with "SSH-" is judged as SSH only: no HTTP method begins so (IANA HTTP Method
  Registry), and it gives a precise reason early instead of waiting for a request line.
- HTTP/1.x (RFC 9112 section 3): ``method SP request-target SP HTTP-version CRLF`` where method
  is any token (RFC 9110 sections 9.1 and 5.6.2: GET, POST, ... or an extension method),
  request-target is non-empty without whitespace or control bytes (its syntax is httptools'
  to judge later), and HTTP-version is "HTTP/1." DIGIT. A lone LF ends the line (RFC 9112
  section 2.2 lets a recipient accept it). Headers are not looked at (house rule 8). Empty
  lines before the request line (RFC 9112 section 2.2, a SHOULD for keep-alive leftovers) are
  not skipped: a new connection on the TLS port has no previous message. "PRI * HTTP/2.0"
  (RFC 9113 section 3.3, prior knowledge) is refused: it is not HTTP/1.x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["tls", "ssh", "http"]

SSH_MAX_LINE = 255  # RFC 4253 section 4.2, CR LF included
DEFAULT_MAX_BYTES = 512


@dataclass(frozen=True, slots=True)
class Detected:
    """The protocol is known. ``length``: the bytes that decided it (3 for TLS, the whole
    identification or request line with its end for SSH and HTTP); ``line``: that line without
    CR LF (empty for TLS). Nothing is consumed: the caller passes all the bytes on."""

    protocol: Protocol
    line: bytes = b""
    length: int = 0


@dataclass(frozen=True, slots=True)
class NeedMore:
    """A valid prefix under the cap: nothing new can be said before the data reaches
    ``at_least`` bytes."""

    at_least: int


@dataclass(frozen=True, slots=True)
class Unknown:
    reason: str


@dataclass(frozen=True, slots=True)
class Silent:
    """Not a result of ``detect``: the caller's verdict on a client that sent nothing at all
    within its wait (``non_tls_timeout``), i.e. one that waits for the server to speak."""


SILENT = Silent()


Result = Detected | NeedMore | Unknown

NO_PROTOCOL = "bytes that start no known protocol"
_SSH = b"SSH-"
_SSH_VERSIONS = (b"2.0-", b"1.99-")  # RFC 4253 sections 4.2 and 5.1
_HTTP1 = b"HTTP/1."
_DIGITS = frozenset(b"0123456789")
_PRINTABLE = frozenset(range(0x20, 0x7F))  # US-ASCII printable, SP included
_SOFTWARE = _PRINTABLE - {0x20, 0x2D}  # RFC 4253 section 4.2: no whitespace, no minus
# Runs of tchar (RFC 9110 section 5.6.2), and of bytes a request-target may hold: no
# whitespace and no controls (RFC 9112 section 3.2).
_TOKEN_RUN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_TARGET_RUN = re.compile(rb"[^\x00-\x20\x7f]*")


def detect(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Result:
    """Which protocol ``data`` (the first bytes of a connection) begins, if any yet."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
    if not data:
        return NeedMore(1)
    window = data[:max_bytes]
    if window[0] == 0x16:
        result = _tls(window)
    elif window[: len(_SSH)] == _SSH:
        result = _ssh(window, min(max_bytes, SSH_MAX_LINE))
    else:
        result = _http(window, max_bytes)  # "S", "SS", "SSH" are method-token prefixes too
    if isinstance(result, NeedMore):
        if len(data) >= max_bytes:  # only reachable with a cap under 3 bytes (TLS)
            return Unknown(f"no protocol decided within {max_bytes} bytes")
        return NeedMore(min(result.at_least, max_bytes))
    return result


def _tls(data: bytes) -> Result:
    # RFC 8446 section 5.1: ContentType handshake(22), then legacy_record_version; 0x0300
    # (SSL 3.0) to 0x0304 are the versions a record has ever carried.
    if len(data) >= 2 and data[1] != 0x03:
        return Unknown(NO_PROTOCOL)
    if len(data) < 3:
        return NeedMore(3)
    if data[2] > 0x04:
        return Unknown(NO_PROTOCOL)
    return Detected("tls", b"", 3)


def _ssh(data: bytes, cap: int) -> Result:
    window = data[:cap]
    end = window.find(b"\n")
    if end >= 0:
        line = window[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        problem = _ssh_problem(line, complete=True)
        return Unknown(problem) if problem else Detected("ssh", line, end + 1)
    # No line end yet: the bytes so far must begin a valid line. A CR is fine as the last
    # byte (its LF may be next); anywhere else it is a forbidden character.
    problem = _ssh_problem(window[:-1] if window.endswith(b"\r") else window, complete=False)
    if problem:
        return Unknown(problem)
    if len(window) >= cap:
        return Unknown(f"SSH banner longer than {cap} bytes")
    return NeedMore(len(data) + 1)


def _ssh_problem(line: bytes, *, complete: bool) -> str | None:
    """Why ``line`` (after "SSH-", without its end) is not, or cannot begin, an RFC 4253
    identification string; None when it is (or still may be)."""
    rest = line[len(_SSH):]
    for version in _SSH_VERSIONS:
        if rest.startswith(version):
            rest = rest[len(version):]
            break
        if not complete and version.startswith(rest):
            return None  # still inside the protoversion
    else:
        shown = line[:16].decode("ascii", "backslashreplace")
        return (f"SSH identification {shown!r} does not begin SSH-2.0- or SSH-1.99- "
                "(RFC 4253 sections 4.2 and 5)")
    software, space, comments = rest.partition(b" ")
    if any(byte not in _SOFTWARE for byte in software):
        return "SSH software version holds a byte RFC 4253 section 4.2 forbids"
    if not software and (complete or space):
        return "SSH identification without a software version"
    if any(byte not in _PRINTABLE for byte in comments):
        return "SSH comments hold a byte that is not printable US-ASCII"
    return None


def _http(data: bytes, max_bytes: int) -> Result:
    n = len(data)
    # Scanned by regular expressions (C speed), not byte by byte in Python: a client that
    # sends its line a byte at a time makes the caller look again at every byte.
    i = _TOKEN_RUN.match(data).end()  # type: ignore[union-attr]  # matches the empty run
    if i == 0:
        return Unknown(NO_PROTOCOL)
    if i < n and data[i] != 0x20:
        return Unknown(NO_PROTOCOL if i < 3 else "not an HTTP/1.x request line: "
                       "the first word is not followed by a space (RFC 9112 section 3)")
    i += 1
    start = i
    i = _TARGET_RUN.match(data, i).end()  # type: ignore[union-attr]
    if i < n and (i == start or data[i] != 0x20):
        return Unknown("not an HTTP/1.x request line: no request-target followed by a space "
                       "(RFC 9112 section 3)")
    i += 1
    version = data[i: i + len(_HTTP1) + 1]
    if version[: len(_HTTP1)] != _HTTP1[: len(version)] or (
            len(version) > len(_HTTP1) and version[-1] not in _DIGITS):
        if data.startswith(b"PRI * HTTP/2.0"):
            return Unknown("HTTP/2 with prior knowledge (RFC 9113 section 3.3) is not HTTP/1.x")
        return Unknown("not an HTTP/1.x request line: the version is not HTTP/1.x "
                       "(RFC 9112 section 2.3)")
    i += len(version)
    if i < n and data[i] == 0x0D:  # CR, then the LF must follow
        i += 1
    if i < n:
        if data[i] != 0x0A:
            return Unknown("not an HTTP/1.x request line: no line end after the version "
                           "(RFC 9112 section 2.2)")
        line = data[:i].removesuffix(b"\r")
        return Detected("http", line, i + 1)
    if n >= max_bytes:
        return Unknown(f"request line longer than {max_bytes} bytes")
    return NeedMore(n + 1)
