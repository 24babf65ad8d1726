"""The HTTP/2 server engine: one protocol object per client connection that chose ``h2``.

Job: drive the sans-IO ``wire.h2.H2Server`` from asyncio, and give each stream to the site as
an ``Exchange`` of the request contract (``contract.py``), so the same handlers (static,
proxy, redirect, respond, error pages) answer HTTP/2 and HTTP/1.1.

Rules:
- A stream is one exchange. Its response goes out as HEADERS then DATA within the flow
  control windows (RFC 9113 section 5.2); what does not fit waits in the stream, and a
  handler that filled a buffer's worth waits for ``on_resume`` (``writable`` false), as on
  HTTP/1.1: memory per slow client stays bounded whatever is sent.
- Request bodies are acknowledged (WINDOW_UPDATE) only once taken: while a handler has paused
  the body (the proxy's upstream is not draining) the client's window closes, so it stops.
- An error on one stream resets that stream; the connection and its other streams go on.
  Errors of the client on the connection (``h2`` protocol errors, our limits) end it with a
  GOAWAY naming the error, and a log line.
- Graceful drain (reload, stop, ``http2_max_requests``): a GOAWAY names the last stream that
  will be answered; open streams finish, then the connection closes (bounded by
  ``drain_timeout`` in the worker).
- Deadlines, as on HTTP/1.1: ``header_timeout`` for the preface, a header block cut short and
  a request body that stops arriving; ``keepalive_timeout`` with no stream open; a client
  that stops reading gets as long as an idle one. ``max_queued_output``: a client that reads
  nothing while its frames provoke answers is cut off.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import h2

from sniport.deadlines import deadlines_for
from sniport.http.engine import WRITE_HIGH_WATER, App, Limits, RequestLogger, date_header
from sniport.http.exchange import ExchangeBase
from sniport.http.request import Body, ClientGone, Request
from sniport.logs import diag
from sniport.wire import h2 as wire
from sniport.wire.proxyheaders import HOP_BY_HOP

if TYPE_CHECKING:
    pass

def _engine() -> tuple[Callable[[wire.Limits], wire.Engine], str]:
    """The HTTP/2 engine: libnghttp2 (C framing and HPACK, about a third of the CPU per
    request of the pure-Python ``h2``: bench/h2_engines.py) when the system has it (every
    machine with curl does), else ``h2``. SNIPORT_H2_ENGINE=h2|nghttp2 forces one (tests,
    benchmarks)."""
    wanted = os.environ.get("SNIPORT_H2_ENGINE", "")
    if wanted != "h2":
        from sniport.wire import h2_nghttp2

        if h2_nghttp2.AVAILABLE:
            return h2_nghttp2.NgH2Server, f"libnghttp2 {h2_nghttp2.VERSION}"
        if wanted == "nghttp2":
            raise RuntimeError("SNIPORT_H2_ENGINE=nghttp2 but libnghttp2 is not installed")
    return wire.H2Server, f"h2 {h2.__version__} (pure Python)"


ENGINE, ENGINE_NAME = _engine()

# The transport's buffer before it asks us to pause: a few frames' worth more than on
# HTTP/1.1, since every stream shares it.
TRANSPORT_HIGH_WATER = 64 * 1024
STATUS = {s.value: str(s.value).encode() for s in HTTPStatus}
_BLOCKS: dict[bytes, list[tuple[bytes, bytes]]] = {}  # encoded header lines -> pairs
_NOT_SENT = HOP_BY_HOP | {b"content-length"}


def _pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    """``Name: value\\r\\n`` lines (a route's headers, a handler's cached ones) as HTTP/2
    fields with lower-case names (RFC 9113 section 8.2.1); parsed once per block."""
    pairs = _BLOCKS.get(block)
    if pairs is None:
        if len(_BLOCKS) >= 1024:
            _BLOCKS.clear()
        pairs = []
        for line in block.split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                pairs.append((name.strip().lower(), value.strip()))
        _BLOCKS[block] = pairs
    return pairs


class H2Stream(ExchangeBase):
    """One request and its response on an HTTP/2 connection (the contract's ``Exchange``)."""

    __slots__ = (
        "_body_paused",
        "_end_pending",
        "_pending",
        "_pending_size",
        "_unacked",
        "conn",
        "flushed",
        "stream_id",
    )

    def __init__(self, conn: H2Connection, stream_id: int, request: Request) -> None:
        super().__init__(request, False)  # (close_after is an HTTP/1.1 notion: streams go on)
        self.conn = conn
        self.stream_id = stream_id
        self.flushed = False  # END_STREAM (or RST_STREAM) went out
        self._pending: collections.deque[bytes | memoryview] = collections.deque()
        self._pending_size = 0
        self._end_pending = False
        self._body_paused = False
        self._unacked = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.loop

    # -- the head -------------------------------------------------------------------------

    def _fields(self, status: int, headers: list[tuple[str, str]], length: int | None,
                raw: list[tuple[bytes, bytes]] | None, block: bytes) -> list[tuple[bytes, bytes]]:
        self.status = status
        remove = self.remove_headers
        fields = [(b":status", STATUS.get(status) or str(status).encode())]
        if not remove or b"server" not in remove:
            fields.append((b"server", b"sniport"))
        fields.append((b"date", date_header()[6:-2]))
        for name, value in headers:
            lower = name.lower().encode("latin-1")
            if lower in _NOT_SENT or (remove and lower in remove):
                continue
            fields.append((lower, value.encode("latin-1")))
        if raw:
            for bname, bvalue in raw:
                lower = bname.lower()
                if lower in _NOT_SENT or (remove and lower in remove):
                    continue
                fields.append((lower, bvalue))
        if block:
            fields.extend(_pairs(block))
        if self.add_headers:
            fields.extend(_pairs(self.add_headers))
        # RFC 9110 section 8.6: no Content-Length in 1xx and 204; 304 keeps it silent.
        if length is not None and status >= 200 and status not in (204, 304):
            fields.append((b"content-length", str(length).encode()))
        return fields

    def _bodyless(self, status: int) -> bool:
        return self.is_head or status in (204, 304) or status < 200

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                block: bytes = b"") -> None:
        if self.head_sent or self.finished:
            self.abort()
            return
        conn = self.conn
        self.head_sent = True
        self.ttfb = time.monotonic()
        fields = self._fields(status, headers, len(body), None, block)
        if self._bodyless(status) or not body:
            conn.machine.send_headers(self.stream_id, fields, True)
            self.flushed = True
        elif not conn.machine.send_headers(self.stream_id, fields, False):
            self._gone()
        else:
            self.sent = len(body)
            self._queue(body)
            self._end_pending = True
            self._pump()
        self.finished = True
        conn.stream_done(self)

    def start(self, status: int, headers: list[tuple[str, str]], length: int | None,
              raw: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.head_sent or self.finished:
            self.abort()
            return
        self.head_sent = True
        self.ttfb = time.monotonic()
        end = self._bodyless(status) or length == 0
        if not self.conn.machine.send_headers(
                self.stream_id, self._fields(status, headers, length, raw, b""), end):
            self._gone()
        elif end:
            self.flushed = True
            self.is_head = True  # nothing more goes on this stream
        self.conn.flush()

    # -- the body -------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        if self.is_head or not data or self.finished or self.flushed:
            return
        self.sent += len(data)
        self._queue(data)
        self._pump()
        self.conn.flush()

    def _queue(self, data: bytes | memoryview) -> None:
        self._pending.append(data)
        self._pending_size += len(data)

    def _pump(self) -> None:
        """Send what the windows allow (RFC 9113 section 6.9); the rest waits for
        WINDOW_UPDATE."""
        machine = self.conn.machine
        sid = self.stream_id
        pending = self._pending
        while pending:
            window = machine.window(sid)
            if window <= 0:
                self.conn.window_blocked()
                return
            chunk = pending[0]
            if len(chunk) <= window:
                pending.popleft()
                self._pending_size -= len(chunk)
                last = self._end_pending and not pending
                if not machine.send_data(sid, chunk, last):
                    self._gone()
                    return
                if last:
                    self._end_pending = False
                    self.flushed = True
            else:
                if not machine.send_data(sid, chunk[:window], False):
                    self._gone()
                    return
                pending[0] = chunk[window:]
                self._pending_size -= window
        if self._end_pending:
            self._end_pending = False
            machine.end_stream(sid)
            self.flushed = True

    def _gone(self) -> None:
        """The stream can take nothing more (reset by the client, or the connection is
        ending): what waited is dropped, nothing more is sent on it."""
        self._pending.clear()
        self._pending_size = 0
        self._end_pending = False
        self.flushed = True
        self.note = self.note or "stream_gone"

    def window_opened(self) -> None:
        if self._pending or self._end_pending:
            self._pump()
            if self.flushed:
                self.conn.stream_flushed(self)
        if self.on_resume is not None and self.writable:
            self.on_resume()

    @property
    def writable(self) -> bool:
        conn = self.conn
        return (not conn.write_paused and self._pending_size < WRITE_HIGH_WATER
                and not self.flushed and conn.transport is not None
                and not conn.transport.is_closing())

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.flushed:
            if self._pending:
                self._end_pending = True
                self._pump()
            else:
                self.conn.machine.end_stream(self.stream_id)
                self.flushed = True
        self.conn.stream_done(self)

    def abort(self) -> None:
        """Something failed after the head went out: on HTTP/2 the honest end is a reset of
        this stream only (RFC 9113 section 8.1)."""
        if self.finished:
            return
        self.finished = True
        if not self.flushed:
            self._pending.clear()
            self._pending_size = 0
            self._end_pending = False
            self.conn.machine.reset(self.stream_id, wire.INTERNAL_ERROR)
            self.flushed = True
        self.conn.stream_done(self)

    # -- the request body (the Body's owner) ----------------------------------------------

    def send_continue(self) -> None:
        """RFC 9110 section 10.1.1 over HTTP/2: an interim HEADERS frame with :status 100."""
        if not self.head_sent and not self.flushed:
            self.conn.machine.send_headers(self.stream_id, [(b":status", b"100")], False)
            self.conn.flush()

    def pause_body(self) -> None:
        self._body_paused = True

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if self._unacked:
                n, self._unacked = self._unacked, 0
                self.conn.machine.ack(self.stream_id, n)
                self.conn.flush()

    def body_received(self, data: bytes, flow: int) -> None:
        body = self.request.body
        if body is not None:
            body.feed(data)
        if self._body_paused:
            self._unacked += flow
        else:
            self.conn.machine.ack(self.stream_id, flow)

    def upgrade(self, on_data: Callable[[bytes], None]) -> bytes:
        raise RuntimeError("no Upgrade on HTTP/2 (RFC 9113 section 8.6)")


class H2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2 (ALPN ``h2``), TLS terminated by the transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: App, limits: Limits,
                 h2limits: wire.Limits, log: RequestLogger, *, sni: str | None, client: str,
                 scheme: str, on_close: Callable[[str, int, int], None], client_ip: str = "",
                 max_queued_output: int = 1024 * 1024) -> None:
        self.loop = loop
        self.app = app
        self.limits = limits
        self.log = log
        self.sni = sni
        self.client = client
        self.client_ip = client_ip
        self.scheme = scheme
        self._on_close = on_close
        self._max_queued = max_queued_output
        self.machine = ENGINE(h2limits)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closing = False
        self.write_paused = False
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._corked = 0
        self._after_feed: list[Callable[[], None]] = []
        self._end_reason = "eof"
        self._deadlines = deadlines_for(loop)
        self._settle_due = False
        self.deadline = 0.0
        self.deadline_slot = 0
        self._deadline_kind = ""
        self._write_deadline = 0.0

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER,  # type: ignore[attr-defined]
                                          low=TRANSPORT_HIGH_WATER // 4)
        if not self.client:
            peer = transport.get_extra_info("peername")
            self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
            self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self.machine.initiate()
        self.flush()
        if self.closing:  # accepted before a drain began: one round, then the GOAWAY
            self.closing = False
            self.begin_drain()
        self._set_deadline("header", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.transport is None:
            return
        self._corked += 1
        try:
            events = self.machine.feed(data, self.loop.time())
            for ev in events:
                self._on_event(ev)
        finally:
            self.uncork()
        if self.transport is not None and not self.transport.is_closing():
            self._settle()

    def _on_event(self, ev: wire.Event) -> None:
        kind = type(ev)
        if kind is wire.BodyData:
            assert isinstance(ev, wire.BodyData)
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.body_received(ev.data, ev.flow)
            else:  # a stream already answered: its window still counts for the connection
                self.machine.ack(ev.stream_id, ev.flow)
        elif kind is wire.RequestHead:
            assert isinstance(ev, wire.RequestHead)
            self._request(ev)
        elif kind is wire.BodyEnd:
            assert isinstance(ev, wire.BodyEnd)
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.request.complete = True
                if stream.request.body is not None:
                    stream.request.body.finish()
                if stream.finished and stream.flushed:
                    self._forget(stream)
        elif kind is wire.WindowOpened:
            assert isinstance(ev, wire.WindowOpened)
            if ev.stream_id:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in list(self.streams.values()):
                    stream.window_opened()
        elif kind is wire.StreamReset:
            assert isinstance(ev, wire.StreamReset)
            stream = self.streams.pop(ev.stream_id, None)
            if stream is not None:
                stream.flushed = True
                self._abandon(stream, f"stream_reset_by_client: "
                              f"{wire.ERROR_NAMES.get(ev.code, ev.code)}")
        elif kind is wire.ConnectionEnded:
            assert isinstance(ev, wire.ConnectionEnded)
            self._connection_ended(ev)

    def _request(self, ev: wire.RequestHead) -> None:
        self.requests += 1
        req = Request(time.monotonic())
        req.version = "2.0"
        head = ev.head
        if isinstance(head, wire.HeadError):
            stream = H2Stream(self, ev.stream_id, req)
            self.streams[ev.stream_id] = stream
            stream.error(head.status, head.reason)
            return
        req.method = head.method
        req.target = head.target
        path, _, query = head.target.partition("?")
        req.path, req.query = path, query
        req.headers = head.headers
        req.content_length = head.content_length
        for name, value in head.headers:
            if name == b"expect":
                req.expect_continue = value.lower() == b"100-continue"
        stream = H2Stream(self, ev.stream_id, req)
        if ev.end_stream:
            req.complete = True
        else:
            req.body = Body(stream, req)
        self.streams[ev.stream_id] = stream
        try:
            self.app.handle(stream)
        except Exception as exc:  # a handler bug must cost one stream, not the worker
            diag.exception("handler failed on %s %s", req.method, req.target)
            stream.error(500, f"handler_error: {type(exc).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadlines.clear(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if not stream.finished:
                self._abandon(stream, "client_closed_mid_response")
        if exc is not None and self._end_reason == "eof" and not isinstance(
                exc, (BrokenPipeError, ConnectionResetError)):
            self._end_reason = f"error: {getattr(exc, 'strerror', None) or exc}"
        self.transport = None
        self._on_close(self._end_reason, self.bytes_in, self.bytes_out)

    def eof_received(self) -> bool | None:
        return None  # close our side too; open streams end in connection_lost

    def pause_writing(self) -> None:
        self.write_paused = True
        self._write_deadline = self.loop.time() + self._send_delay()
        self._rearm()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._write_deadline = 0.0
        for stream in list(self.streams.values()):
            if stream.on_resume is not None and stream.writable:
                stream.on_resume()
        self._rearm()

    # -- output ---------------------------------------------------------------------------

    def cork(self) -> None:
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked:
            if self._after_feed:
                callbacks, self._after_feed = self._after_feed, []
                for callback in callbacks:
                    callback()
            self.flush()
            if self._settle_due:
                self._settle()

    def after_feed(self, callback: Callable[[], None]) -> None:
        if self._corked:
            self._after_feed.append(callback)
        else:
            callback()

    def flush(self) -> None:
        """Write what the machine has queued, unless corked (then at ``uncork``)."""
        if self._corked:
            return
        data = self.machine.output()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            self.bytes_out += len(data)
            transport.write(data)
            if transport.get_write_buffer_size() > self._max_queued:
                # Frames keep coming that we must answer (PING, SETTINGS...) and nothing
                # is read: the client is flooding us, not slow.
                self._end_reason = "output_queue_full"
                transport.abort()

    # -- streams ending -------------------------------------------------------------------

    def stream_done(self, stream: H2Stream) -> None:
        """The handler of ``stream`` is done (the stream may still be sending)."""
        self.log.request(self, stream, time.monotonic())  # counted always, logged if on
        if stream.flushed:
            self.stream_flushed(stream)
        self.flush()

    def stream_flushed(self, stream: H2Stream) -> None:
        """END_STREAM (or a reset) went out for ``stream``."""
        if not stream.finished:
            return
        if not stream.request.complete:
            # The response is complete before the request: the client may stop sending
            # (RFC 9113 section 8.1, RST_STREAM with NO_ERROR).
            self.machine.reset(stream.stream_id, wire.NO_ERROR)
            if stream.request.body is not None:
                stream.request.body.drop()
        self._forget(stream)

    def _forget(self, stream: H2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if self._corked:  # the rest of the read may hold more streams: at uncork
            self._settle_due = True
        else:
            self._settle()

    def _settle(self) -> None:
        """After a GOAWAY of ours, the connection closes once its last stream is done."""
        self._settle_due = False
        if not self.streams and self.machine.goaway_sent:
            self._close("drain" if self.closing else "max_requests")
        elif self.transport is not None:
            self._rearm()

    def _abandon(self, stream: H2Stream, reason: str) -> None:
        """The client reset ``stream`` or left: its handler stops, its line is logged."""
        if stream.request.body is not None:
            stream.request.body.fail(ClientGone())
        if stream.finished:
            return
        stream.finished = True
        stream.note = stream.note or reason
        on_abort, stream.on_abort = stream.on_abort, None
        if on_abort is not None:
            on_abort()
        self.log.request(self, stream, time.monotonic())  # counted always, logged if on

    def _connection_ended(self, ev: wire.ConnectionEnded) -> None:
        if ev.by_client and self.machine.answerable:
            # The client will open no more streams; those it sent are still answered.
            self.closing = True
            if not self.streams:
                self._close("client_goaway")
            return
        if ev.by_client:
            # (The engine can answer nothing after the client's GOAWAY: the streams end.)
            streams, self.streams = self.streams, {}
            for stream in streams.values():
                self._abandon(stream, "client_goaway")
            self._close("client_goaway")
            return
        self._end_reason = ev.reason
        diag.info("http2: %s: %s (GOAWAY %s)", self.client, ev.reason,
                  wire.ERROR_NAMES.get(ev.code, ev.code))
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._abandon(stream, "connection_error")
        self._close(ev.reason)

    def _close(self, reason: str) -> None:
        if self._end_reason == "eof":
            self._end_reason = reason
        transport = self.transport
        self._corked = 0
        self.flush()
        if transport is not None and not transport.is_closing():
            transport.close()

    def begin_drain(self) -> None:
        """Graceful stop or reload: a GOAWAY naming the last stream that is answered."""
        if self.closing:
            return
        self.closing = True
        if self.transport is None:
            return  # connection_made sends it
        self.machine.goaway()
        if not self.streams:
            self._close("drain")
        else:
            self.flush()

    # -- deadlines ------------------------------------------------------------------------

    def _rearm(self) -> None:
        limits = self.limits
        if self.machine.header_block_open or not self.requests:
            # A header block cut short, or the preface and first request still to come.
            kind, delay = "header", limits.header_timeout
        elif not self.streams:
            kind, delay = "keepalive", limits.keepalive_timeout or limits.header_timeout
        else:
            kind, delay = "", 0.0
            for s in self.streams.values():
                if not s.request.complete and not s._body_paused and not s.finished:
                    kind, delay = "body", limits.header_timeout  # the client owes body bytes
                    break
                if s._pending:
                    kind, delay = "send", self._send_delay()  # it owes a WINDOW_UPDATE
        self._set_deadline(kind, delay)

    def _send_delay(self) -> float:
        # A client that stops reading (or stops opening its windows) gets as long as an
        # idle one, and never less than header_timeout, as on HTTP/1.1.
        return max(self.limits.keepalive_timeout, self.limits.header_timeout)

    def window_blocked(self) -> None:
        """A stream has data the client's windows do not let out: it owes a WINDOW_UPDATE
        (RFC 9113 section 6.9), within the time a client that stops reading gets."""
        if not self._deadline_kind:
            self._set_deadline("send", self._send_delay())

    def _set_deadline(self, kind: str, delay: float) -> None:
        self._deadline_kind = kind
        when = self.loop.time() + delay if kind else 0.0
        write = self._write_deadline
        if write and (not when or write < when):
            when = write
        if when:
            self._deadlines.set(self, when)
        else:
            self.deadline = 0.0

    def expired(self, now: float) -> None:
        """Deadlines' call: the connection's deadline has passed."""
        transport = self.transport
        if transport is None:
            return
        if self._write_deadline and now >= self._write_deadline:
            self._end_reason = "send_timeout"
            transport.abort()
            return
        kind = self._deadline_kind
        if not kind:
            return
        self._end_reason = f"{kind}_timeout"
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._abandon(stream, self._end_reason)
        self.machine.goaway()
        self._close(self._end_reason)

