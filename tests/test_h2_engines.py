"""Both HTTP/2 engines behind the one adapter interface, without sockets: ``wire.h2.H2Server``
(python-hyper ``h2``) and ``wire.h2_nghttp2.NgH2Server`` (libnghttp2 through ctypes). The
machine tests of ``test_h2_wire.py``, parametrized over the engines, and more: the limits
of ``Limits`` frame by frame, bad input, flow control, and the same responses for the same
client bytes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sniport.wire import h2 as wire
from sniport.wire.h2_nghttp2 import AVAILABLE, NgH2Server

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
       (b":path", b"/x?y=1")]


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    return c


Server = wire.H2Server | NgH2Server
ENGINES: dict[str, Callable[[wire.Limits], Server]] = {"h2": wire.H2Server,
                                                       "nghttp2": NgH2Server}


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "nghttp2" and not AVAILABLE:
        pytest.skip("libnghttp2 is not installed")
    return str(request.param)


def pair(engine: str, limits: wire.Limits | None = None
         ) -> tuple[Server, h2.connection.H2Connection]:
    server: Server = ENGINES[engine](limits or wire.Limits())
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


def test_a_request_with_a_body_as_events(engine: str) -> None:
    server, c = pair(engine)
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


def test_a_response_reaches_the_client(engine: str) -> None:
    server, c = pair(engine)
    c.send_headers(1, GET, end_stream=True)
    (head,) = interesting(server.feed(c.data_to_send(), 0.0))
    assert isinstance(head, wire.RequestHead) and head.end_stream
    server.send_headers(1, [(b":status", b"200"), (b"content-length", b"2")], False)
    server.send_data(1, b"ok", True)
    events = c.receive_data(server.output())
    kinds = [type(e) for e in events]
    assert h2.events.ResponseReceived in kinds and h2.events.StreamEnded in kinds
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"ok"


def test_data_larger_than_a_frame_is_cut_to_the_peer_frame_size(engine: str) -> None:
    server, c = pair(engine)
    c.send_headers(1, GET, end_stream=True)
    server.feed(c.data_to_send(), 0.0)
    server.send_headers(1, [(b":status", b"200")], False)
    body = b"z" * 40000
    assert server.window(1) == 65535
    server.send_data(1, body, True)
    events = c.receive_data(server.output())
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == body and all(len(e.data) <= 16384 for e in data)


def test_graceful_goaway_refuses_later_streams(engine: str) -> None:
    server, c = pair(engine)
    c.send_headers(1, GET, end_stream=True)
    server.feed(c.data_to_send(), 0.0)
    assert server.goaway() == 1
    c.send_headers(3, GET, end_stream=True)
    assert interesting(server.feed(c.data_to_send(), 0.0)) == []
    # (Read as frames: h2's own client cannot take frames after a GOAWAY.)
    frames = parse_frames(server.output())
    assert [(type(f).__name__, f.stream_id) for f in frames][-2:] == [
        ("GoAwayFrame", 0), ("RstStreamFrame", 3)]
    assert isinstance(frames[-1], RstStreamFrame)
    assert frames[-1].error_code == wire.REFUSED_STREAM
    # Stream 1 is still answered after the GOAWAY.
    server.send_headers(1, [(b":status", b"204")], True)
    assert server.output()


def test_max_requests_sends_the_goaway_with_the_last_stream(engine: str) -> None:
    server, c = pair(engine, wire.Limits(max_requests=2))
    c.send_headers(1, GET, end_stream=True)
    c.send_headers(3, GET, end_stream=True)
    events = interesting(server.feed(c.data_to_send(), 0.0))
    assert [e.stream_id for e in events if isinstance(e, wire.RequestHead)] == [1, 3]
    assert server.goaway_sent and server.last_stream_id == 3


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_events_do_not_depend_on_how_bytes_are_cut(data: st.DataObject, engine: str) -> None:
    """The same client bytes, cut at any points, give the same events."""
    c = client()
    c.send_headers(1, [*GET, (b"content-length", b"11")])
    c.send_data(1, b"hello world", end_stream=True)
    c.send_headers(3, [*GET[:3], (b":path", b"/two"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
                   end_stream=True)
    wire_bytes = c.data_to_send()
    whole, _ = pair(engine)
    expected = interesting(whole.feed(wire_bytes, 0.0))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(wire_bytes) - 1), max_size=12)))
    server, _ = pair(engine)
    got: list[wire.Event] = []
    last = 0
    for cut in [*cuts, len(wire_bytes)]:
        got += server.feed(wire_bytes[last:cut], 0.0)
        last = cut
    assert interesting(got) == expected
    assert len(expected) == 4


def test_a_protocol_error_is_one_event_and_a_goaway(engine: str) -> None:
    server, _ = pair(engine)
    (ended,) = server.feed(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", 0.0)
    assert isinstance(ended, wire.ConnectionEnded) and ended.code == wire.PROTOCOL_ERROR
    assert server.ended and server.output()  # the GOAWAY
    assert server.feed(b"more", 0.0) == []




# -- beyond test_h2_wire: limits and bad input, frame by frame --------------------------------

LIMITS = wire.Limits(max_streams=10, resets=wire.Rate(100, 10.0), pings=wire.Rate(10, 10.0),
                     settings=wire.Rate(10, 10.0))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Raw:
    """Frames written by hand (hyperframe, hpack), as a client that breaks the rules would."""

    def __init__(self, engine: str, limits: wire.Limits = LIMITS) -> None:
        self.server: Server = ENGINES[engine](limits)
        self.server.initiate()
        self.server.output()
        self.encoder = hpack.Encoder()
        self.preface = PREFACE + SettingsFrame(0).serialize()

    def block(self, path: str = "/", extra: list[tuple[bytes, bytes]] | None = None,
              fields: list[tuple[bytes, bytes]] | None = None) -> bytes:
        if fields is None:
            fields = [*GET[:3], (b":path", path.encode()), *(extra or [])]
        return bytes(self.encoder.encode(fields))

    def feed(self, *frames: Frame, raw: bytes = b"", now: float = 0.0) -> list[wire.Event]:
        data = self.preface + raw + b"".join(f.serialize() for f in frames)
        self.preface = b""
        return self.server.feed(data, now)

    def ended(self, events: list[wire.Event]) -> wire.ConnectionEnded:
        assert events and isinstance(events[-1], wire.ConnectionEnded), events
        assert self.server.ended
        goaways = [f for f in parse_frames(self.server.output()) if isinstance(f, GoAwayFrame)]
        assert goaways and goaways[-1].error_code == events[-1].code
        return events[-1]


def sent(server: Server) -> list[tuple[str, int]]:
    """The frames written, less SETTINGS (the ACKs of the client's)."""
    return [(type(f).__name__, f.stream_id) for f in parse_frames(server.output())
            if not isinstance(f, SettingsFrame)]


def headers(sid: int, block: bytes, end_stream: bool = True,
            end_headers: bool = True) -> HeadersFrame:
    f = HeadersFrame(sid, data=block)
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f


def test_settings_announce_the_limits(engine: str) -> None:
    server: Server = ENGINES[engine](wire.Limits())
    server.initiate()
    first = parse_frames(server.output())[0]
    assert isinstance(first, SettingsFrame)
    assert first.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
    assert first.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 24 * 1024
    assert first.settings[SettingsFrame.ENABLE_PUSH] == 0
    assert first.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 256 * 1024


def test_more_concurrent_streams_than_announced(engine: str) -> None:
    """RFC 9113 section 5.1.2. Once our SETTINGS are acknowledged: a connection error."""
    c = Raw(engine)
    c.feed(SettingsFrame(0, flags=["ACK"]))
    events = c.feed(*(headers(2 * i + 1, c.block(), end_stream=False) for i in range(11)))
    ended = c.ended(events)
    assert ended.code == wire.PROTOCOL_ERROR
    assert ("TooManyStreamsError" if engine == "h2" else "max concurrent streams exceeded"
            ) in ended.reason


def test_more_concurrent_streams_before_the_settings_ack(engine: str) -> None:
    """Before the client can know the limit, h2 ends the connection; nghttp2 refuses the
    stream (REFUSED_STREAM, section 5.1.2 allows either), and the others go on."""
    c = Raw(engine)
    events = c.feed(*(headers(2 * i + 1, c.block(), end_stream=False) for i in range(11)))
    if engine == "h2":
        assert c.ended(events).code == wire.PROTOCOL_ERROR
        return
    assert len([e for e in events if isinstance(e, wire.RequestHead)]) == 10
    assert not c.server.ended
    rst = [f for f in parse_frames(c.server.output()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(21, wire.REFUSED_STREAM)]


def test_header_list_over_the_bound(engine: str) -> None:
    c = Raw(engine)
    block = c.block(extra=[(b"x-big", b"a" * (30 * 1024))])
    rest = ContinuationFrame(1, data=block[16000:])
    rest.flags.add("END_HEADERS")
    ended = c.ended(c.feed(headers(1, block[:16000], end_headers=False), rest))
    assert ended.code == wire.ENHANCE_YOUR_CALM and "versized header" in ended.reason


def test_eight_continuation_frames_are_fine_nine_are_not(engine: str) -> None:
    c = Raw(engine)
    block = c.block()
    frames: list[Frame] = [headers(1, block[:1], end_headers=False)]
    frames += [ContinuationFrame(1, data=block[1 + i:2 + i]) for i in range(7)]
    last = ContinuationFrame(1, data=block[8:])
    last.flags.add("END_HEADERS")
    events = c.feed(*frames[:4])
    assert c.server.header_block_open and not events
    (_head,) = [e for e in c.feed(*frames[4:], last) if isinstance(e, wire.RequestHead)]
    assert not c.server.header_block_open
    c = Raw(engine)
    frames = [headers(1, c.block(), end_headers=False)]
    frames += [ContinuationFrame(1, data=b"") for _ in range(9)]
    ended = c.ended(c.feed(*frames))
    assert ended.code == wire.ENHANCE_YOUR_CALM and "more than 8 CONTINUATION" in ended.reason


def test_rapid_reset_many_new_streams_in_one_read(engine: str) -> None:
    c = Raw(engine)
    frames: list[Frame] = []
    for i in range(21):
        frames += [headers(2 * i + 1, c.block(), end_stream=False),
                   RstStreamFrame(2 * i + 1, error_code=wire.CANCEL)]
    ended = c.ended(c.feed(*frames))
    assert ended.code == wire.ENHANCE_YOUR_CALM
    assert ended.reason == "too many new streams in one read"


def test_resets_over_the_rate(engine: str) -> None:
    c = Raw(engine)
    sid, events = 1, []
    for _ in range(30):
        frames: list[Frame] = []
        for _ in range(5):
            frames += [headers(sid, c.block(), end_stream=False),
                       RstStreamFrame(sid, error_code=wire.CANCEL)]
            sid += 2
        events = c.feed(*frames, now=0.01 * sid)
        assert any(isinstance(e, wire.StreamReset) for e in events)
        if c.server.ended:
            break
    ended = c.ended(events)
    assert ended.code == wire.ENHANCE_YOUR_CALM and ended.reason == "too many stream resets"


def test_resets_the_client_provokes_end_the_connection(engine: str) -> None:
    """MadeYouReset (CVE-2025-8671): a WINDOW_UPDATE of 0 on an open stream."""
    c = Raw(engine)
    events = c.feed(headers(1, c.block(), end_stream=False),
                    WindowUpdateFrame(1, window_increment=0))
    assert c.ended(events).code in (wire.PROTOCOL_ERROR, wire.ENHANCE_YOUR_CALM)


def test_resets_the_client_provokes_count_in_the_reset_bucket(engine: str) -> None:
    """MadeYouReset (CVE-2025-8671) through stream errors: DATA after the request's
    END_STREAM makes h2 reset the stream (STREAM_CLOSED, RFC 9113 section 5.1) without a
    connection error. Those resets, which raise no event of the client's, fill the same bucket
    as resets received, until GOAWAY ENHANCE_YOUR_CALM; libnghttp2 treats the frame as a
    connection error at once."""
    c = Raw(engine, wire.Limits(resets=wire.Rate(20, 10.0)))
    for i in range(25):
        sid = 2 * i + 1
        events = c.feed(headers(sid, c.block()), DataFrame(sid, data=b"x"))
        if c.server.ended:
            break
    ended = c.ended(events)
    if engine == "h2":
        assert (ended.code, ended.reason) == (wire.ENHANCE_YOUR_CALM, "too many stream errors")
        assert i == 20  # the 21st provoked reset is one over the bucket's 20
    else:
        assert ended.code == wire.STREAM_CLOSED or ended.code == wire.PROTOCOL_ERROR
        assert i == 0


@pytest.mark.parametrize(("frame", "reason"), [
    (PingFrame(0, opaque_data=b"12345678"), "too many PING frames"),
    (SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 4096}),
     "too many SETTINGS frames"),
])
def test_control_frame_floods(engine: str, frame: Frame, reason: str) -> None:
    c = Raw(engine)
    ended = c.ended(c.feed(*([frame] * 12)))
    assert ended.code == wire.ENHANCE_YOUR_CALM and ended.reason == reason


