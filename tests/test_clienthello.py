"""The ClientHello parser (sniport/wire/clienthello.py): real hellos, table tests, properties.

Vectors: the captured hellos in tests/data/clienthellos (see the README there: how they were
captured, and why every Chromium one offers ECH), hellos that Python's own ``ssl`` module
writes into a MemoryBIO, and hellos built here field by field (RFC 8446 section 4.1.2;
RFC 6066 section 3; RFC 7301 section 3.1; RFC 9849 section 5).
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sniport.wire.clienthello import (
    MAX_HELLO_BYTES,
    ClientHelloParser,
    Hello,
    MalformedHello,
    NeedMore,
    NotTLS,
    Outcome,
)

DATA = Path(__file__).parent / "data" / "clienthellos"

TLS13, TLS12, TLS11, TLS10 = 0x0304, 0x0303, 0x0302, 0x0301
GREASE_5A5A = 0x5A5A
H2_H1 = ("h2", "http/1.1")
ECH = 0xFE0D  # encrypted_client_hello, RFC 9849 section 5
ALL_FOUR = (TLS13, TLS12, TLS11, TLS10)

# file -> (size, sni, alpn, supported_versions, ech); every capture has legacy_version 0x0303.
# Chromium sends a GREASE encrypted_client_hello on every connection (RFC 9849 section 6.2):
# its captures say ech=True although no ECH config was ever published; the others send none.
REAL: dict[str, tuple[int, str | None, tuple[str, ...], tuple[int, ...], bool]] = {
    "chromium-150-ech-grease.bin": (1792, "example.test", H2_H1, (0xCACA, TLS13, TLS12), True),
    "chromium-150-ech-grease-2.bin": (1728, "example.test", H2_H1, (0xFAFA, TLS13, TLS12),
                                      True),
    "chromium-156.bin": (1920, "example.test", H2_H1, (GREASE_5A5A, TLS13, TLS12), True),
    "curl-7.88.1.bin": (517, "example.test", H2_H1, ALL_FOUR, False),
    "gnutls-3.7.9.bin": (394, "example.test", (), ALL_FOUR, False),
    "node-20-tls.bin": (388, "example.test", H2_H1, (TLS13, TLS12), False),
    "openssl-3.0.19-s_client-nosni.bin": (297, None, (), ALL_FOUR, False),
    "openssl-3.0.19-s_client.bin": (318, "example.test", (), ALL_FOUR, False),
    "python-3.11-ssl.bin": (517, "example.test", H2_H1, (TLS13, TLS12), False),
}


def real_hello(name: str) -> bytes:
    return (DATA / name).read_bytes()


def expected_real(name: str) -> Hello:
    size, sni, alpn, versions, ech = REAL[name]
    return Hello(sni=sni, alpn=alpn, versions=versions, legacy_version=TLS12, size=size,
                 ech=ech)


# ---------------------------------------------------------------------------------------------
# Building hellos byte by byte.


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn_ext(*protocols: bytes) -> bytes:
    lst = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, u16(len(lst)) + lst)


def versions_ext(*versions: int) -> bytes:
    lst = b"".join(u16(v) for v in versions)
    return ext(43, bytes([len(lst)]) + lst)


def ech_outer_ext(config_id: int = 0x2A, enc: bytes = bytes(32), payload: bytes = bytes(144),
                  ext_type: int = ECH) -> bytes:
    """An outer ECHClientHello (RFC 9849 section 5): type outer(0), HPKE suite
    (HKDF-SHA256, AES-128-GCM), config_id, enc<0..2^16-1>, payload<1..2^16-1>. A GREASE one
    (section 6.2) has the same shape with random contents."""
    body = (b"\x00" + u16(0x0001) + u16(0x0001) + bytes([config_id]) + u16(len(enc)) + enc
            + u16(len(payload)) + payload)
    return ext(ext_type, body)


def hello_body(
    extensions: bytes | None = b"",
    *,
    legacy: int = TLS12,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    trailing: bytes = b"",
) -> bytes:
    body = (u16(legacy) + bytes(range(32)) + bytes([len(session_id)]) + session_id
            + u16(len(suites)) + suites + bytes([len(compression)]) + compression)
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body + trailing


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def record(payload: bytes, ctype: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    return bytes([ctype]) + version + u16(len(payload)) + payload


def records(message: bytes, cuts: Iterable[int]) -> bytes:
    """``message`` split at ``cuts`` (offsets into it), one TLS record per piece."""
    edges = [0, *sorted(set(cuts)), len(message)]
    return b"".join(record(message[a:b]) for a, b in pairwise(edges) if b > a)


def hello_bytes(
    extensions: bytes | None = b"",
    *,
    legacy: int = TLS12,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    trailing: bytes = b"",
) -> bytes:
    """A whole hello in one record."""
    return record(handshake(hello_body(extensions, legacy=legacy, session_id=session_id,
                                       suites=suites, compression=compression,
                                       trailing=trailing)))


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def parse(data: bytes) -> Outcome:
    return ClientHelloParser().feed(data)


def outcome_of(chunks: Sequence[bytes]) -> tuple[object, ...]:
    """Feed ``chunks`` in order until an outcome other than NeedMore; a comparable summary."""
    parser = ClientHelloParser()
    result: Outcome = NeedMore(0)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            if not isinstance(result, NeedMore):
                break
    except MalformedHello as exc:
        assert exc.reason == str(exc)
        return ("malformed", exc.reason)
    if isinstance(result, Hello):
        return ("hello", result)
    if isinstance(result, NotTLS):
        return ("not_tls",)
    assert isinstance(result, NeedMore)
    return ("need_more", result.at_least)


def feed_checked(chunks: Sequence[bytes]) -> Hello:
    """Feed the chunks of one complete hello; every step before the last must be NeedMore,
    asking for at least one byte and never for more than is actually still missing."""
    total = sum(map(len, chunks))
    parser = ClientHelloParser()
    fed = 0
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        fed += len(chunk)
        if i < len(chunks) - 1:
            assert isinstance(result, NeedMore), (fed, total, result)
            assert 1 <= result.at_least <= total - fed, (fed, total, result)
    assert isinstance(result, Hello), result
    return result


# ---------------------------------------------------------------------------------------------
# Hellos that Python's ssl module writes (a real OpenSSL client, no network).


def python_hello(
    server_hostname: str | None,
    alpn: Sequence[str] = (),
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# (server_hostname, alpn, min, max) -> (sni, alpn, versions)
PYTHON_CASES: list[tuple[str | None, tuple[str, ...], ssl.TLSVersion | None,
                         ssl.TLSVersion | None, str | None, tuple[int, ...]]] = [
    ("example.com", H2_H1, None, None, "example.com", (TLS13, TLS12)),
    ("example.com", (), None, None, "example.com", (TLS13, TLS12)),
    # The parser reports the name as sent; routing lower-cases it.
    ("Sub.Example.COM", ("http/1.1",), None, None, "Sub.Example.COM", (TLS13, TLS12)),
    # ssl sends internationalised names as A-labels.
    ("Bücher.example", ("h2",), None, None, "xn--bcher-kva.example", (TLS13, TLS12)),
    ("trailing.example.", (), None, None, "trailing.example.", (TLS13, TLS12)),
    ("a-very-long-label-" + "x" * 45 + ".example.org", ("acme-tls/1",), None, None,
     "a-very-long-label-" + "x" * 45 + ".example.org", (TLS13, TLS12)),
    # No SNI for IP literals (RFC 6066 section 3) nor without a name.
    ("192.0.2.7", H2_H1, None, None, None, (TLS13, TLS12)),
    ("2001:db8::1", (), None, None, None, (TLS13, TLS12)),
    (None, H2_H1, None, None, None, (TLS13, TLS12)),
    # TLS 1.2 only: no supported_versions extension at all.
    ("old.example", ("h2",), None, ssl.TLSVersion.TLSv1_2, "old.example", ()),
    ("new.example", (), ssl.TLSVersion.TLSv1_3, None, "new.example", (TLS13,)),
]


@pytest.mark.parametrize(
    ("server_hostname", "alpn", "minimum", "maximum", "sni", "versions"), PYTHON_CASES)
def test_python_ssl_hello(server_hostname: str | None, alpn: tuple[str, ...],
                          minimum: ssl.TLSVersion | None, maximum: ssl.TLSVersion | None,
                          sni: str | None, versions: tuple[int, ...]) -> None:
    data = python_hello(server_hostname, alpn, minimum=minimum, maximum=maximum)
    assert parse(data) == Hello(sni=sni, alpn=alpn, versions=versions,
                                legacy_version=TLS12, size=len(data))


# A pool of valid hellos for the properties, by name: the captures and a few made by ssl.
VALID: dict[str, tuple[bytes, Hello]] = {n: (real_hello(n), expected_real(n)) for n in REAL}
for _case in PYTHON_CASES[:4] + PYTHON_CASES[-2:]:
    _data = python_hello(_case[0], _case[1], minimum=_case[2], maximum=_case[3])
    VALID[f"ssl:{_case[0]}:{','.join(_case[1])}:{_case[5]}"] = (
        _data, Hello(_case[4], _case[1], _case[5], TLS12, len(_data)))

valid_hellos = st.sampled_from(sorted(VALID))


# ---------------------------------------------------------------------------------------------
# The captured hellos.


def test_every_capture_is_listed() -> None:
    assert sorted(p.name for p in DATA.glob("*.bin")) == sorted(REAL)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_hello_in_one_piece(name: str) -> None:
    data = real_hello(name)
    assert len(data) == REAL[name][0]
    assert parse(data) == expected_real(name)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_hello_byte_by_byte(name: str) -> None:
    data = real_hello(name)
    assert feed_checked([data[i : i + 1] for i in range(len(data))]) == expected_real(name)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_hello_as_bytearray_and_memoryview(name: str) -> None:
    data = real_hello(name)
    assert ClientHelloParser().feed(bytearray(data)) == expected_real(name)
    assert ClientHelloParser().feed(memoryview(data)) == expected_real(name)


def test_chromium_over_two_ethernet_segments() -> None:
    data = real_hello("chromium-156.bin")
    parser = ClientHelloParser()
    first = parser.feed(data[:1448])
    # 1920 bytes in one record: the rest of the record is exactly what is missing.
    assert first == NeedMore(1920 - 1448)
    assert parser.feed(data[1448:]) == expected_real("chromium-156.bin")


def test_need_more_for_the_first_bytes() -> None:
    parser = ClientHelloParser()
    assert parser.feed(b"") == NeedMore(9)  # a record header and a handshake header
    assert parser.feed(b"\x16") == NeedMore(8)
    assert parser.feed(b"\x03\x01\x02") == NeedMore(5)
    assert parser.feed(b"\x00") == NeedMore(4)  # record length 512 now known
    assert parser.feed(b"\x01\x00\x01") == NeedMore(1)
    assert parser.feed(b"\xfc") == NeedMore(508)  # handshake length 508 now known


# ---------------------------------------------------------------------------------------------
# Hellos built here: the valid corners.


def test_hello_without_extensions() -> None:
    data = hello_bytes(None)
    assert parse(data) == Hello(None, (), (), TLS12, len(data))


def test_hello_with_empty_extensions_block() -> None:
    data = hello_bytes(b"")
    assert parse(data) == Hello(None, (), (), TLS12, len(data))


def test_all_three_extensions_and_unknown_ones() -> None:
    exts = (ext(0xFAFA, b"") + ext(21, bytes(100)) + versions_ext(TLS13, TLS12)
            + sni_ext(b"Mixed.Case.example") + ext(10, b"\x00\x02\x00\x1d")
            + alpn_ext(b"h2", b"http/1.1", b"\xff\x00x"))
    data = hello_bytes(exts, legacy=TLS10)
    assert parse(data) == Hello("Mixed.Case.example", ("h2", "http/1.1", "\xff\x00x"),
                                (TLS13, TLS12), TLS10, len(data))


# Encrypted ClientHello (RFC 9849): ``ech`` says the extension was offered; a real outer
# hello and a GREASE one look alike, and the SNI reported is the outer (public) name.
# (id, extensions) -> (sni, alpn, ech)
ECH_CASES: list[tuple[str, bytes, str | None, tuple[str, ...], bool]] = [
    ("outer ECH with public name and ALPN",
     sni_ext(b"public.example") + ech_outer_ext() + alpn_ext(b"h2", b"http/1.1"),
     "public.example", H2_H1, True),
    ("ECH first, before the SNI",
     ech_outer_ext(payload=bytes(250)) + sni_ext(b"public.example"),
     "public.example", (), True),
    ("ECH last, after GREASE and padding",
     ext(0xDADA, b"") + sni_ext(b"public.example") + ext(21, bytes(40)) + ech_outer_ext(),
     "public.example", (), True),
    ("ECH without any SNI", ech_outer_ext(), None, (), True),
    # Presence is what counts; the payload is the TLS endpoint's to judge.
    ("empty ECH extension", sni_ext(b"public.example") + ext(ECH, b""),
     "public.example", (), True),
    ("inner-type ECH marker", sni_ext(b"public.example") + ext(ECH, b"\x01"),
     "public.example", (), True),
    # The careful path (the fast one gives up on these SNI forms) reports it too.
    ("careful path: empty server_name", ext(0, b"") + ech_outer_ext() + alpn_ext(b"h2"),
     None, ("h2",), True),
    ("careful path: other name types",
     ext(0, u16(25) + b"\x07" + u16(5) + b"other" + b"\x00" + u16(14) + b"public.example")
     + ech_outer_ext(),
     "public.example", (), True),
    # Not RFC 9849's ECH: the ESNI drafts' encrypted_server_name, the interim ECH draft
    # codepoints and ech_outer_extensions (which only ever appears in the encrypted inner hello).
    ("ESNI 0xffce is not ECH", sni_ext(b"public.example") + ext(0xFFCE, bytes(40)),
     "public.example", (), False),
    ("draft-08 0xfe08 is not ECH",
     sni_ext(b"public.example") + ech_outer_ext(ext_type=0xFE08), "public.example", (), False),
    ("draft-10 0xfe0a is not ECH",
     sni_ext(b"public.example") + ech_outer_ext(ext_type=0xFE0A), "public.example", (), False),
    ("ech_outer_extensions 0xfd00 is not ECH",
     sni_ext(b"public.example") + ext(0xFD00, b"\x02\x00\x0a"), "public.example", (), False),
    ("no ECH", sni_ext(b"public.example") + alpn_ext(b"h2"), "public.example", ("h2",), False),
]


@pytest.mark.parametrize(("exts", "sni", "alpn", "ech"), [c[1:] for c in ECH_CASES],
                         ids=[c[0] for c in ECH_CASES])
def test_ech_offered(exts: bytes, sni: str | None, alpn: tuple[str, ...], ech: bool) -> None:
    data = hello_bytes(exts + versions_ext(TLS13))
    want = Hello(sni, alpn, (TLS13,), TLS12, len(data), ech)
    assert parse(data) == want
    # The same however the bytes arrive.
    assert feed_checked([data[i : i + 1] for i in range(len(data))]) == want


def test_hello_stays_positional_with_ech_last_and_off_by_default() -> None:
    hello = Hello("a.example", ("h2",), (TLS13,), TLS12, 100)
    assert hello.ech is False
    assert Hello("a.example", ("h2",), (TLS13,), TLS12, 100, True).ech is True


def test_chromium_offers_ech_and_routes_on_the_outer_name() -> None:
    for name in ("chromium-150-ech-grease.bin", "chromium-150-ech-grease-2.bin"):
        hello = parse(real_hello(name))
        assert isinstance(hello, Hello)
        assert (hello.ech, hello.sni, hello.alpn) == (True, "example.test", H2_H1)


@pytest.mark.parametrize("name", ["curl-7.88.1.bin", "openssl-3.0.19-s_client.bin",
                                  "openssl-3.0.19-s_client-nosni.bin"])
def test_curl_and_openssl_offer_no_ech(name: str) -> None:
    hello = parse(real_hello(name))
    assert isinstance(hello, Hello) and hello.ech is False


def test_ech_repeated_is_malformed() -> None:
    with pytest.raises(MalformedHello) as info:
        parse(hello_bytes(ech_outer_ext() + sni_ext(b"public.example") + ech_outer_ext()))
    assert info.value.reason == f"extension {ECH} repeated"


def test_empty_server_name_extension_means_no_name() -> None:
    data = hello_bytes(ext(0, b"") + alpn_ext(b"h2"))
    assert parse(data) == Hello(None, ("h2",), (), TLS12, len(data))


def test_server_name_entries_of_other_types_are_skipped() -> None:
    entries = (b"\x07" + u16(5) + b"other" + b"\x00" + u16(9) + b"a.example"
               + b"\x08" + u16(0))
    data = hello_bytes(ext(0, u16(len(entries)) + entries))
    assert parse(data) == Hello("a.example", (), (), TLS12, len(data))


@pytest.mark.parametrize("version", [b"\x03\x00", b"\x03\x01", b"\x03\x03", b"\x03\x04"])
def test_any_tls_record_version_is_accepted(version: bytes) -> None:
    data = record(handshake(hello_body(sni_ext(b"v.example"))), version=version)
    assert parse(data) == Hello("v.example", (), (), TLS12, len(data))


def test_session_id_of_32_and_0_bytes() -> None:
    for sid in (bytes(32), b""):
        data = hello_bytes(sni_ext(b"s.example"), session_id=sid)
        assert parse(data) == Hello("s.example", (), (), TLS12, len(data))


def test_handshake_header_split_over_one_byte_records() -> None:
    msg = handshake(hello_body(sni_ext(b"tiny.example") + alpn_ext(b"h2")))
    data = records(msg, [1, 2, 3, 4, 5])
    assert parse(data) == Hello("tiny.example", ("h2",), (), TLS12, len(data))
    # Record by record, byte by byte: NeedMore bounds hold across record headers too.
    assert feed_checked([data[i : i + 1] for i in range(len(data))]) == parse(data)


def test_need_more_counts_the_next_record_header() -> None:
    msg = handshake(hello_body(sni_ext(b"r.example")))
    data = records(msg, [10])
    parser = ClientHelloParser()
    # The whole first record: the rest of the message plus one more record header.
    assert parser.feed(data[:15]) == NeedMore(5 + len(msg) - 10)
    assert parser.feed(data[15:]) == Hello("r.example", (), (), TLS12, len(data))


# The cap: the records carrying the hello may total MAX_HELLO_BYTES (16 KiB), not more.


def padded_hello(record_bytes: int) -> bytes:
    """A hello in one record of exactly ``record_bytes`` bytes (a padding extension, RFC 7685)."""
    base = len(hello_bytes(sni_ext(b"big.example") + ext(21, b"")))
    data = hello_bytes(sni_ext(b"big.example") + ext(21, bytes(record_bytes - base)))
    assert len(data) == record_bytes
    return data


def test_hello_of_exactly_the_cap_is_accepted() -> None:
    data = padded_hello(MAX_HELLO_BYTES)
    assert parse(data) == Hello("big.example", (), (), TLS12, MAX_HELLO_BYTES)


def test_hello_one_byte_over_the_cap_is_refused() -> None:
    data = padded_hello(MAX_HELLO_BYTES + 1)
    with pytest.raises(MalformedHello) as info:
        parse(data[:9])  # the handshake header already tells
    assert info.value.reason == "ClientHello larger than 16384 bytes"


@pytest.mark.parametrize(("padding", "piece"), [(16200, 800), (16200, 160), (3000, 1)],
                         ids=["21-records", "102-records", "one-byte-records"])
def test_hello_over_the_cap_in_many_records_is_refused(padding: int, piece: int) -> None:
    # The message alone fits in 16 KiB with one record header, but split into many records
    # the bytes that carry it exceed the cap (and a peek of MAX_HELLO_BYTES + 1 bytes, as the
    # listener does, never sees its end).
    msg = handshake(hello_body(sni_ext(b"big.example") + ext(21, bytes(padding))))
    assert len(msg) + 5 <= MAX_HELLO_BYTES
    data = records(msg, range(piece, len(msg), piece))
    assert len(data) > MAX_HELLO_BYTES
    with pytest.raises(MalformedHello) as info:
        parse(data)
    assert info.value.reason == "ClientHello larger than 16384 bytes"


# ---------------------------------------------------------------------------------------------
# Malformed: each case with its reason.

GOOD_BODY = hello_body(sni_ext(b"ok.example"))
GOOD_MSG = handshake(GOOD_BODY)

MALFORMED: list[tuple[str, bytes, str]] = [
    ("record type change mid-hello",
     record(GOOD_MSG[:10]) + record(GOOD_MSG[10:], ctype=0x17),
     "record type 23 before the ClientHello was complete"),
    ("alert record mid-hello",
     record(GOOD_MSG[:10]) + record(b"\x02\x28", ctype=0x15),
     "record type 21 before the ClientHello was complete"),
    ("change cipher spec mid-hello",
     record(GOOD_MSG[:3]) + record(b"\x01", ctype=0x14),
     "record type 20 before the ClientHello was complete"),
    ("zero-length first record", b"\x16\x03\x01\x00\x00", "empty handshake record"),
    ("zero-length record mid-hello", record(GOOD_MSG[:10]) + b"\x16\x03\x01\x00\x00",
     "empty handshake record"),
    ("record longer than 2^14", b"\x16\x03\x01\x40\x01", "record of 16385 bytes exceeds 2^14"),
    ("record of 0xffff bytes", b"\x16\x03\x03\xff\xff", "record of 65535 bytes exceeds 2^14"),
    ("record of 2^14 bytes is more than the cap with its header", b"\x16\x03\x01\x40\x00",
     "ClientHello larger than 16384 bytes"),
    ("record version 2.0", b"\x16\x02\x00\x00\x10", "record version 2.0 is not TLS"),
    ("record version 71.69", b"\x16GET / HTTP/1.1\r\n", "record version 71.69 is not TLS"),
    ("handshake type server_hello", record(handshake(GOOD_BODY, msg_type=2)),
     "first handshake message has type 2, not ClientHello"),
    ("handshake type 0", record(b"\x00\x00\x00\x00"),
     "first handshake message has type 0, not ClientHello"),
    ("handshake length over the cap", record(b"\x01\x00\x3f\xf8" + GOOD_BODY),
     "ClientHello larger than 16384 bytes"),
    ("handshake length 2^24-1", record(b"\x01\xff\xff\xff" + GOOD_BODY),
     "ClientHello larger than 16384 bytes"),
    ("duplicate ALPN extension", hello_bytes(alpn_ext(b"h2") + alpn_ext(b"http/1.1")),
     "extension 16 repeated"),
    ("duplicate server_name extension",
     hello_bytes(sni_ext(b"a.example") + versions_ext(TLS13) + sni_ext(b"a.example")),
     "extension 0 repeated"),
    ("duplicate unknown extension", hello_bytes(ext(21, b"") + ext(21, b"")),
     "extension 21 repeated"),
    ("two host_names", hello_bytes(sni_ext(b"a.example", b"b.example")),
     "more than one host_name in server_name"),
    ("empty host_name", hello_bytes(sni_ext(b"")), "empty host_name"),
    ("non-ASCII host_name", hello_bytes(sni_ext("bücher.example".encode())),
     "host_name is not printable ASCII"),
    ("NUL in host_name", hello_bytes(sni_ext(b"a\x00.example")),
     "host_name is not printable ASCII"),
    ("space in host_name", hello_bytes(sni_ext(b"a b.example")),
     "host_name is not printable ASCII"),
    ("DEL in host_name", hello_bytes(sni_ext(b"a\x7f.example")),
     "host_name is not printable ASCII"),
    ("server_name list longer than extension", hello_bytes(ext(0, u16(100) + b"\x00\x00\x01a")),
     "server_name_list overruns server_name"),
    ("server_name extension longer than list", hello_bytes(ext(0, u16(4) + b"\x00\x00\x01ax")),
     "server_name list length mismatch"),
    ("server_name list empty", hello_bytes(ext(0, u16(0))), "server_name list length mismatch"),
    ("server name overruns list", hello_bytes(ext(0, u16(4) + b"\x00\x00\x09a")),
     "server name overruns server_name_list"),
    ("ALPN list longer than extension", hello_bytes(ext(16, u16(10) + b"\x02h2")),
     "ALPN list overruns ALPN"),
    ("ALPN extension longer than list", hello_bytes(ext(16, u16(3) + b"\x02h2x")),
     "ALPN list length mismatch"),
    ("ALPN list empty", hello_bytes(ext(16, u16(0))), "ALPN list length mismatch"),
    ("ALPN extension empty", hello_bytes(ext(16, b"")), "ALPN truncated"),
    ("ALPN protocol overruns list", hello_bytes(ext(16, u16(3) + b"\x05h2")),
     "ALPN protocol overruns ALPN list"),
    ("empty ALPN protocol", hello_bytes(ext(16, u16(4) + b"\x00\x02h2")),
     "empty ALPN protocol name"),
    ("supported_versions odd length", hello_bytes(ext(43, b"\x03\x03\x04\x03")),
     "supported_versions length mismatch"),
    ("supported_versions empty list", hello_bytes(ext(43, b"\x00")),
     "supported_versions length mismatch"),
    ("supported_versions trailing byte", hello_bytes(ext(43, b"\x02\x03\x04\x00")),
     "supported_versions length mismatch"),
    ("supported_versions list overruns", hello_bytes(ext(43, b"\x04\x03\x04")),
     "supported_versions list overruns supported_versions"),
    ("supported_versions extension empty", hello_bytes(ext(43, b"")),
     "supported_versions truncated"),
    ("session_id of 33 bytes", hello_bytes(b"", session_id=bytes(33)),
     "session_id longer than 32 bytes"),
    ("odd cipher_suites length", hello_bytes(b"", suites=b"\x13\x01\x13"),
     "cipher_suites length is not a positive even number"),
    ("no cipher_suites", hello_bytes(b"", suites=b""),
     "cipher_suites length is not a positive even number"),
    ("no compression methods", hello_bytes(b"", compression=b""), "no compression methods"),
    ("bytes after the extensions", hello_bytes(b"", trailing=b"\x00"),
     "bytes after the extensions"),
    ("extension overruns the block", hello_bytes(u16(16) + u16(50) + b"\x00"),
     "extension 16 overruns extensions"),
    ("extension header cut", hello_bytes(b"\x00\x10\x00"), "extensions truncated"),
    ("extensions length overruns the hello", record(handshake(hello_body(None) + u16(5))),
     "extensions overruns ClientHello"),
    ("body shorter than the random", record(handshake(b"\x03\x03" + bytes(10))),
     "ClientHello truncated"),
    ("body of one byte", record(handshake(b"\x03")), "ClientHello truncated"),
    ("session_id overruns", record(handshake(b"\x03\x03" + bytes(32) + b"\x20")),
     "session_id overruns ClientHello"),
]


@pytest.mark.parametrize(("data", "reason"), [(d, r) for _, d, r in MALFORMED],
                         ids=[i for i, _, _ in MALFORMED])
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedHello) as info:
        parse(data)
    assert info.value.reason == reason
    assert str(info.value) == reason
    # The same verdict however the bytes arrive.
    assert outcome_of([data[i : i + 1] for i in range(len(data))]) == ("malformed", reason)


NOT_TLS_INPUTS = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"G",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x80\x2e\x01\x03\x01\x00\x15",  # an SSLv2-format hello
    b"\x17\x03\x03\x00\x05hello",  # application data
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
    b"\x00",
    b"\xff" * 100,
]


@pytest.mark.parametrize("data", NOT_TLS_INPUTS, ids=[
    "http1", "one-byte", "h2-preface", "proxy-v1", "ssh", "sslv2-hello", "application-data",
    "alert", "nul", "ff-x100"])
def test_not_tls(data: bytes) -> None:
    assert isinstance(parse(data), NotTLS)
    assert outcome_of([data[:1], data[1:]]) == ("not_tls",)


# ---------------------------------------------------------------------------------------------
# Properties.

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(valid_hellos, st.data())
def test_any_segmentation_gives_the_same_hello(name: str,
                                               data: st.DataObject) -> None:
    raw, expected = VALID[name]
    cuts = data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=40), label="cuts")
    assert feed_checked(split(raw, cuts)) == expected


@PROPERTY
@given(valid_hellos, st.data())
def test_any_record_split_gives_the_same_hello(name: str,
                                               data: st.DataObject) -> None:
    raw, expected = VALID[name]
    # Every vector is one record; take its handshake message out and re-split it.
    assert raw[0] == 0x16 and int.from_bytes(raw[3:5], "big") == len(raw) - 5
    msg = raw[5:]
    record_cuts = data.draw(st.lists(st.integers(1, len(msg) - 1), max_size=30), label="records")
    resplit = records(msg, record_cuts)
    assert len(resplit) == len(msg) + 5 * (len(set(record_cuts)) + 1)
    want = Hello(expected.sni, expected.alpn, expected.versions, expected.legacy_version,
                 len(resplit), expected.ech)
    assert parse(resplit) == want
    segment_cuts = data.draw(st.lists(st.integers(1, len(resplit) - 1), max_size=30),
                             label="segments")
    assert feed_checked(split(resplit, segment_cuts)) == want


@PROPERTY
@given(valid_hellos, st.data())
def test_any_truncation_needs_more(name: str, data: st.DataObject) -> None:
    raw, _ = VALID[name]
    n = data.draw(st.integers(0, len(raw) - 1), label="length")
    result = parse(raw[:n])
    assert isinstance(result, NeedMore)
    assert 1 <= result.at_least <= len(raw) - n


@PROPERTY
@given(valid_hellos, st.data())
def test_bytes_after_the_hello_are_ignored(name: str,
                                           data: st.DataObject) -> None:
    raw, expected = VALID[name]
    ccs = b"\x14\x03\x03\x00\x01\x01"  # RFC 8446 D.4 middlebox compatibility
    early = data.draw(st.binary(min_size=1, max_size=300), label="early data")
    garbage = data.draw(st.binary(max_size=50), label="anything")
    stream = raw + ccs + record(early, ctype=0x17, version=b"\x03\x03") + garbage
    assert parse(stream) == expected
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=10), label="cuts")
    assert outcome_of(split(stream, cuts)) == ("hello", expected)


# Hellos built from generated fields parse back to those fields.

host_names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                     min_size=1, max_size=253)
alpn_lists = st.lists(st.binary(min_size=1, max_size=255), max_size=8)
version_lists = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20)


@PROPERTY
@given(st.one_of(st.none(), host_names), alpn_lists, st.one_of(st.none(), version_lists),
       st.integers(0, 0xFFFF), st.binary(max_size=32), st.data())
def test_generated_hello_round_trips(sni: str | None, alpn: list[bytes],
                                     versions: list[int] | None, legacy: int,
                                     session_id: bytes, data: st.DataObject) -> None:
    parts = [ext(t, b"") for t in data.draw(
        st.lists(st.integers(1, 0xFFFF).filter(lambda t: t not in (16, 43)),
                 unique=True, max_size=4), label="other extensions")]
    if sni is not None:
        parts.append(sni_ext(sni.encode()))
    if alpn:
        parts.append(alpn_ext(*alpn))
    if versions is not None:
        parts.append(versions_ext(*versions))
    # The drawn "other" types may include encrypted_client_hello itself, or it is added.
    ech = data.draw(st.booleans(), label="ech") or any(p[:2] == u16(ECH) for p in parts)
    if ech and not any(p[:2] == u16(ECH) for p in parts):
        parts.append(ech_outer_ext())
    order = data.draw(st.permutations(parts), label="order")
    msg = handshake(hello_body(b"".join(order), legacy=legacy, session_id=session_id))
    cuts = data.draw(st.lists(st.integers(1, len(msg) - 1), max_size=5), label="records")
    raw = records(msg, cuts)
    assert parse(raw) == Hello(sni, tuple(p.decode("latin-1") for p in alpn),
                               tuple(versions or ()), legacy, len(raw), ech)


def mutate(raw: bytes, data: st.DataObject) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        kind = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]), label="kind")
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)), label="pos")
        if kind == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        elif kind == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 4), label="n")]
        else:
            del buf[pos:]
    return bytes(buf)


def assert_typed_outcome(stream: bytes, data: st.DataObject) -> None:
    """Only the typed outcomes, and the same one however the bytes are segmented."""
    whole = outcome_of([stream])
    assert whole[0] in {"hello", "need_more", "not_tls", "malformed"}
    if whole[0] == "need_more":
        assert isinstance(whole[1], int) and whole[1] >= 1
    if whole[0] == "hello":
        hello = whole[1]
        assert isinstance(hello, Hello)
        assert hello.size <= min(len(stream), MAX_HELLO_BYTES)
    if stream:
        cuts = data.draw(st.lists(st.integers(1, max(len(stream) - 1, 1)), max_size=10),
                         label="cuts")
        assert outcome_of(split(stream, cuts)) == whole


@PROPERTY
@given(valid_hellos, st.data())
def test_mutated_hello_gives_a_typed_outcome(name: str,
                                             data: st.DataObject) -> None:
    assert_typed_outcome(mutate(VALID[name][0], data), data)


@PROPERTY
@given(st.sampled_from([b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x00"]),
       st.binary(max_size=600), st.data())
def test_random_bytes_give_a_typed_outcome(prefix: bytes, tail: bytes,
                                           data: st.DataObject) -> None:
    assert_typed_outcome(prefix + tail, data)


@PROPERTY
@given(st.binary(max_size=400), st.data())
def test_random_hello_body_gives_a_typed_outcome(body: bytes, data: st.DataObject) -> None:
    # A well-framed message with a random body reaches the body parser every time.
    stream = record(handshake(b"\x03\x03" + bytes(32) + body))
    assert_typed_outcome(stream, data)
