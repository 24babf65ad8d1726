"""Issue 9: the pure parts of the HTTP/2 adapter (``wire/h2.py``): the request-head rule (what
an HTTP/2 request becomes before HTTP/1.1 upstreams see it) as a table and as properties, and
the token bucket of the rate limits. The engines themselves, bytes in and events out, are
tested without sockets in test_h2_engines.py, over both."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniport.wire import h2 as wire

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
       (b":path", b"/x?y=1")]


# -- the request head -------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "status", "reason"), [
    ([*GET, (b":protocol", b"websocket")], 400, "bad_pseudo_header"),
    ([(b":method", b"G T"), *GET[1:]], 400, "bad_method"),
    ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], 405, "connect_not_supported"),
    ([*GET, (b"x-a", b"1\r\nx-b: 2")], 400, "bad_field_value"),
    ([*GET, (b"x-a", b"1\x00")], 400, "bad_field_value"),
    ([*GET, (b"X-Upper", b"1")], 400, "bad_field_name"),
    ([*GET, (b"x:y", b"1")], 400, "bad_field_name"),
    ([*GET, (b"transfer-encoding", b"chunked")], 400, "transfer_encoding_in_http2"),
    ([*GET, (b"te", b"gzip")], 400, "te_not_trailers"),
    ([*GET, (b"host", b"b.test")], 400, "authority_host_mismatch"),
    ([*GET, (b"content-length", b"1"), (b"content-length", b"2")], 400, "bad_content_length"),
    ([*GET, (b"content-length", b"-1")], 400, "bad_content_length"),
    ([GET[0], GET[2], GET[3]], 400, "bad_pseudo_header: :path or :scheme"),
    ([*GET[:3], (b":path", b"/a b")], 400, "bad_pseudo_header: :path or :scheme"),
    ([*GET[:2], (b":authority", b"user@a.test"), GET[3]], 400, "bad_authority"),
])
def test_malformed_heads_are_refused(fields: list[tuple[bytes, bytes]], status: int,
                                     reason: str) -> None:
    result = wire.request_head(fields)
    assert isinstance(result, wire.HeadError)
    assert result.status == status and result.reason.startswith(reason)


def test_a_head_in_http11_terms() -> None:
    head = wire.request_head([*GET, (b"te", b"trailers"), (b"cookie", b"a=1"),
                              (b"accept", b"*/*"), (b"cookie", b"b=2"), (b"host", b"a.test")])
    assert isinstance(head, wire.Head)
    assert head.method == "GET" and head.target == "/x?y=1" and head.scheme == "https"
    # Host from :authority, first; te dropped; cookie crumbs joined where the first one was
    # (RFC 9113 section 8.2.3), so the upstream sees what an HTTP/1.1 client would send.
    assert head.headers == [(b"host", b"a.test"), (b"cookie", b"a=1; b=2"),
                            (b"accept", b"*/*")]


def test_host_alone_names_the_target() -> None:
    head = wire.request_head([GET[0], GET[1], GET[3], (b"host", b"h.test")])
    assert isinstance(head, wire.Head) and head.headers == [(b"host", b"h.test")]


_NAME = st.binary(min_size=1, max_size=12)
_VALUE = st.binary(max_size=20)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=6))
def test_what_reaches_http11_never_carries_what_http11_reads_differently(
        extra: list[tuple[bytes, bytes]]) -> None:
    """Property: whatever the fields, an accepted head has token names in lower case, values
    without CR, LF or NUL, no framing or connection fields, and one Host."""
    result = wire.request_head([*GET, *extra])
    if isinstance(result, wire.HeadError):
        return
    names = [n for n, _ in result.headers]
    assert names.count(b"host") == 1
    for name, value in result.headers:
        assert name == name.lower() and b":" not in name and name.isascii()
        assert not any(b in value for b in (b"\r", b"\n", b"\x00"))
        assert name not in (b"transfer-encoding", b"connection", b"te", b"upgrade",
                            b"keep-alive", b"proxy-connection")


# -- the bucket -----------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    b = wire.Bucket(wire.Rate(10, 10.0))  # 10 per 10 s: one per second after the burst
    assert all(b.take(0.0) for _ in range(10))
    assert not b.take(0.0)
    assert not b.take(0.5)
    assert b.take(1.6)
    assert not b.take(1.7)
    assert b.take(100.0, 10) and not b.take(100.0)
