"""Issue 9: HTTP/2's limits and bad input, each sent frame by frame (hyperframe, hpack) over
a real TLS connection to a running sniport.

Every limit ends the offending stream or connection with the RFC 9113 error code and a log
line naming it; another connection, opened after the attack, is served as if nothing had
happened; and nothing answers a request of another stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from support.configs import route, site_config, toml_lines
from support.h2client import PREFACE, H2Client, RawH2
from support.pki import Pki
from support.process import Sniport, start_sniport

HOST = "limits.h2.test"
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x3, 0x5
REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x7, 0x8, 0xB
MAX_STREAMS = 10


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    tmp = tmp_path_factory.mktemp("h2limits")
    www = tmp / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(b"x" * (4 << 20))
    lines = toml_lines(workers=1, header_timeout="1s", keepalive_timeout="3s",
                       state_dir=tmp / "state",
                       http2_max_streams=MAX_STREAMS,
                       http2_reset_rate="100/10s", http2_ping_rate="10/10s",
                       http2_settings_rate="10/10s", http2_max_queued_output="256K")
    routes = (route("/", respond={"status": 200, "body": "ok"})
              + route("/files/", static={"root": www})
              + route("/32k", respond={"status": 200, "body": "y" * 32768}))
    cert = pki.cert(HOST, directory=tmp / "certs")
    s = start_sniport(site_config("h2", [HOST], cert, routes, server=lines), tmp)
    yield s
    s.stop()


def raw(server: Sniport, pki: Pki, preface: bool = True, rcvbuf: int = 0) -> RawH2:
    return RawH2(server.port, HOST, pki.client_context(), preface=preface, rcvbuf=rcvbuf)


def still_serves(server: Sniport, pki: Pki) -> None:
    """A new connection, after the attack, gets its answer."""
    c = H2Client(server.port, HOST, pki.client_context())
    try:
        r = c.get("/")
        assert (r.status, r.body) == (200, b"ok")
    finally:
        c.close()


def ended_with(server: Sniport, pki: Pki, conn: RawH2, code: int, log: str) -> GoAwayFrame:
    frame = conn.goaway()
    assert frame.error_code == code, (frame.error_code, code)
    assert conn.closed(), "the connection stays open after its GOAWAY"
    server.wait_log(log)
    still_serves(server, pki)
    return frame


# -- what is announced --------------------------------------------------------------------


def test_settings_announce_the_limits(pki: Pki, tmp_path: Path) -> None:
    """The defaults, as SETTINGS: 100 concurrent streams, a 24 KiB header list (HTTP/1.1's
    8 KiB target + 16 KiB of fields), no server push."""
    cert = pki.cert(HOST, directory=tmp_path / "certs")
    routes = route("/", respond={"status": 200, "body": "ok"})
    s = start_sniport(site_config("h2", [HOST], cert, routes,
                                  server=toml_lines(workers=1, state_dir=tmp_path / "st")),
                      tmp_path)
    try:
        c = raw(s, pki)
        first = c.settings
        assert isinstance(first, SettingsFrame)
        assert first.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
        assert first.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 24 * 1024
        assert first.settings[SettingsFrame.ENABLE_PUSH] == 0
        c.close()
    finally:
        s.stop()


# -- limits ---------------------------------------------------------------------------------


def test_more_concurrent_streams_than_announced(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    # Requests whose bodies never come keep their streams open.
    c.send_frames(*(c.headers(2 * i + 1, c.block("/"), end_stream=False)
                    for i in range(MAX_STREAMS + 1)))
    ended_with(server, pki, c, PROTOCOL_ERROR, "TooManyStreamsError|concurrent streams")


def test_header_list_over_the_bound(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    block = c.block("/", extra=[(b"x-big", b"a" * (30 * 1024))])
    first = c.headers(1, block[:16000], end_headers=False)
    rest = ContinuationFrame(1, data=block[16000:])
    rest.flags.add("END_HEADERS")
    c.send_frames(first, rest)
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "http2: .*[Oo]versized header")


def test_eight_continuation_frames_are_fine(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    block = c.block("/")
    frames = [c.headers(1, block[:1], end_headers=False)]
    frames += [ContinuationFrame(1, data=block[1 + i:2 + i]) for i in range(7)]
    last = ContinuationFrame(1, data=block[8:])
    last.flags.add("END_HEADERS")
    c.send_frames(*frames, last)  # HEADERS + 8 CONTINUATION
    got = c.frames_until(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
    assert b"ok" in b"".join(f.data for f in got if isinstance(f, DataFrame))
    c.close()


def test_nine_continuation_frames_are_too_many(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    frames = [c.headers(1, c.block("/"), end_headers=False)]
    frames += [ContinuationFrame(1, data=b"") for _ in range(9)]
    c.send_frames(*frames)
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "more than 8 CONTINUATION")


def test_requests_per_connection_then_goaway(pki: Pki, tmp_path: Path) -> None:
    """After http2_max_requests streams: a graceful GOAWAY naming the last one, which is
    still answered (its response may follow the GOAWAY), then the close."""
    cert = pki.cert(HOST, directory=tmp_path / "certs")
    routes = route("/", respond={"status": 200, "body": "ok"})
    lines = toml_lines(workers=1, state_dir=tmp_path / "st", http2_max_requests=6)
    s = start_sniport(site_config("h2", [HOST], cert, routes, server=lines), tmp_path)
    try:
        c = raw(s, pki)
        c.send_frames(*(c.headers(2 * i + 1, c.block("/")) for i in range(3)))
        c.send_frames(*(c.headers(2 * i + 1, c.block("/")) for i in range(3, 7)))
        frames = []
        while (f := c.read_frame()) is not None:
            frames.append(f)
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert [(g.error_code, g.last_stream_id) for g in goaways] == [(NO_ERROR, 11)]
        answered = sorted(f.stream_id for f in frames
                          if isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert answered == [1, 3, 5, 7, 9, 11]
        # The seventh stream, after the GOAWAY's last one, is refused: the client retries it.
        refused = [f for f in frames if isinstance(f, RstStreamFrame) and f.stream_id == 13]
        assert [f.error_code for f in refused] == [REFUSED_STREAM]
    finally:
        s.stop()


def test_rapid_reset_many_new_streams_in_one_read(server: Sniport, pki: Pki) -> None:
    """CVE-2023-44487: streams opened and reset at once never count as concurrent; more than
    twice the concurrent limit opened in one read ends the connection."""
    c = raw(server, pki)
    frames = []
    for i in range(2 * MAX_STREAMS + 1):
        frames += [c.headers(2 * i + 1, c.block("/"), end_stream=False),
                   RstStreamFrame(2 * i + 1, error_code=CANCEL)]
    c.send_frames(*frames)
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "too many new streams in one read")


def test_resets_over_the_rate(server: Sniport, pki: Pki) -> None:
    """Resets received over http2_reset_rate (100 per 10 s), a few at a time."""
    c = raw(server, pki)
    sid = 1
    # Two at a time, paced: reads never hold more than twice the concurrent limit of new
    # streams (that rule is the test above), so it is the reset bucket that ends this.
    for _ in range(60):
        frames = []
        for _ in range(2):
            frames += [c.headers(sid, c.block("/"), end_stream=False),
                       RstStreamFrame(sid, error_code=CANCEL)]
            sid += 2
        try:
            c.send_frames(*frames)
        except OSError:
            break
        time.sleep(0.02)
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "too many stream resets")


def test_resets_the_client_provokes_end_the_connection(server: Sniport, pki: Pki) -> None:
    """MadeYouReset (CVE-2025-8671): frames that make the server reset a stream (here a
    WINDOW_UPDATE of 0 on an open stream, RFC 9113 section 6.9) end the connection, at once
    or through the reset bucket (counted provoked resets: test_h2_engines)."""
    c = raw(server, pki)
    sid = 1
    code = None
    for _ in range(40):
        frames = []
        for _ in range(5):
            frames += [c.headers(sid, c.block("/"), end_stream=False),
                       WindowUpdateFrame(sid, window_increment=0)]
            sid += 2
        try:
            c.send_frames(*frames)
        except OSError:
            break
        time.sleep(0.01)
    frame = c.goaway()
    code = frame.error_code
    assert code in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
    assert c.closed()
    still_serves(server, pki)


def test_ping_flood(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    c.send_frames(*(PingFrame(0, opaque_data=b"%08d" % i) for i in range(12)))
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "too many PING frames")


def test_settings_flood(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    c.send_frames(*(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 4096})
                    for _ in range(12)))
    ended_with(server, pki, c, ENHANCE_YOUR_CALM, "too many SETTINGS frames")


def open_windows(c: RawH2) -> None:
    """Every window as large as RFC 9113 allows: flow control holds nothing back."""
    c.send_frames(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}),
                  WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535))


def test_a_large_response_waits_for_a_client_that_does_not_read(server: Sniport,
                                                                pki: Pki) -> None:
    """Windows open, nothing read: the 4 MiB file is not queued in memory (the handler
    waits for the transport), and the connection ends when its output could not leave for
    keepalive_timeout (3 s here)."""
    c = raw(server, pki, rcvbuf=4096)
    open_windows(c)
    mark = server.mark()
    c.send_frames(c.headers(1, c.block("/files/big.bin")))
    down = int(server.wait_log(r"conn .* down=(\d+) .*end=send_timeout", timeout=20,
                               start=mark).group(1))
    assert down < 3 << 20, f"{down} bytes were queued for a client that reads nothing"
    still_serves(server, pki)
    c.close()


def test_output_queue_cap_for_a_client_that_does_not_read(pki: Pki, tmp_path: Path) -> None:
    """Frames that must be answered (PING here, with its rate limit lifted) from a client
    that reads nothing: past http2_max_queued_output the connection is cut, whatever the
    other limits. (Responses cannot pile up this way: a client that reads nothing cannot
    know its streams closed, so it may not open more than the concurrent limit.)"""
    cert = pki.cert(HOST, directory=tmp_path / "certs")
    routes = route("/", respond={"status": 200, "body": "ok"})
    lines = toml_lines(workers=1, state_dir=tmp_path / "st", http2_ping_rate="1000000/1s",
                       http2_max_queued_output="64K")
    s = start_sniport(site_config("h2", [HOST], cert, routes, server=lines), tmp_path)
    try:
        c = RawH2(s.port, HOST, pki.client_context(), rcvbuf=4096)
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        try:
            for _ in range(100):
                c.send(ping * 2000)  # 34 KB of PINGs, 1.7 MB of PING ACKs in all
        except OSError:
            pass
        # (libnghttp2 counts unread PING answers itself and may cut the connection first:
        # "flooded", with GOAWAY ENHANCE_YOUR_CALM.)
        s.wait_log("end=output_queue_full|end=.*flood", timeout=20)
        still_serves(s, pki)
        c.close()
    finally:
        s.stop()


def test_stalled_header_block_times_out(server: Sniport, pki: Pki) -> None:
    """A HEADERS frame without END_HEADERS and then nothing: header_timeout (1 s)."""
    c = raw(server, pki)
    c.send_frames(c.headers(1, c.block("/")[:3], end_headers=False))
    started = time.monotonic()
    assert c.closed(timeout=10)
    assert 0.8 < time.monotonic() - started < 5
    server.wait_log("header_timeout")
    still_serves(server, pki)


# -- bad input --------------------------------------------------------------------------


def test_malformed_preface(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki, preface=False)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    ended_with(server, pki, c, PROTOCOL_ERROR, "http2: .*[Pp]reface|http2: .*ProtocolError")


def test_frame_on_a_closed_stream(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    c.send_frames(c.headers(1, c.block("/")))
    c.frames_until(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
    c.send_frames(DataFrame(1, data=b"late", flags=["END_STREAM"]))
    # RFC 9113 section 5.1: STREAM_CLOSED, as a stream error (RST_STREAM) for a stream
    # closed a moment ago, or for the connection.
    got = c.frames_until(lambda f: isinstance(f, (GoAwayFrame, RstStreamFrame)))
    assert got[-1].error_code == STREAM_CLOSED
    still_serves(server, pki)


def test_window_overflow(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    c.send_frames(WindowUpdateFrame(0, window_increment=2**31 - 1))
    ended_with(server, pki, c, FLOW_CONTROL_ERROR, "http2: .*FlowControlError")


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":bogus", b"1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", HOST.encode()),
     (b":path", b"/"), (b"X-Upper", b"1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", HOST.encode()),
     (b":path", b"/"), (b"x-bad", b"a\r\nInjected: 1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", HOST.encode()),
     (b":path", b"/"), (b"transfer-encoding", b"chunked")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", HOST.encode()),
     (b":path", b"/"), (b"te", b"gzip")],
    [(b":method", b"GET"), (b":authority", HOST.encode()), (b":path", b"/")],
], ids=["unknown-pseudo", "uppercase-name", "crlf-in-value", "transfer-encoding", "te-gzip",
        "no-scheme"])
def test_malformed_request_head(server: Sniport, pki: Pki,
                                fields: list[tuple[bytes, bytes]]) -> None:
    """RFC 9113 section 8.1.1 and 8.2: malformed requests are never answered as requests."""
    c = raw(server, pki)
    c.send_frames(c.headers(1, c.block(fields=fields)))
    ended_with(server, pki, c, PROTOCOL_ERROR, "http2: .*ProtocolError")


def test_data_beyond_content_length(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki)
    c.send_frames(c.headers(1, c.block("/", method="POST",
                                       extra=[(b"content-length", b"3")]), end_stream=False),
                  DataFrame(1, data=b"abcdef", flags=["END_STREAM"]))
    ended_with(server, pki, c, PROTOCOL_ERROR, "http2: .*InvalidBodyLengthError")


def test_a_stream_error_leaves_other_streams_alone(server: Sniport, pki: Pki) -> None:
    """A client that resets one stream: its other streams are answered."""
    c = H2Client(server.port, HOST, pki.client_context())
    a = c.request("/files/big.bin")
    b = c.request("/")
    c.conn.reset_stream(a, CANCEL)
    c._flush()
    rb = c.wait(b)[0]
    assert (rb.status, rb.body) == (200, b"ok")
    c.close()


def test_the_preface_must_come_in_time(server: Sniport, pki: Pki) -> None:
    c = raw(server, pki, preface=False)
    c.send(PREFACE[:10])
    assert c.closed(timeout=10)
    still_serves(server, pki)


def test_an_idle_connection_ends_at_keepalive_timeout(server: Sniport, pki: Pki) -> None:
    """No stream open for keepalive_timeout (3 s here): a GOAWAY, then the close, as an idle
    HTTP/1.1 keep-alive connection."""
    c = raw(server, pki)
    mark = server.mark()
    c.send_frames(c.headers(1, c.block("/")))
    started = time.monotonic()
    frame = c.goaway(timeout=10)
    assert frame.error_code == NO_ERROR and frame.last_stream_id == 1
    assert 2.5 < time.monotonic() - started < 6
    assert c.closed()
    server.wait_log(r"conn .*end=keepalive_timeout", start=mark)


def test_a_client_that_never_opens_its_window(server: Sniport, pki: Pki) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE 0 and no WINDOW_UPDATE: the response cannot leave; the
    connection ends like one whose client stopped reading (keepalive_timeout, 3 s here)."""
    c = raw(server, pki)
    mark = server.mark()
    c.send_frames(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}),
                  c.headers(1, c.block("/files/big.bin")))
    started = time.monotonic()
    assert c.closed(timeout=15)
    assert 2.5 < time.monotonic() - started < 8
    server.wait_log(r"conn .*end=send_timeout", start=mark)
    still_serves(server, pki)


def test_client_goaway_with_streams_in_flight(server: Sniport, pki: Pki) -> None:
    """A client that says GOAWAY while a response is still under way (h2load does at the end
    of a timed run): the connection ends cleanly, no traceback, nothing else affected."""
    c = raw(server, pki)
    mark = server.mark()
    c.send_frames(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}),
                  c.headers(1, c.block("/files/big.bin")), c.headers(3, c.block("/")))
    time.sleep(0.2)
    c.send_frames(GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR))
    assert c.closed(timeout=10)
    # h2 can send nothing after the client's GOAWAY: the streams end at once. libnghttp2
    # goes on answering them (RFC 9113 section 6.8), and the one its windows hold back ends
    # like any other (keepalive_timeout, 3 s here).
    server.wait_log(r"conn .*end=(client_goaway|send_timeout)", start=mark)
    assert "Traceback" not in "\n".join(server.stderr.lines()[mark:])
    still_serves(server, pki)