def test_window_overflow(engine: str) -> None:
    c = Raw(engine)
    ended = c.ended(c.feed(WindowUpdateFrame(0, window_increment=2**31 - 1)))
    assert ended.code == wire.FLOW_CONTROL_ERROR and "FlowControlError" in ended.reason


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":bogus", b"1")],
    [*GET, (b"X-Upper", b"1")],
    [*GET, (b"x-bad", b"a\r\nInjected: 1")],
    [*GET, (b"transfer-encoding", b"chunked")],
    [*GET, (b"te", b"gzip")],
    [(b":method", b"GET"), (b":authority", b"a.test"), (b":path", b"/")],
], ids=["unknown-pseudo", "uppercase-name", "crlf-in-value", "transfer-encoding", "te-gzip",
        "no-scheme"])
def test_malformed_request_head_ends_the_connection(engine: str,
                                                    fields: list[tuple[bytes, bytes]]) -> None:
    c = Raw(engine)
    events = c.feed(headers(1, c.block(fields=fields)))
    assert not [e for e in events if isinstance(e, wire.RequestHead)]
    ended = c.ended(events)
    assert ended.code == wire.PROTOCOL_ERROR and "ProtocolError" in ended.reason


def test_data_beyond_content_length(engine: str) -> None:
    c = Raw(engine)
    events = c.feed(headers(1, c.block(extra=[(b"content-length", b"3")]), end_stream=False),
                    DataFrame(1, data=b"abcdef", flags=["END_STREAM"]))
    ended = c.ended(events)
    assert ended.code == wire.PROTOCOL_ERROR and "InvalidBodyLengthError" in ended.reason


