"""HTTP/2 server connection, sans-IO: bytes in, events out, on the ``h2`` library.

Job: a small adapter of ours over python-hyper's ``h2`` (pinned to major 4), so that the
asyncio side (``http/h2conn.py``) sees only our events and our calls, and the engine can be
swapped for a measured alternative without touching the rest: ``feed(data, now)`` returns
events (``RequestHead``, ``BodyData``, ``BodyEnd``, ``StreamReset``, ``WindowOpened``,
``ConnectionEnded``); ``send_headers``/``send_data``/``end_stream``/``reset``/``ack``/
``goaway`` queue frames; ``output()`` takes the bytes to write. Also the request-head rule
(pseudo-headers to an HTTP request, ``request_head``) as one pure function.

Rules (RFC 9113 unless said otherwise):
- Malformed requests (section 8.1.1), an invalid pseudo-header or uppercase field name
  (section 8.2.1, 8.3), connection-specific fields (8.2.2), content-length that disagrees
  with the DATA (8.1.1), frames on closed streams, window overflow (6.9.1): ``h2`` raises
  and we end the connection with its error code (section 5.4: an endpoint may treat a
  stream error as a connection error). Nothing of another stream is answered after that.
- The request given to handlers is checked again by ``request_head``: no CR, LF, NUL, or a
  colon where it does not belong; ``te`` only as "trailers", then dropped; no
  transfer-encoding; cookie crumbs joined with "; " (section 8.2.3); ``:authority`` and a
  Host that disagrees are refused; the request then looks like an HTTP/1.1 one with a Host.
- Limits (the ``[server] http2_*`` keys): concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS;
  more is PROTOCOL_ERROR); header list size (SETTINGS_MAX_HEADER_LIST_SIZE, the same bound as
  HTTP/1.1's head); CONTINUATION frames per header block; streams per connection, then a
  graceful GOAWAY; new streams per read at most twice the concurrent limit (nginx's answer to
  rapid reset, CVE-2023-44487); resets sent *or* received, PINGs and SETTINGS each in a
  token bucket (MadeYouReset, CVE-2025-8671, and control-frame floods). Over a limit: GOAWAY
  ENHANCE_YOUR_CALM (section 7) and the connection ends.
- A graceful GOAWAY (reload, stop, max requests) names the last stream that will be
  answered; streams opened after it are refused (REFUSED_STREAM: the client retries them
  elsewhere, section 8.7) while those before it finish.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
from hyperframe.frame import ContinuationFrame, GoAwayFrame, RstStreamFrame

# Error codes, RFC 9113 section 7.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

ERROR_NAMES = {int(c): c.name for c in h2.errors.ErrorCodes}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``per`` seconds, bursts of ``count`` included (a token bucket)."""

    count: int
    per: float


@dataclass(frozen=True, slots=True)
class Limits:
    max_streams: int = 100
    max_requests: int = 1000
    max_header_list_size: int = 24 * 1024
    max_continuations: int = 8
    initial_window: int = 256 * 1024
    resets: Rate = Rate(200, 10.0)
    pings: Rate = Rate(50, 10.0)
    settings: Rate = Rate(50, 10.0)


class Bucket:
    """A token bucket on the caller's clock (sans-IO: ``now`` is passed in)."""

    __slots__ = ("_capacity", "_per_second", "_tokens", "_when")

    def __init__(self, rate: Rate) -> None:
        self._capacity = float(rate.count)
        self._per_second = rate.count / rate.per
        self._tokens = self._capacity
        self._when = 0.0

    def take(self, now: float, n: int = 1) -> bool:
        """Spend ``n`` tokens; False when there are not that many (over the rate)."""
        tokens = min(self._capacity, self._tokens + (now - self._when) * self._per_second)
        self._when = now
        if tokens < n:
            self._tokens = tokens
            return False
        self._tokens = tokens - n
        return True


# -- events ------------------------------------------------------------------------------


