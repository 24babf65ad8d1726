"""First-bytes protocol detection (``sniport.wire.detect.detect``): TLS record starts (RFC 8446
section 5.1), SSH identification lines (RFC 4253 section 4.2), HTTP/1.x request lines
(RFC 9112 section 3, methods as RFC 9110 tokens).

Three outcomes only (house rule 2): ``Detected``, ``NeedMore`` for a valid prefix under the
cap, ``Unknown(reason)``; never an exception, and never ``NeedMore`` at or over the cap.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniport.wire.detect import Detected, NeedMore, Unknown, detect

OPENSSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"
CURL = (b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n\r\n")
FIREFOX = (b"GET /search?q=sni+port&lang=en HTTP/1.1\r\nHost: www.example.org\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
           b"Accept: text/html,application/xhtml+xml\r\n\r\n")
# A TLS 1.3 ClientHello as browsers send it: record version 0x0301, handshake type 1.
HELLO = bytes.fromhex("160301020001000200fc0303") + bytes(32)
# What a Go client sends right after its identification line: the KEXINIT packet's start.
KEXINIT = bytes.fromhex("000005dc0a14")

SSH_LINES = [
    OPENSSH,
    b"SSH-2.0-PuTTY_Release_0.81",
    b"SSH-2.0-Go",
    b"SSH-2.0-dropbear_2022.83",
    b"SSH-2.0-libssh_0.10.6",
    b"SSH-2.0-paramiko_3.4.0",
    b"SSH-2.0-OpenSSH_for_Windows_9.5",
    b"SSH-1.99-OpenSSH_3.9p1",  # RFC 4253 section 5.1: a 2.0 client that also speaks 1.x
]
REQUEST_LINES = [
    b"GET / HTTP/1.1",
    b"GET /search?q=sni+port&lang=en HTTP/1.1",
    b"HEAD /favicon.ico HTTP/1.0",
    b"POST /api/v1/items HTTP/1.1",
    b"PUT /upload/a%20b.txt HTTP/1.1",
    b"DELETE /items/7 HTTP/1.1",
    b"CONNECT example.com:443 HTTP/1.1",  # authority-form, RFC 9112 section 3.2.3
    b"OPTIONS * HTTP/1.1",  # asterisk-form, RFC 9112 section 3.2.4
    b"TRACE / HTTP/1.1",
    b"PATCH /items/7 HTTP/1.1",
    b"GET http://example.com/ HTTP/1.1",  # absolute-form, RFC 9112 section 3.2.2
    b"PROPFIND /dav/ HTTP/1.1",  # an extension method: any token (RFC 9110 section 9.1)
]


@pytest.mark.parametrize("line", SSH_LINES)
@pytest.mark.parametrize("end", [b"\r\n", b"\n"])  # a lone LF, as OpenSSH accepts
@pytest.mark.parametrize("after", [b"", KEXINIT])
def test_ssh_banners(line: bytes, end: bytes, after: bytes) -> None:
    assert detect(line + end + after) == Detected("ssh", line, len(line + end))


@pytest.mark.parametrize("line", REQUEST_LINES)
@pytest.mark.parametrize("end", [b"\r\n", b"\n"])  # RFC 9112 section 2.2 allows a lone LF
def test_request_lines(line: bytes, end: bytes) -> None:
    assert detect(line + end + b"Host: example.com\r\n\r\n") == Detected("http", line,
                                                                          len(line + end))


@pytest.mark.parametrize("data", [CURL, FIREFOX])
def test_whole_requests(data: bytes) -> None:
    line = data.split(b"\r\n", 1)[0]
    assert detect(data) == Detected("http", line, len(line) + 2)


@pytest.mark.parametrize("data", [
    HELLO,
    b"\x16\x03\x00",  # SSL 3.0 record version
    b"\x16\x03\x01",
    b"\x16\x03\x03\x00\x05",
    b"\x16\x03\x04",
])
def test_tls_record_starts(data: bytes) -> None:
    assert detect(data) == Detected("tls", b"", 3)


@pytest.mark.parametrize(("data", "at_least"), [
    (b"", 1),
    (b"\x16", 3),
    (b"\x16\x03", 3),
    (b"S", 2),  # "SSH-" or a method token
    (b"SS", 3),
    (b"SSH", 4),
    (b"SSH-", 5),
    (b"SSH-1", 6),
    (b"SSH-2.0", 8),
    (b"SSH-2.0-Open", 13),
    (OPENSSH, len(OPENSSH) + 1),
    (OPENSSH + b"\r", len(OPENSSH) + 2),
    (b"G", 2),
    (b"GE", 3),
    (b"GET", 4),
    (b"GET ", 5),
    (b"GET /", 6),
    (b"GET / HTT", 10),
    (b"GET / HTTP/1.", 14),
    (b"GET / HTTP/1.1", 15),
    (b"GET / HTTP/1.1\r", 16),
    (b"PROPFIND", 9),
])
def test_prefixes_need_more(data: bytes, at_least: int) -> None:
    assert detect(data) == NeedMore(at_least)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x01\x02", "bytes that start no known protocol"),
    (b"\x80\x2e\x01\x03\x01", "bytes that start no known protocol"),  # SSLv2 ClientHello
    (b"\x16\x02", "bytes that start no known protocol"),
    (b"\x16\x03\x05", "bytes that start no known protocol"),
    (b"\r\n", "bytes that start no known protocol"),
    (b" GET / HTTP/1.1\r\n", "bytes that start no known protocol"),
    (b"SSH-1.5-OpenSSH_1.2.3\r\n", "does not begin SSH-2.0- or SSH-1.99-"),  # SSH-1
    (b"SSH-2.1", "does not begin SSH-2.0- or SSH-1.99-"),
    (b"SSH-2.0\r\n", "does not begin SSH-2.0- or SSH-1.99-"),
    (b"SSH-2.0-\r\n", "without a software version"),
    (b"SSH-2.0- comment\r\n", "without a software version"),
    (b"SSH-2.0-Open\tSSH", "software version holds a byte"),
    (b"SSH-2.0-Go\r\r\n", "software version holds a byte"),
    (b"SSH-2.0-a\rb\n", "software version holds a byte"),
    (b"SSH-2.0-Go comment\x00\r\n", "comments hold a byte"),
    (b"SSH-2.0-" + b"a" * 300, "SSH banner longer than 255 bytes"),
    (b"SSH-2.0-Go " + b"c" * 244 + b"\r\n", "SSH banner longer than 255 bytes"),  # 257 bytes
    (b"GET /" + b"a" * 600, "request line longer than 512 bytes"),
    (b"A" * 512, "request line longer than 512 bytes"),
    (b"GET /\r\n", "no request-target followed by a space"),  # HTTP/0.9
    (b"GET  / HTTP/1.1\r\n", "no request-target followed by a space"),
    (b"GET /a\x00b HTTP/1.1\r\n", "no request-target followed by a space"),
    (b"GET / HTTP/2.0\r\n", "the version is not HTTP/1.x"),
    (b"GET / HTTP/1.x\r\n", "the version is not HTTP/1.x"),
    (b"GET / http/1.1\r\n", "the version is not HTTP/1.x"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 with prior knowledge"),
    (b"GET / HTTP/1.1 \r\n", "no line end after the version"),
    (b"GET / HTTP/1.1\rX", "no line end after the version"),
    (b"GET / HTTP/1.10\r\n", "no line end after the version"),
    (b"hello\r\n", "the first word is not followed by a space"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 443\r\n", "the version is not HTTP/1.x"),
])
def test_unknown(data: bytes, reason: str) -> None:
    result = detect(data)
    assert isinstance(result, Unknown), result
    assert reason in result.reason


def test_ssh_line_of_exactly_255_bytes() -> None:
    line = b"SSH-2.0-Go " + b"c" * (255 - 2 - 11)
    assert detect(line + b"\r\n") == Detected("ssh", line, 255)
    assert detect(line + b"c\n") == Detected("ssh", line + b"c", 255)


def test_smaller_caps() -> None:
    assert detect(b"GET / HTTP/1.1", max_bytes=14) == Unknown("request line longer than 14 bytes")
    assert detect(b"GET / HTTP/1.1\r\n", max_bytes=16) == Detected("http", b"GET / HTTP/1.1", 16)
    assert detect(b"GET / HTTP/1.1\r\n", max_bytes=15) == Unknown(
        "request line longer than 15 bytes")
    assert detect(b"SSH-2.0-Go", max_bytes=10) == Unknown("SSH banner longer than 10 bytes")
    assert detect(b"\x16\x03", max_bytes=2) == Unknown("no protocol decided within 2 bytes")
    assert detect(b"GET", max_bytes=8) == NeedMore(4)
    with pytest.raises(ValueError):
        detect(b"", max_bytes=0)


# --- properties ------------------------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SOFTWARE = bytes(b for b in range(0x21, 0x7F) if b != 0x2D)
END = st.sampled_from([b"\r\n", b"\n"])
TAIL = st.binary(max_size=40)


def chars(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


ssh_inputs = st.builds(
    lambda version, software, comments, end, tail: (
        b"SSH-" + version + b"-" + software + comments + end + tail),
    st.sampled_from([b"2.0", b"1.99"]),
    chars(SOFTWARE, 1, 60),
    st.one_of(st.just(b""), chars(bytes(range(0x20, 0x7F)), 0, 60).map(lambda c: b" " + c)),
    END, TAIL)
http_inputs = st.builds(
    lambda method, target, digit, end, tail: (
        method + b" " + target + b" HTTP/1." + digit + end + tail),
    st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                               b"OPTIONS", b"TRACE", b"PATCH"]), chars(TCHAR, 1, 12)),
    chars(bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)), 1, 80),
    st.sampled_from([bytes([d]) for d in b"0123456789"]),
    END, TAIL)
tls_inputs = st.builds(lambda minor, tail: bytes([0x16, 0x03, minor]) + tail,
                       st.integers(0, 4), TAIL)
detected_inputs = st.one_of(ssh_inputs, http_inputs, tls_inputs)


@given(detected_inputs)
def test_every_prefix_of_a_detected_input_needs_more_or_agrees(data: bytes) -> None:
    result = detect(data)
    assert isinstance(result, Detected), (data, result)
    assert result.line == data[: result.length].removesuffix(b"\n").removesuffix(b"\r") or (
        result.protocol == "tls")
    for n in range(len(data)):
        prefix = detect(data[:n])
        assert prefix == result or isinstance(prefix, NeedMore), (data[:n], prefix)


@given(st.binary(max_size=600), st.integers(1, 600))
def test_random_bytes_give_three_outcomes_within_the_cap(data: bytes, max_bytes: int) -> None:
    result = detect(data, max_bytes=max_bytes)
    assert isinstance(result, Detected | NeedMore | Unknown)
    if isinstance(result, NeedMore):
        assert len(data) < max_bytes
        assert len(data) < result.at_least <= max_bytes
    if isinstance(result, Detected):
        assert result.length <= min(len(data), max_bytes)


@given(st.one_of(detected_inputs, st.binary(max_size=300),
                 st.sampled_from([b"S", b"SSH-2.0-x", b"GET / "]).flatmap(
                     lambda head: st.binary(max_size=40).map(lambda b: head + b))),
       st.binary(min_size=1, max_size=40))
def test_decisions_are_final(data: bytes, more: bytes) -> None:
    # More bytes never change a decision: the caller may act on the first one it gets.
    result = detect(data)
    if isinstance(result, Detected):
        assert detect(data + more) == result
    elif isinstance(result, Unknown):
        assert isinstance(detect(data + more), Unknown)
