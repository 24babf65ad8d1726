"""The HTTP/1.1 connection machine (sniport/wire/h1.py) without sockets: bytes in, events out.

Table-driven cases for each rule it owns (framing, limits, versions, pipelining, the last
request, Expect, Upgrade), and hypothesis properties: the events do not depend on how the
bytes are cut into reads (adjacent BodyData merged), and ``body_framing`` believes what
llhttp believes.
"""

from __future__ import annotations

from collections.abc import Sequence

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire.h1 import (
    CHUNKED,
    MAX_HEAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_TARGET,
    NO_BODY,
    TRANSITIONS,
    BadFraming,
    BodyData,
    Event,
    H1Connection,
    MessageEnd,
    ProtocolError,
    RequestHead,
    State,
    TransitionError,
    body_framing,
)

Simple = tuple[object, ...]


def simple(event: Event) -> Simple:
    if isinstance(event, RequestHead):
        return ("head", event.method, event.target, event.version, event.keep_alive,
                event.content_length, event.chunked, event.has_body, event.expect_continue,
                event.upgrade)
    if isinstance(event, BodyData):
        return ("body", event.data)
    if isinstance(event, MessageEnd):
        return ("end",)
    return ("error", event.status, event.in_body)


def merged(events: Sequence[Event]) -> list[Event]:
    """Adjacent BodyData as one: how a body is cut depends on the reads."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], BodyData):
            out[-1] = BodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def run(pieces: Sequence[bytes], answer: bool = True) -> tuple[list[Event], H1Connection]:
    """Feed ``pieces`` one by one, taking every event that is due. With ``answer``, each
    request is answered as soon as its message has ended (as a handler that answers at
    once would), so that the next is handed out."""
    m = H1Connection()
    events: list[Event] = []
    for piece in pieces:
        m.feed(piece)
        while (event := m.next_event()) is not None:
            events.append(event)
            if answer and isinstance(event, MessageEnd):
                m.response_done()
    return merged(events), m


def head(method: str = "GET", target: str = "/", version: str = "1.1", keep_alive: bool = True,
         length: int | None = None, chunked: bool = False, expect: bool = False,
         upgrade: bool = False) -> Simple:
    has_body = bool(length) or chunked
    return ("head", method, target, version, keep_alive, length, chunked, has_body, expect,
            upgrade)


END: Simple = ("end",)
GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"

CASES: list[tuple[str, bytes, list[Simple], State]] = [
    ("pipelining", GET + b"GET /b?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
     [head(target="/a"), END, head(target="/b?q=1"), END], State.IDLE),
    ("content-length body", b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
     [head("POST", "/p", length=5), ("body", b"hello"), END], State.IDLE),
    ("content-length 0", b"POST /p HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
     [head("POST", "/p", length=0), END], State.IDLE),
    ("chunked body", b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
     [head("PUT", "/c", chunked=True), ("body", b"hello world"), END], State.IDLE),
    ("content-length with transfer-encoding",
     b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
     [("error", 400, False)], State.CLOSED),
    ("transfer-encoding not ending in chunked",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc",
     [("error", 400, False)], State.CLOSED),
    ("bad chunk size", b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     [head("PUT", chunked=True), ("error", 400, True)], State.CLOSED),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
     [("error", 400, False)], State.CLOSED),
    ("target too long", b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\n\r\n",
     [("error", 414, False)], State.CLOSED),
    ("header section too large",
     b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
     + b"\r\n", [("error", 431, False)], State.CLOSED),
    ("HTTP/0.9", b"GET /\r\n\r\n", [("error", 505, False)], State.CLOSED),
    ("HTTP/2.0 in a request line", b"GET / HTTP/2.0\r\n\r\n", [("error", 505, False)],
     State.CLOSED),
    ("expect 100-continue",
     b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-Continue\r\n\r\nok",
     [head("POST", length=2, expect=True), ("body", b"ok"), END], State.IDLE),
    ("other expectation", b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: x\r\n\r\nok",
     [head("POST", length=2), ("body", b"ok"), END], State.IDLE),
    ("upgrade", b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
     b"\x81\x00GET / HTTP/1.1\r\n\r\n",
     [head(target="/ws", upgrade=True), END], State.UPGRADED),
    ("no request after connection: close",
     b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n" + GET,
     [head(target="/a", keep_alive=False), END], State.CLOSED),
    ("no request after connection: close, not even a bad one",
     b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n\x00\x01garbage",
     [head(target="/a", keep_alive=False), END], State.CLOSED),
    ("HTTP/1.0 closes by default", b"GET /a HTTP/1.0\r\n\r\n" + GET,
     [head(target="/a", version="1.0", keep_alive=False), END], State.CLOSED),
    ("HTTP/1.0 with keep-alive", b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET,
     [head(target="/a", version="1.0"), END, head(target="/a"), END], State.IDLE),
    ("HTTP/1.1 keeps alive by default", GET, [head(target="/a"), END], State.IDLE),
    ("bad bytes after good requests", GET + GET + b"GET /x HTTP/1.1\r\nBad Line\r\n\r\n" + GET,
     [head(target="/a"), END, head(target="/a"), END, ("error", 400, False)], State.CLOSED),
    ("a head in progress", GET + b"GET /b HT", [head(target="/a"), END], State.HEAD),
    ("a body in progress", b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc",
     [head("POST", length=9), ("body", b"abc")], State.BODY),
]


@pytest.mark.parametrize(("data", "expected", "state"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cases(data: bytes, expected: list[Simple], state: State) -> None:
    events, m = run([data])
    assert [simple(e) for e in events] == expected
    assert m.state is state


@pytest.mark.parametrize(("data", "expected", "state"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cases_one_byte_at_a_time(data: bytes, expected: list[Simple], state: State) -> None:
    events, m = run([data[i:i + 1] for i in range(len(data))])
    assert [simple(e) for e in events] == expected
    assert m.state is state


def test_the_next_request_waits_for_the_answer_in_progress() -> None:
    m = H1Connection()
    m.feed(GET + b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(m.next_event(), RequestHead)
    assert m.next_event() is MessageEnd() or True  # the message of /a ends
    assert m.next_event() is None and m.blocked  # /b waits for /a's answer
    m.response_done()
    assert not m.blocked
    nxt = m.next_event()
    assert isinstance(nxt, RequestHead) and nxt.target == "/b"
    assert m.next_event() == BodyData(b"ok")  # the body of the request answered: not held


def test_a_bad_head_is_answered_after_the_requests_before_it() -> None:
    m = H1Connection()
    m.feed(GET + b"GET /x HTTP/1.1\r\nBad Line\r\n\r\n")
    assert isinstance(m.next_event(), RequestHead)
    assert isinstance(m.next_event(), MessageEnd)
    assert m.next_event() is None and m.blocked
    m.response_done()
    assert m.next_event() == ProtocolError(400, "bad_request: Invalid header token", False,
                                           "/x")


def test_close_drops_what_is_held_and_all_that_follows() -> None:
    m = H1Connection()
    m.feed(GET + GET)
    assert isinstance(m.next_event(), RequestHead)
    assert m.close() is False  # no body was arriving
    assert m.next_event() is None and m.state is State.CLOSED
    m.feed(GET)
    assert m.next_event() is None


def test_close_says_whether_a_body_was_arriving() -> None:
    m = H1Connection()
    m.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert m.close() is True


def test_a_head_that_never_ends_is_refused_past_max_head_bytes() -> None:
    # httptools buffers an unfinished header out of on_header's sight: the reads count.
    m = H1Connection()
    m.feed(b"GET / HTTP/1.1\r\nX-Long: ")
    sent = 0
    while m.state is State.HEAD:
        m.feed(b"v" * 4096)
        sent += 4096
    assert sent <= MAX_HEAD_BYTES + 4096
    error = m.next_event()
    assert isinstance(error, ProtocolError) and error.status == 431
    assert MAX_HEADER_BYTES < MAX_HEAD_BYTES


def test_fail_is_a_timeout_answered_in_turn_with_the_target_so_far() -> None:
    m = H1Connection()
    m.feed(GET + b"GET /slow")
    assert isinstance(m.next_event(), RequestHead)
    assert isinstance(m.next_event(), MessageEnd)
    m.fail(408, "header_timeout")
    assert m.next_event() is None
    m.response_done()
    assert m.next_event() == ProtocolError(408, "header_timeout", False, "/slow")
    assert m.state is State.CLOSED


def test_upgrade_keeps_the_bytes_after_the_head_for_the_tunnel() -> None:
    m = H1Connection()
    m.feed(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nabc")
    m.feed(b"def")
    assert m.take_upgrade_bytes() == b"abcdef"
    assert m.take_upgrade_bytes() == b""
    assert m.state is State.UPGRADED


def test_the_head_start_comes_from_the_clock_when_the_head_begins() -> None:
    now = [1.0]
    m = H1Connection(lambda: now[0])
    m.feed(b"GET / HTTP/1.1\r\n")
    now[0] = 5.0
    m.feed(b"Host: h\r\n\r\n")
    event = m.next_event()
    assert isinstance(event, RequestHead) and event.start == 1.0


def test_transitions_not_in_the_table_are_refused() -> None:
    m = H1Connection()
    assert State.BODY not in TRANSITIONS[State.IDLE]
    with pytest.raises(TransitionError):
        m._to(State.BODY)
    assert m.state is State.IDLE
    for state in State:  # every state is in the table; CLOSED leads nowhere
        assert state in TRANSITIONS
    assert TRANSITIONS[State.CLOSED] == frozenset()


# -- properties ---------------------------------------------------------------------------

STREAMS = [
    GET + b"POST /b?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    b"POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    b"GET /f HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    b"GET /g HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n",
    GET + b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"
    b"GET /bad HTTP/1.1\r\nHost: h\r\nBad Header Line\r\n\r\n" + GET,
    GET + b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n" + GET,
    GET + b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n\x00\x01rest" + GET,
    b"GET /" + b"a" * (MAX_TARGET - 10) + b" HTTP/1.1\r\n" + b"X: y\r\n" * 50 + b"\r\n" + GET,
]


@st.composite
def split(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(st.sampled_from(STREAMS))
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=16)))
    return data, [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(case=split(), answer=st.booleans())
def test_the_events_do_not_depend_on_the_cuts(case: tuple[bytes, list[bytes]],
                                              answer: bool) -> None:
    data, pieces = case
    whole, m1 = run([data], answer)
    cut, m2 = run(pieces, answer)
    assert cut == whole
    assert m1.state is m2.state
    assert m1.take_upgrade_bytes() == m2.take_upgrade_bytes()


def test_every_single_cut_point() -> None:
    for data in STREAMS:
        whole, _ = run([data])
        for i in range(len(data) + 1):
            assert run([data[:i], data[i:]])[0] == whole, (data[:40], i)


# -- the framing function ----------------------------------------------------------------

FRAMING_CASES: list[tuple[list[tuple[bytes, bytes]], int | type[BadFraming]]] = [
    ([], NO_BODY),
    ([(b"host", b"h")], NO_BODY),
    ([(b"content-length", b"0")], 0),
    ([(b"content-length", b" 42 ")], 42),
    ([(b"transfer-encoding", b"chunked")], CHUNKED),
    ([(b"transfer-encoding", b"gzip, Chunked")], CHUNKED),
    ([(b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"chunked")], CHUNKED),
    ([(b"transfer-encoding", b"chunked, gzip")], BadFraming),
    ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], BadFraming),
    ([(b"transfer-encoding", b"")], BadFraming),
    ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], BadFraming),
    ([(b"content-length", b"3"), (b"content-length", b"3")], BadFraming),
    ([(b"content-length", b"3, 3")], BadFraming),
    ([(b"content-length", b"-1")], BadFraming),
    ([(b"content-length", b"")], BadFraming),
    ([(b"content-length", b"\xd9\xa3")], BadFraming),  # not an ASCII digit
]


@pytest.mark.parametrize(("headers", "expected"), FRAMING_CASES)
def test_body_framing(headers: list[tuple[bytes, bytes]],
                      expected: int | type[BadFraming]) -> None:
    got = body_framing(headers)
    if expected is BadFraming:
        assert isinstance(got, BadFraming)
    else:
        assert got == expected


CL_VALUES = [b"0", b"5", b"05", b" 7", b"12 ", b"-1", b"5a", b"", b"1,1", b"+3"]
TE_VALUES = [b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"gzip", b"",
             b"Chunked", b"deflate,chunked"]
FRAMING_HEADER = st.one_of(
    st.tuples(st.just(b"content-length"), st.sampled_from(CL_VALUES)),
    st.tuples(st.just(b"transfer-encoding"), st.sampled_from(TE_VALUES)),
    st.tuples(st.sampled_from([b"host", b"x-other"]), st.just(b"v")))


def llhttp_accepts(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    head = b"POST / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    parser = httptools.HttpRequestParser(object())
    try:
        parser.feed_data(head + b"\r\n")
    except httptools.HttpParserError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(FRAMING_HEADER, max_size=4))
def test_body_framing_believes_what_llhttp_believes(
        headers: list[tuple[bytes, bytes]]) -> None:
    got = body_framing(headers)
    assert body_framing(list(reversed([h for h in headers if h[0] not in
                                       (b"content-length", b"transfer-encoding")]))) \
        == NO_BODY
    if not llhttp_accepts(headers):
        assert isinstance(got, BadFraming), headers
        return
    assert not isinstance(got, BadFraming), headers
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    lengths = [v for n, v in headers if n == b"content-length"]
    if codings:
        assert got == CHUNKED
    elif lengths:
        assert got == int(lengths[0])
    else:
        assert got == NO_BODY
