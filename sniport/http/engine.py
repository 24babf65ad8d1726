"""The HTTP/1.1 server engine: one asyncio protocol per client connection, a thin driver
of the sans-IO machine in ``sniport/wire/h1.py``.

Job: feed the client's bytes to the machine, act on its events (a request head becomes an
``Exchange`` handed to the application, a site or the plain-HTTP redirector; body data feeds
the request's ``Body``; a protocol error is answered), and write responses in order, with
keep-alive, pipelining, streamed request bodies and backpressure both ways.

Rules:
- What the bytes mean is the machine's (house rule 8: httptools, there): framing, limits
  (414, 431, 505), 100-continue and Upgrade detection, which request comes next, and that
  none is read after the last. This module owns what takes time or a socket: deadlines,
  corking, lingering, the tunnel after an upgrade. header_timeout -> 408 and close.
- Pipelined requests are answered one at a time, in order: a request that arrives while
  another is answered waits, and reading pauses until its turn.
- Request bodies are streamed: reading pauses when the handler lags (bounded memory). A body
  that the handler did not read is read and dropped before the next request (nginx does the
  same); a connection being closed with unread input lingers briefly so the client sees the
  response rather than a reset.
- Once response bytes are out, an error closes the connection: never a second response
  (house rule 6).
- Every wait has a deadline: header_timeout (request head, and between body bytes),
  keepalive_timeout (idle between requests, and a client that stops reading).
- Writes are corked while a read from the client (or, for the proxy, from the upstream) is
  parsed: what it produces leaves as one TLS record and one send. A response after
  "Connection: close" is never produced (RFC 9112 section 9.6).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from sniport.deadlines import deadlines_for
from sniport.http.exchange import ExchangeBase
from sniport.http.request import Body, ClientGone, Request
from sniport.wire.h1 import (
    BodyData,
    H1Connection,
    MessageEnd,
    ProtocolError,
    RequestHead,
    State,
)
from sniport.wire.httprules import http_date

if TYPE_CHECKING:
    from sniport.http.contract import Connection
    from sniport.http.contract import Exchange as AnyExchange

WRITE_HIGH_WATER = 32 * 1024  # buffered response bytes after which a streaming handler waits
LINGER = 2.0  # seconds to read and drop input before closing after an error response
SERVER = b"sniport"

STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("ascii")
    return line


_date_second = -1
_date_header = b""


def date_header() -> bytes:
    """``Date: ...\\r\\n`` (RFC 9110 section 6.6.1), formatted once per second."""
    global _date_second, _date_header
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_header = b"Date: " + http_date(now).encode("ascii") + b"\r\n"
    return _date_header


class RequestLogger(Protocol):
    """Where a finished request's line goes (http/accesslog.py)."""

    enabled: bool

    def request(self, conn: Connection, ex: AnyExchange, now: float) -> None: ...


class App(Protocol):
    """What the engine serves: a site, or the plain-HTTP redirector."""

    def handle(self, ex: AnyExchange) -> None: ...