def test_frame_on_a_closed_stream(engine: str) -> None:
    c = Raw(engine)
    c.feed(headers(1, c.block()))
    c.server.send_headers(1, [(b":status", b"204")], True)
    c.server.output()
    c.feed(DataFrame(1, data=b"late", flags=["END_STREAM"]))
    frames = parse_frames(c.server.output())
    errors = [f for f in frames if isinstance(f, (GoAwayFrame, RstStreamFrame))]
    assert errors and errors[-1].error_code == wire.STREAM_CLOSED


def test_a_client_goaway(engine: str) -> None:
    c = Raw(engine)
    c.feed(headers(1, c.block()))
    events = c.feed(GoAwayFrame(0, last_stream_id=0, error_code=0))
    assert events == [wire.ConnectionEnded(0, "client_goaway", 0, by_client=True)]
    if engine == "h2":
        # (h2 closes its state machine on a GOAWAY received: it cannot answer the streams
        # the client sent before it. The adapter says so; h2conn then ends the streams.)
        assert not c.server.answerable
        assert c.server.send_headers(1, [(b":status", b"204")], True) is False
        return
    # Streams the client sent are still answered (RFC 9113 section 6.8).
    assert c.server.answerable
    assert c.server.send_headers(1, [(b":status", b"204")], True) is True
    assert sent(c.server) == [("HeadersFrame", 1)]