@dataclass(slots=True)
class Head:
    """A request head in HTTP/1.1 terms: what ``request_head`` makes of the pseudo-headers."""

    method: str
    target: str  # :path
    scheme: str
    headers: list[tuple[bytes, bytes]]  # lower-case names, Host first (from :authority)
    content_length: int | None


@dataclass(slots=True)
class HeadError:
    status: int  # the status to answer on this stream
    reason: str


@dataclass(slots=True)
class RequestHead:
    stream_id: int
    head: Head | HeadError
    end_stream: bool  # no body follows


@dataclass(slots=True)
class BodyData:
    stream_id: int
    data: bytes
    flow: int  # flow-controlled length (padding included): give it back with ``ack``


@dataclass(slots=True)
class BodyEnd:
    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The client reset the stream (or the stream ended with an error)."""

    stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """More may be sent: on ``stream_id``, or on every stream when it is 0."""

    stream_id: int


@dataclass(slots=True)
class ConnectionEnded:
    """The connection is over: a GOAWAY was sent (an error of the client) or received.
    ``last_stream_id``: streams above it will not be answered."""

    code: int
    reason: str
    last_stream_id: int
    by_client: bool = False


Event = RequestHead | BodyData | BodyEnd | StreamReset | WindowOpened | ConnectionEnded


class Engine(Protocol):
    """What ``http/h2conn.py`` drives: ``H2Server`` here (python-hyper's ``h2``) or
    ``h2_nghttp2.NgH2Server`` (libnghttp2). Sending calls return False when the stream (or
    the connection) takes nothing more."""

    limits: Limits
    requests: int
    goaway_sent: bool
    last_stream_id: int
    ended: bool

    @property
    def header_block_open(self) -> bool: ...
    @property
    def answerable(self) -> bool: ...
    def initiate(self) -> None: ...
    def feed(self, data: bytes, now: float) -> list[Event]: ...
    def output(self) -> bytes: ...
    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> bool: ...
    def window(self, stream_id: int) -> int: ...
    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> bool: ...
    def end_stream(self, stream_id: int) -> bool: ...
    def reset(self, stream_id: int, code: int) -> None: ...
    def ack(self, stream_id: int, n: int) -> None: ...
    def stream_open(self, stream_id: int) -> bool: ...
    def goaway(self, last_stream_id: int | None = None, code: int = NO_ERROR) -> int: ...


class _Calm(h2.exceptions.ProtocolError):
    """A limit of ours: the connection ends with ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        # Set on the instance, not as a class attribute: compiled with mypyc, a class
        # attribute overriding one of a class from an uncompiled library is not seen by h2,
        # which reads ``error_code`` to write its GOAWAY.
        self.error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer with our CONTINUATION limit (h2's own is a module constant, 64)."""

    max_continuations = 8

    def _update_header_buffer(self, f: Any) -> Any:
        if (self._headers_buffer and isinstance(f, ContinuationFrame)
                and len(self._headers_buffer) > self.max_continuations):
            raise _Calm(f"more than {self.max_continuations} CONTINUATION frames")
        return super()._update_header_buffer(f)


class _Connection(h2.connection.H2Connection):
    """h2's connection, counting the RST_STREAM frames it sends on its own (stream errors
    the client provoked: MadeYouReset, CVE-2025-8671), which raise no event."""

    resets_sent = 0

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        if frames and type(frames[0]) is RstStreamFrame:
            self.resets_sent += 1
        super()._prepare_for_sending(frames)


_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # Outbound headers are built by us (lower-case names, checked values): h2 need not
    # check or rewrite them again on every response.
    validate_outbound_headers=False, normalize_outbound_headers=False,
    # (h2's inbound normalising joins cookie crumbs at the end; request_head joins them
    # where the first was, as an HTTP/1.1 client sends them.)
    validate_inbound_headers=True, normalize_inbound_headers=False,
)
_S = h2.settings.SettingCodes


class H2Server:
    """One server-side HTTP/2 connection."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        conn = self._conn = _Connection(config=_CONFIG)
        buffer = _FrameBuffer(server=True)
        buffer.max_continuations = limits.max_continuations
        conn.incoming_buffer = buffer
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            _S.MAX_CONCURRENT_STREAMS: limits.max_streams,
            _S.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            _S.INITIAL_WINDOW_SIZE: limits.initial_window,
            _S.ENABLE_PUSH: 0,
        })
        conn.decoder.max_header_list_size = limits.max_header_list_size
        self._out = bytearray()
        self._resets = Bucket(limits.resets)
        self._pings = Bucket(limits.pings)
        self._settings = Bucket(limits.settings)
        self.requests = 0  # streams opened by the client
        self.goaway_sent = False
        self.last_stream_id = 0  # the last stream answered, once a GOAWAY went out
        self.ended = False
        self._resets_counted = 0

    # -- input ----------------------------------------------------------------------------

    def initiate(self) -> None:
        """Our preface: the SETTINGS frame (RFC 9113 section 3.4)."""
        self._conn.initiate_connection()
        # The connection window starts at 65535 whatever SETTINGS say (section 6.9.2): open
        # it to the same size as a stream's, so one upload does not stall the others.
        self._conn.increment_flow_control_window(self.limits.initial_window)

    def feed(self, data: bytes, now: float) -> list[Event]:
        if self.ended:
            return []
        conn = self._conn
        try:
            raw: list[Any] = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                # (A bad preface fails before h2 queues its GOAWAY: the client still hears
                # why, RFC 9113 section 3.4.)
                conn.close_connection(exc.error_code)
            return [self._ended(int(exc.error_code), _reason(exc))]
        events: list[Event] = []
        new_streams = 0
        for ev in raw:
            kind = type(ev)
            if kind is h2.events.RequestReceived:
                sid = ev.stream_id
                new_streams += 1
                self.requests += 1
                if self.goaway_sent and sid > self.last_stream_id:
                    # After our GOAWAY: not processed, the client may retry it (section 6.8).
                    self._conn.reset_stream(sid, REFUSED_STREAM)
                    continue
                events.append(RequestHead(sid, request_head(ev.headers),
                                          ev.stream_ended is not None))
                if self.requests >= self.limits.max_requests and not self.goaway_sent:
                    self.goaway(sid)
            elif kind is h2.events.DataReceived:
                events.append(BodyData(ev.stream_id, ev.data, ev.flow_controlled_length))
                if ev.stream_ended is not None:
                    events.append(BodyEnd(ev.stream_id))
            elif kind is h2.events.StreamEnded:
                # (DataReceived and RequestReceived carry their own StreamEnded, above.)
                pass
            elif kind is h2.events.TrailersReceived:
                # Trailer fields are not passed on (the proxy sends none upstream).
                if ev.stream_ended is not None:
                    events.append(BodyEnd(ev.stream_id))
            elif kind is h2.events.StreamReset:
                events.append(StreamReset(ev.stream_id, int(ev.error_code)))
                if ev.remote_reset and not self._resets.take(now):
                    return [*events, self._calm("too many stream resets")]
            elif kind is h2.events.WindowUpdated:
                events.append(WindowOpened(ev.stream_id))
            elif kind is h2.events.RemoteSettingsChanged:
                if not self._settings.take(now):
                    return [*events, self._calm("too many SETTINGS frames")]
                if _S.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    events.append(WindowOpened(0))
            elif kind is h2.events.PingReceived:
                if not self._pings.take(now):
                    return [*events, self._calm("too many PING frames")]
            elif kind is h2.events.ConnectionTerminated:
                self.ended = True
                events.append(ConnectionEnded(int(ev.error_code), "client_goaway",
                                              ev.last_stream_id or 0, by_client=True))
            # Others (SettingsAcknowledged, PriorityUpdated, PingAckReceived,
            # UnknownFrameReceived, ...) need nothing from us.
        if new_streams > 2 * self.limits.max_streams:
            # Streams opened and reset within one read never count as concurrent: this
            # bounds the work one read can cause (nginx's answer to rapid reset).
            return [*events, self._calm("too many new streams in one read")]
        sent = self._conn.resets_sent
        if sent != self._resets_counted:
            n, self._resets_counted = sent - self._resets_counted, sent
            if not self._resets.take(now, n):
                return [*events, self._calm("too many stream errors")]
        return events

    def _calm(self, reason: str) -> ConnectionEnded:
        self._conn.close_connection(ENHANCE_YOUR_CALM)
        return self._ended(ENHANCE_YOUR_CALM, reason)

    def _ended(self, code: int, reason: str) -> ConnectionEnded:
        self.ended = True
        return ConnectionEnded(code, reason, self._conn.highest_inbound_stream_id)

    @property
    def header_block_open(self) -> bool:
        """A HEADERS frame arrived whose block is not complete (CONTINUATION frames due):
        the caller times it out, as a request head that stops arriving."""
        return bool(self._conn.incoming_buffer._headers_buffer)

    # -- output ---------------------------------------------------------------------------

    def output(self) -> bytes:
        """The bytes to write now (empty when there are none)."""
        data = self._conn.data_to_send()
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
        return data

    # The sending calls return False when the stream (or the connection) can take nothing
    # more: the client reset it or sent GOAWAY meanwhile. The caller drops what it had.
    _GONE = (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError,
             h2.exceptions.ProtocolError)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> bool:
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end_stream)
        except self._GONE:
            return False
        return True

    def window(self, stream_id: int) -> int:
        """How many body bytes may be sent on ``stream_id`` now (0 if it is gone)."""
        try:
            return self._conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, KeyError):
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> bool:
        """``data`` must fit the window (``window``); it is cut to the peer's frame size."""
        conn = self._conn
        size = conn.max_outbound_frame_size
        view = memoryview(data)
        try:
            while len(view) > size:
                conn.send_data(stream_id, view[:size])
                view = view[size:]
            conn.send_data(stream_id, view, end_stream=end_stream)
        except self._GONE:
            return False
        return True

    def end_stream(self, stream_id: int) -> bool:
        try:
            self._conn.end_stream(stream_id)
        except self._GONE:
            return False
        return True

    @property
    def answerable(self) -> bool:
        """Whether streams can still be answered. h2 sends nothing at all once the client's
        GOAWAY arrived (RFC 9113 section 6.8 would let the streams it names finish)."""
        return self._conn.state_machine.state is not h2.connection.ConnectionState.CLOSED

    def reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(*self._GONE):
            self._conn.reset_stream(stream_id, code)  # (already closed: nothing to reset)

    def ack(self, stream_id: int, n: int) -> None:
        """Give back ``n`` bytes of window: the body bytes were taken (RFC 9113 6.9)."""
        if n:
            # (A stream that is gone: h2 still gives back the connection's window.)
            with contextlib.suppress(*self._GONE):
                self._conn.acknowledge_received_data(n, stream_id)

    def stream_open(self, stream_id: int) -> bool:
        stream = self._conn.streams.get(stream_id)
        return stream is not None and not stream.closed

    def goaway(self, last_stream_id: int | None = None, code: int = NO_ERROR) -> int:
        """A graceful GOAWAY: streams up to ``last_stream_id`` (default: the highest opened)
        are still answered; later ones are refused. h2's own ``close_connection`` would end
        every stream at once, so the frame is made here."""
        if not self.goaway_sent:
            self.goaway_sent = True
            conn = self._conn
            self.last_stream_id = (conn.highest_inbound_stream_id if last_stream_id is None
                                   else last_stream_id)
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.last_stream_id
            frame.error_code = code
            self._out += conn.data_to_send() + frame.serialize()
        return self.last_stream_id



def _reason(exc: Exception) -> str:
    if isinstance(exc, _Calm):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"[:200]


# -- the request head --------------------------------------------------------------------

_PSEUDO_REQUEST = frozenset({b":method", b":scheme", b":authority", b":path"})
# Fields that need more than being passed on (the rest are appended as they are).
_SPECIAL = frozenset({b"te", b"transfer-encoding", b"connection", b"keep-alive",
                      b"proxy-connection", b"upgrade", b"cookie", b"host", b"content-length"})
# RFC 9110 section 5.1: field names are tokens (lower case in HTTP/2, RFC 9113 section
# 8.2.1). All names of a request are checked by one match over them joined with "\n".
_NAMES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*")
# :method is a token; :path and :authority hold no whitespace or control characters.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH_BAD = re.compile(rb"[\x00-\x20\x7f]")
_AUTHORITY_BAD = re.compile(rb"[\x00-\x20\x7f@/]")


def request_head(fields: list[tuple[bytes, bytes]]) -> Head | HeadError:
    """An HTTP/2 request's header list (as the engine decoded it) as a request in HTTP/1.1
    terms, or the status to answer on its stream. The engine's own checks are made again
    here: this head reaches HTTP/1.1 upstreams, and must not carry what HTTP/1.1 would read
    differently (request smuggling through a downgrade). Names and values are checked in
    bulk (one regular expression, three substring searches): this runs for every request."""
    method = scheme = authority = path = b""
    regular: list[tuple[bytes, bytes]] = []
    for field in fields:
        name = field[0]
        if name[:1] != b":":
            regular.append(field)
            continue
        if name not in _PSEUDO_REQUEST:
            return HeadError(400, f"bad_pseudo_header: {name[:40]!r}")
        if name == b":method":
            method = field[1]
        elif name == b":scheme":
            scheme = field[1]
        elif name == b":authority":
            authority = field[1]
        else:
            path = field[1]
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    if regular:
        if _NAMES.fullmatch(b"\n".join([f[0] for f in regular])) is None:
            bad = next((n for n, _ in regular if _NAMES.fullmatch(n) is None), b"")
            return HeadError(400, f"bad_field_name: {bad[:40]!r}")
        values = b"".join([f[1] for f in regular])
        if b"\r" in values or b"\n" in values or b"\x00" in values:
            bad = next(n for n, v in regular if b"\r" in v or b"\n" in v or b"\x00" in v)
            return HeadError(400, f"bad_field_value: {bad[:40]!r}")
        cookies: list[bytes] = []
        cookie_at = 0
        host = b""
        for field in regular:
            name = field[0]
            if name not in _SPECIAL:
                headers.append(field)
                continue
            value = field[1]
            if name == b"cookie":
                if not cookies:  # the joined field goes where the first crumb was
                    headers.append((b"cookie", b""))
                    cookie_at = len(headers) - 1
                cookies.append(value)
            elif name == b"host":
                if host and host != value:
                    return HeadError(400, "repeated_host")
                host = value
            elif name == b"content-length":
                if not value.isdigit() or (length is not None and length != int(value)):
                    return HeadError(400, "bad_content_length")
                length = int(value)
                headers.append(field)
            elif name == b"te":
                if value.lower() != b"trailers":
                    return HeadError(400, "te_not_trailers")
            elif name == b"transfer-encoding":
                return HeadError(400, "transfer_encoding_in_http2")
            # connection, keep-alive, proxy-connection, upgrade: hop-by-hop, dropped
        if cookies:
            # RFC 9113 section 8.2.3: crumbs are joined with "; " before HTTP/1.1 sees them.
            headers[cookie_at] = (b"cookie", b"; ".join(cookies))
        if authority and host and authority != host:
            # RFC 9113 section 8.3.1: both name the target; two different ones are malformed.
            return HeadError(400, "authority_host_mismatch")
        authority = authority or host
    if not method or _METHOD.fullmatch(method) is None:
        return HeadError(400, "bad_method")
    if method == b"CONNECT":
        # Extended CONNECT (RFC 8441, WebSocket over HTTP/2) is not offered: SETTINGS do not
        # announce it, so a CONNECT here is a plain one, which a web server does not serve.
        return HeadError(405, "connect_not_supported")
    if not path or not scheme or _PATH_BAD.search(path) is not None:
        return HeadError(400, "bad_pseudo_header: :path or :scheme")
    if authority:
        if _AUTHORITY_BAD.search(authority) is not None:
            return HeadError(400, "bad_authority")
        headers.insert(0, (b"host", authority))
    return Head(method.decode("ascii"), path.decode("latin-1"),
                scheme.decode("ascii", "replace"), headers, length)
