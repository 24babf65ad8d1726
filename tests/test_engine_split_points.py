"""Issue 14 item 22: the HTTP/1.1 engine gives the same answers however the client's bytes
are cut into reads (hypothesis chooses the cut points, every point possible).

The engine is driven as its transport drives it: ``data_received`` with each piece, its
writes collected. What is tested is the engine's framing (pipelining, Content-Length and
chunked bodies, 100-continue, bad bytes after good requests), not the network: the
end-to-end tests do that over real sockets.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from support.transport import RecordingTransport

from sniport.http.engine import Exchange, HttpConnection, Limits


class _Log:
    enabled = False

    def request(self, conn: HttpConnection, ex: Exchange, now: float) -> None:
        pass


class _Echo:
    """Answers every request with its method, target and body length, reading the body.
    With ``later``, answers only when ``flush`` is called (after the read that brought the
    request has been parsed to its end), as an upstream application would."""

    def __init__(self, later: bool) -> None:
        self.later = later
        self.pending: list[Callable[[], None]] = []

    def handle(self, ex: Exchange) -> None:
        body = ex.request.body
        if body is None:
            self._answer(ex, 0)
            return
        body.then(lambda: self._answer(ex, body.received), lambda exc: ex.error(400))

    def _answer(self, ex: Exchange, length: int) -> None:
        req = ex.request
        text = f"{req.method} {req.target} {length}".encode()
        if self.later:
            self.pending.append(lambda: ex.respond(200, [("Content-Type", "text/plain")], text))
        else:
            ex.respond(200, [("Content-Type", "text/plain")], text)

    def flush(self) -> None:
        while self.pending:
            self.pending.pop(0)()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def run(loop: asyncio.AbstractEventLoop, pieces: list[bytes], later: bool = False) -> bytes:
    """The bytes the engine writes for ``pieces`` read one after the other (the Date
    header blanked: it may tick between two runs; interim 100 Continue answers removed:
    one is due exactly when a body had not come with its head, which depends on the cuts)."""
    transport = RecordingTransport()
    app = _Echo(later)
    conn = HttpConnection(loop, app, Limits(15.0, 75.0), _Log(), sni=None,
                          client="127.0.0.1:1", scheme="https",
                          on_close=lambda reason, i, o: None)
    conn.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        if transport.closed:
            break
        conn.data_received(piece)
        app.flush()
    conn.connection_lost(None)
    out = bytes(transport.out).replace(CONTINUE, b"")
    return re.sub(rb"Date: [^\r]*\r\n", b"Date: -\r\n", out)


STREAM = (
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /b?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    b"POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    b"HEAD /e HTTP/1.1\r\nHost: h\r\n\r\n"
    b"GET /f HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    b"GET /g HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n"
)

BAD_TAIL = (
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
    b"GET /bad HTTP/1.1\r\nHost: h\r\nBad Header Line\r\n\r\n"
    b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n"
)


def cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda points: [data[a:b] for a, b in zip([0, *sorted(points)],
                                                   [*sorted(points), len(data)], strict=True)])


@settings(max_examples=150, deadline=None)
@given(pieces=cuts(STREAM))
def test_pipelined_requests_get_the_same_answers_whatever_the_cuts(
        loop: asyncio.AbstractEventLoop, pieces: list[bytes]) -> None:
    whole = run(loop, [STREAM])
    assert run(loop, pieces) == whole
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", whole) == [b"200"] * 7
    assert b"/never" not in whole  # after "Connection: close": not answered


def test_one_byte_at_a_time(loop: asyncio.AbstractEventLoop) -> None:
    whole = run(loop, [STREAM])
    assert run(loop, [STREAM[i:i + 1] for i in range(len(STREAM))]) == whole
    for expected in (b"GET /a 0", b"POST /b?x=1 11", b"PUT /c 11", b"POST /d 3", b"GET /f 0",
                     b"GET /g 0"):
        assert expected in whole, expected


@settings(max_examples=100, deadline=None)
@given(pieces=cuts(BAD_TAIL), later=st.booleans())
def test_bad_bytes_after_good_requests_are_answered_after_them(
        loop: asyncio.AbstractEventLoop, pieces: list[bytes], later: bool) -> None:
    """Item 19: the requests before the bad bytes are answered, then a 400, then nothing,
    also when their answers come after the bad bytes were read (an upstream's answer, a
    large file). Before: the answer under way was dropped and the connection closed."""
    out = run(loop, pieces, later)
    assert out == run(loop, [BAD_TAIL])
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"200", b"400"], out
    assert b"GET /a 0" in out and b"POST /b 2" in out and b"/after" not in out