# -- flow control ---------------------------------------------------------------------------


def test_the_body_window_comes_back_only_when_acked(engine: str) -> None:
    c = Raw(engine)
    c.feed(SettingsFrame(0, flags=["ACK"]))
    body = bytes(range(256)) * 625  # 160,000 bytes: more than half the stream's window
    events = c.feed(headers(1, c.block(), end_stream=False),
                    *(DataFrame(1, data=body[i:i + 16000]) for i in range(0, len(body), 16000)))
    data = [e for e in events if isinstance(e, wire.BodyData)]
    assert b"".join(e.data for e in data) == body and sum(e.flow for e in data) == len(body)
    assert not [f for f in parse_frames(c.server.output()) if isinstance(f, WindowUpdateFrame)]
    c.server.ack(1, len(body))
    updates = [f for f in parse_frames(c.server.output()) if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates if f.stream_id] == [
        (1, len(body))]


def test_window_counts_what_is_queued_and_opens_with_window_update(engine: str) -> None:
    c = Raw(engine)
    c.feed(headers(1, c.block()))
    server = c.server
    server.send_headers(1, [(b":status", b"200")], False)
    assert server.window(1) == 65535
    server.send_data(1, b"x" * 65000, False)
    assert server.window(1) == 535
    server.send_data(1, b"x" * 535, False)
    assert server.window(1) == 0
    frames = parse_frames(server.output())
    assert sum(len(f.data) for f in frames if isinstance(f, DataFrame)) == 65535
    assert server.window(1) == 0
    events = c.feed(WindowUpdateFrame(1, window_increment=100),
                    WindowUpdateFrame(0, window_increment=100))
    assert wire.WindowOpened(1) in events and wire.WindowOpened(0) in events
    assert server.window(1) == 100
    server.send_data(1, b"y" * 100, True)
    frames = parse_frames(server.output())
    assert [(len(f.data), "END_STREAM" in f.flags) for f in frames
            if isinstance(f, DataFrame)] == [(100, True)]
    assert len(frames) == 1
    assert not server.stream_open(1) and server.window(1) == 0


