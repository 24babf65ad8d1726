"""Issue 9: the HTTP/2 adapter (``wire/h2.py``) without sockets: a real ``h2`` client's bytes
in, our events out; the request-head rule as a table and as properties; the token bucket.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import Frame
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire import h2 as wire

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
       (b":path", b"/x?y=1")]


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    return c


def pair(limits: wire.Limits | None = None) -> tuple[wire.H2Server, h2.connection.H2Connection]:
    server = wire.H2Server(limits or wire.Limits())
    server.initiate()
    c = client()
    c.receive_data(server.output())
    return server, c


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        frames.append(f)
        data = data[9 + length:]
    return frames


def merged(events: list[wire.Event]) -> list[wire.Event]:
    """Adjacent BodyData of one stream as one (how bytes are cut into reads may split them)."""
    out: list[wire.Event] = []
    for ev in events:
        last = out[-1] if out else None
        if (isinstance(ev, wire.BodyData) and isinstance(last, wire.BodyData)
                and last.stream_id == ev.stream_id):
            out[-1] = wire.BodyData(ev.stream_id, last.data + ev.data, last.flow + ev.flow)
        else:
            out.append(ev)
    return out


def interesting(events: list[wire.Event]) -> list[wire.Event]:
    return [e for e in merged(events) if not isinstance(e, wire.WindowOpened)]


# -- the machine ----------------------------------------------------------------------------


def test_a_request_with_a_body_as_events() -> None:
    server, c = pair()
    c.send_headers(1, [*GET[:3], (b":path", b"/up"), (b"content-length", b"5")])
    c.send_data(1, b"hello", end_stream=True)
    events = interesting(server.feed(c.data_to_send(), 0.0))
    assert len(events) == 3
    head, data, end = events
    assert isinstance(head, wire.RequestHead) and not head.end_stream
    assert isinstance(head.head, wire.Head)
    assert (head.head.method, head.head.target, head.head.content_length) == ("GET", "/up", 5)
    assert head.head.headers[0] == (b"host", b"a.test")
    assert data == wire.BodyData(1, b"hello", 5)
    assert end == wire.BodyEnd(1)


def test_a_response_reaches_the_client() -> None:
    server, c = pair()
    c.send_headers(1, GET, end_stream=True)
    (head,) = interesting(server.feed(c.data_to_send(), 0.0))
    assert isinstance(head, wire.RequestHead) and head.end_stream
    server.send_headers(1, [(b":status", b"200"), (b"content-length", b"2")], False)
    server.send_data(1, b"ok", True)
    events = c.receive_data(server.output())
    kinds = [type(e) for e in events]
    assert h2.events.ResponseReceived in kinds and h2.events.StreamEnded in kinds
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"ok"


def test_data_larger_than_a_frame_is_cut_to_the_peer_frame_size() -> None:
    server, c = pair()
    c.send_headers(1, GET, end_stream=True)
    server.feed(c.data_to_send(), 0.0)
    server.send_headers(1, [(b":status", b"200")], False)
    body = b"z" * 40000
    assert server.window(1) == 65535
    server.send_data(1, body, True)
    events = c.receive_data(server.output())
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == body and all(len(e.data) <= 16384 for e in data)


def test_graceful_goaway_refuses_later_streams() -> None:
    server, c = pair()
    c.send_headers(1, GET, end_stream=True)
    server.feed(c.data_to_send(), 0.0)
    assert server.goaway() == 1
    c.send_headers(3, GET, end_stream=True)
    assert interesting(server.feed(c.data_to_send(), 0.0)) == []
    # (Read as frames: h2's own client cannot take frames after a GOAWAY.)
    frames = parse_frames(server.output())
    assert [(type(f).__name__, f.stream_id) for f in frames][-2:] == [
        ("GoAwayFrame", 0), ("RstStreamFrame", 3)]
    assert frames[-1].error_code == wire.REFUSED_STREAM
    # Stream 1 is still answered after the GOAWAY.
    server.send_headers(1, [(b":status", b"204")], True)
    assert server.output()


def test_max_requests_sends_the_goaway_with_the_last_stream() -> None:
    server, c = pair(wire.Limits(max_requests=2))
    c.send_headers(1, GET, end_stream=True)
    c.send_headers(3, GET, end_stream=True)
    events = interesting(server.feed(c.data_to_send(), 0.0))
    assert [e.stream_id for e in events if isinstance(e, wire.RequestHead)] == [1, 3]
    assert server.goaway_sent and server.last_stream_id == 3


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_events_do_not_depend_on_how_bytes_are_cut(data: st.DataObject) -> None:
    """The same client bytes, cut at any points, give the same events."""
    c = client()
    c.send_headers(1, [*GET, (b"content-length", b"11")])
    c.send_data(1, b"hello world", end_stream=True)
    c.send_headers(3, [*GET[:3], (b":path", b"/two"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
                   end_stream=True)
    wire_bytes = c.data_to_send()
    whole, _ = pair()
    expected = interesting(whole.feed(wire_bytes, 0.0))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(wire_bytes) - 1), max_size=12)))
    server, _ = pair()
    got: list[wire.Event] = []
    last = 0
    for cut in [*cuts, len(wire_bytes)]:
        got += server.feed(wire_bytes[last:cut], 0.0)
        last = cut
    assert interesting(got) == expected
    assert len(expected) == 4


def test_a_protocol_error_is_one_event_and_a_goaway() -> None:
    server, _ = pair()
    (ended,) = server.feed(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", 0.0)
    assert isinstance(ended, wire.ConnectionEnded) and ended.code == wire.PROTOCOL_ERROR
    assert server.ended and server.output()  # the GOAWAY
    assert server.feed(b"more", 0.0) == []


# -- the request head -------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "status", "reason"), [
    ([*GET, (b":protocol", b"websocket")], 400, "bad_pseudo_header"),
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