class Limits:
    """The connection timeouts of ``[server]``. ``keepalive_timeout = 0`` means no
    keep-alive: every response says "Connection: close" (nginx's ``keepalive_timeout 0``)."""

    __slots__ = ("header_timeout", "keepalive_timeout")

    def __init__(self, header_timeout: float, keepalive_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout


class Exchange(ExchangeBase):
    """One request and its response. Handlers answer through ``respond`` (all at once) or
    ``start`` + ``send``... + ``end`` (streamed)."""

    __slots__ = ("_chunked", "conn")

    def __init__(self, conn: HttpConnection, request: Request) -> None:
        super().__init__(request, not request.keep_alive or not conn.limits.keepalive_timeout)
        self.conn = conn
        self._chunked = False

    stream_id = 0  # HTTP/2's stream; none here

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.loop

    # -- writing --------------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[str, str]], length: int | None,
              raw: list[tuple[bytes, bytes]] | None = None, block: bytes = b"") -> bytes:
        self.status = status
        remove = self.remove_headers
        parts = [status_line(status)]
        if not remove or b"server" not in remove:
            parts.append(b"Server: sniport\r\n")
        parts.append(date_header())
        for name, value in headers:
            encoded = name.encode("latin-1")
            if remove and encoded.lower() in remove:
                continue
            parts.append(encoded + b": " + value.encode("latin-1") + b"\r\n")
        if raw:
            for bname, bvalue in raw:
                if remove and bname.lower() in remove:
                    continue
                parts.append(bname + b": " + bvalue + b"\r\n")
        if block:  # header lines encoded once by the handler (the caller checked remove)
            parts.append(block)
        if self.add_headers:
            parts.append(self.add_headers)
        if status == 101:  # the upgrade's own Connection/Upgrade are in the headers
            parts.append(b"\r\n")
            return b"".join(parts)
        # RFC 9110 section 8.6: no Content-Length in 1xx/204; 304 keeps the framing silent.
        if status >= 200 and status not in (204, 304):
            if length is not None:
                parts.append(b"Content-Length: %d\r\n" % length)
            elif self.request.version == "1.1" and not self.is_head:
                self._chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_after = True  # HTTP/1.0: the end of the body is the close
        if self.close_after or self.conn.closing:
            self.close_after = True
            parts.append(b"Connection: close\r\n")
        elif self.request.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                block: bytes = b"") -> None:
        """The whole response at once (Content-Length set here; no body for HEAD/304/204).
        ``block``: header lines already encoded, for handlers that send the same ones often;
        only when ``remove_headers`` is empty."""
        if self.head_sent:
            self.abort()
            return
        head = self._head(status, headers, len(body), None, block)
        self.head_sent = True
        self.ttfb = time.monotonic()
        if self.is_head or status in (204, 304) or status < 200:
            self.conn.write(head)
        else:
            self.conn.write(head + body)
            self.sent = len(body)
        self.end()

    def start(self, status: int, headers: list[tuple[str, str]], length: int | None,
              raw: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.head_sent:
            self.abort()
            return
        self.conn.write(self._head(status, headers, length, raw))
        self.head_sent = True
        self.ttfb = time.monotonic()

    def send(self, data: bytes | memoryview) -> None:
        if self.is_head or not data or self.finished:
            return
        self.sent += len(data)
        if self._chunked:
            self.conn.write(b"%x\r\n" % len(data) + bytes(data) + b"\r\n")
        else:
            self.conn.write(data)

    @property
    def writable(self) -> bool:
        """False while the client is not reading fast enough, or while what is corked is
        already a buffer's worth: stop and wait for ``on_resume`` (DESIGN.md: memory per
        slow client is bounded by buffers, never by the size of what is sent)."""
        conn = self.conn
        return not conn.write_paused and conn.wbuf_size < WRITE_HIGH_WATER \
            and conn.transport is not None and not conn.transport.is_closing()

    def end(self) -> None:
        if self.finished:
            return
        if self._chunked:
            self.conn.write(b"0\r\n\r\n")
        self.finished = True
        self.conn.exchange_done(self)

    def abort(self) -> None:
        """Something failed after the head went out: the only honest end is a close."""
        if not self.finished:
            self.finished = True
            self.close_after = True
            self.conn.exchange_done(self, aborted=True)

    # -- helpers for handlers -------------------------------------------------------------

    def pause_body(self) -> None:
        """Stop reading the request body (whoever takes it is full)."""
        self.conn.pause_body()

    def resume_body(self) -> None:
        self.conn.resume_body()

    def upgrade(self, on_data: Callable[[bytes], None]) -> bytes:
        """After a 101: the client's bytes go to ``on_data`` from now on; returns those that
        came after the Upgrade request's head."""
        conn = self.conn
        conn.upgraded_to = on_data
        data = conn.take_upgrade_buffer()
        conn.tunnel_ready()
        return data


class HttpConnection(asyncio.Protocol):
    """One client connection (TLS already terminated by the transport, or plain HTTP)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: App, limits: Limits,
                 log: RequestLogger, *, sni: str | None, client: str, scheme: str,
                 on_close: Callable[[str, int, int], None], client_ip: str = "") -> None:
        self.loop = loop
        self.app = app
        self.limits = limits
        self.log = log
        self.sni = sni
        self.client = client
        self.client_ip = client_ip
        self.scheme = scheme
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        # The protocol: what the client's bytes mean, and the connection's phase.
        self._h1 = H1Connection(time.monotonic)
        self._req: Request | None = None  # handed out, its body still arriving
        self.active: Exchange | None = None
        self.closing = False  # the next response says "Connection: close"
        self.write_paused = False
        # Why reading is paused: bit 1 the next request waits for the answer in progress,
        # bit 2 body backpressure, bit 8 an Upgrade head waits for its tunnel (or refusal).
        self._read_paused = 0
        self._pumping = False  # events are being taken (see _pump)
        self._read_deadline = 0.0  # 0: no read deadline (or suspended, see _read_kind)
        self._read_kind = ""  # what the client owes: header, body, keepalive, linger
        self._write_deadline = 0.0
        self._deadlines = deadlines_for(loop)
        self.deadline = 0.0  # the earlier of the two, as Deadlines sees it
        self.deadline_slot = 0
        self._lingering = False  # closing after a response: input is read and dropped
        self._end_reason = "eof"
        self._client_done = False  # the client ended its side (EOF or close_notify)
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.upgraded_to: Callable[[bytes], None] | None = None  # tunnel takes the bytes
        self._corked = 0
        self._wbuf: list[bytes] = []
        self.wbuf_size = 0
        self._after_feed: list[Callable[[], None]] = []

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        # uvloop's TLS transport buffers up to 512 KiB before it asks us to pause: a client
        # that stops reading would hold that much. nginx holds its output buffers (tens of
        # KiB); the kernel's socket buffer is still there to keep a fast client busy.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER,  # type: ignore[attr-defined]
                                          low=WRITE_HIGH_WATER // 4)
        if not self.client:
            peer = transport.get_extra_info("peername")
            self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
            self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self._set_read_deadline("header", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._lingering:
            return
        if self.upgraded_to is not None:
            self.upgraded_to(data)
            return
        self._corked += 1  # the answers to what this data holds leave in one write
        try:
            self._h1.feed(data)
            self._pump()
        finally:
            self.uncork()
        if self._upgrade_waits():
            # An Upgrade head: what follows is the new protocol's, and nobody takes it until
            # the upstream has answered 101. Reading waits, so the bytes held meanwhile are
            # one read's worth, not whatever the client sends (the tunnel resumes it).
            self._pause_reading(8)

    def _upgrade_waits(self) -> bool:
        # An Upgrade head was read and nobody has taken the connection over yet (a handler
        # may have, synchronously, while the data was pumped). A method of its own, as
        # _between_requests.
        return self._h1.state is State.UPGRADED and self.upgraded_to is None

    def cork(self) -> None:
        """Hold writes until ``uncork``: a response head and its body, or the answers to
        pipelined requests, go out as one TLS record and one send, not several."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked:
            if self._after_feed:
                callbacks, self._after_feed = self._after_feed, []
                for callback in callbacks:
                    callback()
            if self._wbuf:
                self._flush()
                # A streaming handler that stopped because the cork held a buffer's worth
                # goes on now, unless the transport itself asked us to pause.
                active = self.active
                if (active is not None and active.on_resume is not None
                        and not self.write_paused and self.transport is not None):
                    active.on_resume()

    def after_feed(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the data being parsed now is parsed to its end (at once if
        nothing is being parsed). A request failed meanwhile drops it."""
        if self._corked:
            self._after_feed.append(callback)
        else:
            callback()

    def _flush(self) -> None:
        wbuf = self._wbuf
        data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
        wbuf.clear()
        self.wbuf_size = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        """Close after what is written (including anything corked) has gone out."""
        if self._wbuf:
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        self._end_reason = "eof"
        self._client_done = True
        if self.active is not None and self.active.request.body is not None:
            self.active.request.body.fail(ClientGone())
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_deadline = self._write_deadline = 0.0
        self._deadlines.clear(self)
        active, self.active = self.active, None
        if active is not None and not active.finished:
            active.finished = True
            if active.request.body is not None:
                active.request.body.fail(ClientGone())
            if active.on_abort is not None:
                active.on_abort()
            if self._end_reason == "eof":
                self._end_reason = "client_closed_mid_response"
            self._log(active)
        if exc is not None and self._end_reason == "eof" and not (
                self._client_done and isinstance(exc, (BrokenPipeError, ConnectionResetError))):
            # (A client that has closed its side makes our close_notify fail with EPIPE on
            # a unix socket, and often ECONNRESET on TCP: that is still its normal end.)
            self._end_reason = f"error: {getattr(exc, 'strerror', None) or exc}"
        self._on_close(self._end_reason, self.bytes_in, self.bytes_out)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._set_write_deadline()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._write_deadline = 0.0
        active = self.active
        if active is not None and active.on_resume is not None:
            active.on_resume()

    # -- the machine's events --------------------------------------------------------------

    def _pump(self) -> None:
        """Act on the machine's events, in order, as far as they are due (the next request
        waits for the answer in progress: ``_next`` pumps again)."""
        if self._pumping:
            return  # an answer given while an event is handled: the loop below goes on
        self._pumping = True
        h1 = self._h1
        try:
            while not self._lingering:
                event = h1.next_event()
                if event is None:
                    break
                cls = event.__class__
                if cls is BodyData:
                    self._on_body(event.data)  # type: ignore[union-attr]
                elif cls is RequestHead:
                    self._on_head(event)  # type: ignore[arg-type]
                elif cls is MessageEnd:
                    self._on_message_end()
                else:
                    self._on_error(event)  # type: ignore[arg-type]
        finally:
            self._pumping = False
        if h1.blocked:
            self._pause_reading(1)
        elif self._read_paused & 1:
            self._resume_reading(1)
        if h1.state is State.HEAD and self._read_kind != "header":
            # A head has begun: the client owes the rest within header_timeout.
            self._set_read_deadline("header", self.limits.header_timeout)

    def _on_head(self, head: RequestHead) -> None:
        req = Request(head.start)
        req.method = head.method
        req.target = head.target
        req.path = head.path
        req.query = head.query
        req.version = head.version
        req.headers = head.headers
        req.keep_alive = head.keep_alive
        req.upgrade = head.upgrade
        req.content_length = head.content_length
        req.chunked = head.chunked
        req.expect_continue = head.expect_continue
        self._req = req
        if head.has_body:
            req.body = Body(self, req)
            self._set_read_deadline("body", self.limits.header_timeout)
        else:
            self._clear_read_deadline()
        self._start(req)

    def _on_body(self, chunk: bytes) -> None:
        req = self._req
        if req is not None and req.body is not None:
            req.body.feed(chunk)
            if self._read_kind == "body":
                self._read_deadline = self.loop.time() + self.limits.header_timeout

    def _on_message_end(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        req.complete = True
        if req.body is not None:
            req.body.finish()
            if self._read_kind == "body":
                self._clear_read_deadline()
        active = self.active
        if active is not None and active.request is req and active.finished:
            self._next()  # the response went out before the body had all arrived

    def _on_error(self, error: ProtocolError) -> None:
        if error.in_body and self._req is not None:
            self._fail_request(error.status, error.reason, self._req)
            return
        req = Request(time.monotonic())
        req.target = error.target
        self._answer_error(error.status, error.reason, req)

    # -- requests and responses -----------------------------------------------------------

    def _start(self, req: Request) -> None:
        ex = Exchange(self, req)
        self.active = ex
        self.requests += 1
        try:
            self.app.handle(ex)
        except Exception as exc:  # a handler bug must cost one request, not the worker
            from sniport.logs import diag

            diag.exception("handler failed on %s %s", req.method, req.target)
            ex.error(500, f"handler_error: {type(exc).__name__}")

    def exchange_done(self, ex: Exchange, aborted: bool = False) -> None:
        self._log(ex)
        if aborted:
            self._end_reason = ex.note or "aborted_mid_response"
            self.closing = True
            self.active = None
            self._h1.close()
            assert self.transport is not None
            self.transport.abort() if ex.head_sent else self._close()
            return
        if ex.close_after or self.closing:
            self.closing = True
            self.active = None
            self._linger_close(ex.note or "close_requested")
            return
        req = ex.request
        if req.upgrade and self.upgraded_to is None:
            # An upgrade that was answered normally: the parser cannot go on after it.
            self.active = None
            self._linger_close("upgrade_refused")
            return
        if not req.complete:
            # The response is out before the request body: read and drop the rest, then go
            # on with the next request (on_message_complete calls _next). Without a body the
            # message completes as soon as this callback returns.
            if req.body is not None:
                req.body.drop()
                self._set_read_deadline("body", self.limits.header_timeout)
            return
        self._next()

    def _next(self) -> None:
        """The answer and its request are both complete: on with the next request (the
        machine held it, or a protocol error after it, until now)."""
        self.active = None
        self._h1.response_done()
        self._pump()
        if self._between_requests():
            self._set_read_deadline("keepalive", self.limits.keepalive_timeout)

    def _between_requests(self) -> bool:
        # A method of its own: read right after ``self.active = None`` and a call that may
        # set it, the check would be typed by that assignment (mypy narrows attributes
        # across calls), and the compiled build checks types at run time.
        return self.active is None and self._h1.state is State.IDLE and not self._lingering

    def _fail_request(self, status: int, reason: str, req: Request) -> None:
        """Bad bytes in the body of ``req``, the request being answered. Nothing after them
        is read as a request. ``req`` gets ``status`` if nothing of its response is on the
        wire yet, else the connection closes (the only honest end)."""
        self._end_reason = reason
        self.closing = True
        active = self.active
        if active is None or active.request is not req:
            self._answer_error(status, reason, req)  # its answer was complete already
            return
        self._after_feed.clear()  # the handler's own, for this request
        if active.on_abort is not None:
            # The handler drops what it holds (an upstream connection that got part of
            # this request) and sends nothing more; the answer is the 400 below.
            on_abort, active.on_abort = active.on_abort, None
            on_abort()
        if not active.head_sent and not active.finished:
            active.close_after = True
            active.error(status, reason)
        elif self.transport is not None:
            self._close()  # a response is under way: only a close is honest

    def _answer_error(self, status: int, reason: str, req: Request) -> None:
        self._end_reason = reason
        self.closing = True
        ex = Exchange(self, req)
        ex.close_after = True
        ex.note = reason
        self.active = ex
        ex.error(status)

    def _linger_close(self, reason: str) -> None:
        """Close after the response; keep reading (and dropping) for a moment so that unread
        input does not turn the close into a reset that destroys the response."""
        if self._end_reason in ("eof", ""):
            self._end_reason = reason
        self._lingering = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._read_paused:
            self._read_paused = 0
            transport.resume_reading()
        if not self._h1.close():
            self._close()  # nothing of the client's is left unread
            return
        req = self._req
        if req is not None and req.body is not None:
            req.body.drop()
        self._set_read_deadline("linger", LINGER)

    def begin_drain(self) -> None:
        """Graceful stop: a busy connection closes after its response, an idle keep-alive
        one now (its client retries elsewhere, RFC 9112 section 9.3.1.1). A connection that
        has not sent its first request yet gets it answered, with "Connection: close": its
        client has nothing to retry on (bounded by header_timeout and drain_timeout)."""
        self.closing = True
        if (self.active is None and self._h1.state is not State.HEAD
                and self._h1.state is not State.BODY and self.requests
                and self.transport is not None):
            self._end_reason = "drain"
            self._close()

    def tunnel_ready(self) -> None:
        """The tunnel takes the client's bytes from now on: reading goes on."""
        self._resume_reading(8)

    def take_upgrade_buffer(self) -> bytes:
        """The client's bytes after an Upgrade request's head, for the tunnel."""
        return self._h1.take_upgrade_bytes()

    def send_continue(self) -> None:
        if self.active is not None and not self.active.head_sent:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.bytes_out += len(data)
        if self._corked:
            self._wbuf.append(bytes(data) if isinstance(data, memoryview) else data)
            self.wbuf_size += len(data)
            return
        transport.write(data)

    def _log(self, ex: Exchange) -> None:
        self.log.request(self, ex, time.monotonic())  # counted always, logged if on

    # -- flow control and deadlines -------------------------------------------------------

    def pause_body(self) -> None:
        self._pause_reading(2)

    def resume_body(self) -> None:
        self._resume_reading(2)

    def _pause_reading(self, bit: int) -> None:
        if not self._read_paused:
            if self.transport is not None:
                self.transport.pause_reading()
            if self._read_kind in ("header", "body") and self._read_deadline:
                # We stopped reading: the client owes nothing until we read again.
                self._read_deadline = 0.0
                self._update_deadline()
        self._read_paused |= bit

    def _resume_reading(self, bit: int) -> None:
        if not self._read_paused & bit:
            return
        self._read_paused &= ~bit
        if not self._read_paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()
            if self._read_kind in ("header", "body") and not self._read_deadline:
                self._set_read_deadline(self._read_kind, self.limits.header_timeout)

    def _set_read_deadline(self, kind: str, delay: float) -> None:
        """The client owes us something (a head, body bytes) within ``delay``. While reading
        is paused by us (pipelined requests wait their turn, a handler lags behind the
        body) the client owes nothing: the deadline starts afresh when reading resumes."""
        self._read_kind = kind
        if self._read_paused and kind in ("header", "body"):
            self._read_deadline = 0.0  # suspended; _resume_reading sets it
            return
        when = self._read_deadline = self.loop.time() + delay
        if self._write_deadline:
            self._update_deadline()
        else:  # the common case, once or twice per request: one call, not two
            self._deadlines.set(self, when)

    def _clear_read_deadline(self) -> None:
        self._read_kind = ""
        self._read_deadline = 0.0
        if self._write_deadline:
            self._update_deadline()
        else:
            self.deadline = 0.0  # lazily: the entry of a live connection is looked at in its slot

    def _set_write_deadline(self) -> None:
        # A client that stops reading gets as long as an idle one (keepalive_timeout), and
        # never less than header_timeout (keepalive_timeout may be 0: no keep-alive).
        limits = self.limits
        self._write_deadline = self.loop.time() + max(limits.keepalive_timeout,
                                                      limits.header_timeout)
        self._update_deadline()

    def _update_deadline(self) -> None:
        read, write = self._read_deadline, self._write_deadline
        self._deadlines.set(self, read if not write or (read and read < write) else write)

    def expired(self, now: float) -> None:
        """Deadlines' call: the earlier of the read and write deadlines has passed."""
        if self.transport is None:
            return
        if self._write_deadline and now >= self._write_deadline:
            self._expire("send_timeout")
        elif self._read_deadline and now >= self._read_deadline:
            self._expire(f"{self._read_kind}_timeout")
        else:
            self._update_deadline()

    def _expire(self, reason: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if reason == "header_timeout":
            # RFC 9110 section 15.5.9: 408 for a request head that did not arrive in time
            # (after the answers to the requests before it, if any are under way).
            self._read_deadline = 0.0
            self._h1.fail(408, reason)  # answered in turn, after the answers before it
            self._pump()
            return
        if reason != "linger_timeout":
            self._end_reason = reason
        self.closing = True
        if reason == "linger_timeout":
            self._close()  # the reason stays the one that started the linger
        else:
            transport.abort()