def test_reset_after_the_response_keeps_the_response(engine: str) -> None:
    """A response complete before its request body: DATA with END_STREAM, then RST_STREAM
    NO_ERROR (RFC 9113 section 8.1), in that order."""
    c = Raw(engine)
    c.feed(headers(1, c.block(), end_stream=False))
    c.server.send_headers(1, [(b":status", b"200")], False)
    c.server.send_data(1, b"done", True)
    c.server.reset(1, wire.NO_ERROR)
    assert sent(c.server) == [("HeadersFrame", 1), ("DataFrame", 1), ("RstStreamFrame", 1)]
    assert not c.server.stream_open(1)
    c.server.reset(1, wire.NO_ERROR)  # a stream already closed: nothing
    assert c.server.output() == b""


# -- the same answers from both engines -----------------------------------------------------


def exchange(engine: str) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    server: Server = ENGINES[engine](wire.Limits())
    server.initiate()
    c = client()
    c.receive_data(server.output())
    for i in range(10):
        c.send_headers(2 * i + 1, [*GET[:3], (b":path", f"/{i}".encode())], end_stream=True)
    for ev in server.feed(c.data_to_send(), 0.0):
        if isinstance(ev, wire.RequestHead):
            assert isinstance(ev.head, wire.Head)
            body = ev.head.target.encode() * 300
            server.send_headers(ev.stream_id, [(b":status", b"200"),
                                               (b"content-length", str(len(body)).encode())],
                                False)
            server.send_data(ev.stream_id, body, True)
    got: dict[int, list[Any]] = {}
    for ev2 in c.receive_data(server.output()):
        if isinstance(ev2, h2.events.ResponseReceived):
            got[ev2.stream_id] = [ev2.headers, b""]
        elif isinstance(ev2, h2.events.DataReceived):
            got[ev2.stream_id][1] += ev2.data
    return [(sid, h, b) for sid, (h, b) in sorted(got.items())]


def test_both_engines_give_the_same_responses() -> None:
    if not AVAILABLE:
        pytest.skip("libnghttp2 is not installed")
    a, b = exchange("h2"), exchange("nghttp2")
    assert a == b and len(a) == 10 and a[3][2] == b"/3" * 300


_WITHOUT_LIBNGHTTP2 = """
import ctypes
real = ctypes.CDLL
def cdll(name, *args, **kwargs):
    if name and "nghttp2" in str(name):
        raise OSError(name + ": cannot open shared object file")
    return real(name, *args, **kwargs)
ctypes.CDLL = cdll
from sniport.http import h2conn
from sniport.wire import h2_nghttp2
print(h2_nghttp2.AVAILABLE, h2conn.ENGINE_NAME)
"""


def test_a_machine_without_libnghttp2_gets_the_h2_engine() -> None:
    # The adapter and its ctypes declarations import without the library (then AVAILABLE
    # is false): sniport must start and speak HTTP/2 through h2 on such a machine.
    done = subprocess.run([sys.executable, "-c", _WITHOUT_LIBNGHTTP2], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False h2 ") and "pure Python" in done.stdout
