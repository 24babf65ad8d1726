"""HTTP/2 server connection, sans-IO, on the system's libnghttp2 through ``ctypes``.

Job: the same adapter as ``wire.h2.H2Server`` (same calls, same events, same limits), with
nghttp2's C framing and HPACK instead of the pure-Python ``h2``/``hpack``: the measured
alternative the issue asks for (bench/h2_engines.py). No compiler and no new dependency:
libnghttp2.so.14 is on every machine that has curl (Debian ``libnghttp2-14``).

Rules (RFC 9113 unless said otherwise; API names from nghttp2's ``nghttp2.h``):
- Memory safety first: a crash in C takes the whole worker down. Every length handed to C is
  the length of the Python object it points into; the data source copies at most the
  ``length`` nghttp2 gives it; no Python exception leaves a callback (it is recorded, the
  callback returns NGHTTP2_ERR_CALLBACK_FAILURE, and the connection ends with INTERNAL_ERROR);
  the CFUNCTYPE objects live at module level for the life of the process; the session is
  freed (``nghttp2_session_del``) when the adapter is collected, and never used after a
  fatal error (nghttp2: "the only allowed operation is nghttp2_session_del").
- Callbacks are module functions that reach the adapter through ``_ACTIVE``, set around each
  ``nghttp2_session_mem_recv``/``mem_send``: one event loop per process, no lookups (so an
  adapter is used from one thread only, as the worker does). Per
  request: on_begin_headers, one on_header per field, on_frame_recv, the data source read,
  on_stream_close. (ctypes callbacks cost about a microsecond each.)
- The same semantics as ``wire.h2``: malformed requests end the connection with
  PROTOCOL_ERROR (nghttp2 would reset only the stream; section 5.4 lets an endpoint treat a
  stream error as a connection error, and it is what the h2 engine does); other streams
  reset by nghttp2 itself (a client error) are ``StreamReset`` events and count in the reset
  bucket (MadeYouReset, CVE-2025-8671); the request head goes through ``wire.h2.request_head``.
- Output nghttp2 queues in answer to input (SETTINGS/PING ACKs, RST_STREAM, GOAWAY) is taken
  at the end of ``feed``: the streams that closes, and a GOAWAY of nghttp2's own (its
  connection errors), are known before ``feed`` returns its events. nghttp2 also ends a
  connection on its own when answers to PING/SETTINGS pile up unread (NGHTTP2_ERR_FLOODED,
  1000 queued ACKs): GOAWAY ENHANCE_YOUR_CALM, "flooded".
- Flow control: automatic WINDOW_UPDATE is off (``nghttp2_option_set_no_auto_window_update``):
  ``ack`` gives window back (``nghttp2_session_consume``) only once the body was taken.
  ``window`` is nghttp2's remote window less what this adapter holds but has not sent.
- Limits: SETTINGS_MAX_CONCURRENT_STREAMS is nghttp2's to enforce (section 5.1.2): a stream
  over it is refused (REFUSED_STREAM) until the client has acknowledged our SETTINGS, and ends
  the connection (PROTOCOL_ERROR) after; ``h2`` ends the connection in both cases. (Likewise
  a stream's receive window is 65,535 until that ACK, our larger one after it.) The check when
  a stream opens here is a backstop. The header list size is counted in on_header;
  CONTINUATION frames per block are capped by nghttp2 itself when the library has the
  CVE-2024-28182 fix (``nghttp2_option_set_max_continuations``, set to our limit), and
  counted in on_begin_frame otherwise; new streams per read, the reset/PING/SETTINGS buckets
  and max requests as in ``wire.h2``. Over a limit: GOAWAY ENHANCE_YOUR_CALM.
- A graceful GOAWAY (reload, stop, max requests) is written by this adapter, not submitted to
  nghttp2: nghttp2 silently ignores streams above a GOAWAY it sent, and we refuse them with
  REFUSED_STREAM (section 8.7) so that the client knows to retry them.
- Reasons in ``ConnectionEnded`` name the error the way the ``h2`` engine does (ProtocolError,
  FlowControlError, ...) so that log lines read the same whichever engine runs, followed by
  nghttp2's own words (its GOAWAY debug data) where it found the error.
"""

from __future__ import annotations

import collections
import ctypes
import struct
from typing import Any

from sniport.wire.h2 import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    BodyData,
    BodyEnd,
    Bucket,
    ConnectionEnded,
    Event,
    Limits,
    RequestHead,
    StreamReset,
    WindowOpened,
    request_head,
)
from sniport.wire.nghttp2_abi import (  # the ctypes declarations: not compiled (mypyc)
    AVAILABLE,
    BEGIN_FRAME_CB,
    CHUNK_CB,
    CLOSE_CB,
    ERROR2_CB,
    FRAME_CB,
    HEADER_CB,
    INVALID_CB,
    NV,
    READ_CB,
    VERSION,
    DataProvider,
    Goaway,
    Hd,
    Headers,
    RstStream,
    Settings,
    SettingsEntry,
    c_void_p,
    callbacks_new,
    conn_window,
    consume,
    fn,
    lib,
    mem_recv,
    mem_send,
    option_del,
    option_new,
    server_new,
    session_del,
    set_max_continuations,
    set_no_auto_window_update,
    stream_window,
    strerror,
    submit_data,
    submit_headers,
    submit_rst,
    submit_settings,
    submit_window_update,
    terminate,
    want_read,
)

__all__ = ["AVAILABLE", "VERSION", "NgH2Server"]

# Frame types, flags, categories, settings ids, library errors (nghttp2.h).
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9)
_FLAG_END_STREAM = 0x1
_FLAG_ACK = 0x1
_HCAT_REQUEST = 0
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
_DATA_FLAG_EOF = 0x1
_DATA_FLAG_NO_END_STREAM = 0x2
_ERR_DEFERRED = -508
_ERR_PAUSE = -526
_ERR_CALLBACK_FAILURE = -902
_ERR_BAD_CLIENT_MAGIC = -903
_ERR_FLOODED = -904
_ERR_TOO_MANY_CONTINUATIONS = -905
_ERR_FATAL = -900
_BUG_ERRORS = frozenset({-501, -529})  # NGHTTP2_ERR_INVALID_ARGUMENT, NGHTTP2_ERR_DATA_EXIST

# A library that caps CONTINUATION frames itself (the CVE-2024-28182 fix, 1.61.0 upstream,
# backported by Debian to 1.52.0-1+deb12u2).
LIBRARY_CAPS_CONTINUATIONS = AVAILABLE and set_max_continuations is not None

_CATEGORY = {0x1: "ProtocolError", 0x2: "InternalError", 0x3: "FlowControlError",
             0x4: "SettingsTimeout", 0x5: "StreamClosedError", 0x6: "FrameTooLargeError",
             0x7: "RefusedStream", 0x8: "Cancel", 0x9: "CompressionError",
             0xB: "DenialOfServiceError"}


# -- per stream --------------------------------------------------------------------------


class _Stream:
    """What the adapter keeps per open stream: the header block being read, the body bytes
    queued for nghttp2's data source, and how the stream ends."""

    __slots__ = ("announced", "client_reset", "content_length", "end", "fields", "max_size",
                 "out", "out_size", "providing", "refused", "reset_by_us", "size", "trailers")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.fields: list[tuple[bytes, bytes]] | None = []
        self.size = 0  # header list size (RFC 9113 section 6.5.2: name + value + 32)
        self.refused = False  # after our GOAWAY: answered with REFUSED_STREAM, no events
        self.announced = False  # a RequestHead went out for it
        self.trailers = False
        self.content_length: int | None = None
        self.out: collections.deque[bytes] = collections.deque()
        self.out_size = 0
        self.end = False  # END_STREAM after what is queued
        self.providing = False  # a data source is submitted for this stream
        self.reset_by_us = False
        self.client_reset = False


# -- callbacks ---------------------------------------------------------------------------
#
# Module functions, one CFUNCTYPE each, alive as long as the module. ``_ACTIVE`` is the
# adapter whose session is inside mem_recv/mem_send right now. A NULL pointer reaches a
# callback as None (ctypes' c_void_p), and user_data and the data source are always NULL
# here: typed ``int | None``, since the compiled module checks its arguments' types before
# a callback's body (and its try) even starts.

_ACTIVE: NgH2Server | None = None


def _failed(server: NgH2Server | None, exc: BaseException) -> int:
    if server is not None and server._fault is None:
        server._fault = f"{type(exc).__name__}: {exc}"[:200]
    return _ERR_CALLBACK_FAILURE


def _on_begin_headers(session: int, frame: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        if server._error is not None:
            return 0
        hdr = Headers.from_address(frame)
        sid = hdr.hd.stream_id
        server._block_open = True
        if hdr.cat != _HCAT_REQUEST:
            stream = server._streams.get(sid)
            server._current = stream
            if stream is not None:
                stream.trailers = True
                stream.fields = None  # trailer fields are not passed on
                stream.size = 0
            return 0
        return server._open_stream(sid)
    except BaseException as exc:
        return _failed(server, exc)


def _on_header(session: int, frame: int, name: bytes, namelen: int, value: bytes,
               valuelen: int, flags: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        stream = server._current  # type: ignore[union-attr]
        if stream is None or server._error is not None:  # type: ignore[union-attr]
            return 0
        stream.size += namelen + valuelen + 32
        if stream.size > stream.max_size:
            server._calm(f"DenialOfServiceError: Oversized header list (more than "  # type: ignore[union-attr]
                         f"{stream.max_size} bytes)")
            return _ERR_PAUSE
        if len(name) != namelen or len(value) != valuelen:
            # A NUL inside (nghttp2's HTTP checks refuse it before this): never cut short.
            server._calm("ProtocolError: NUL in a header field", PROTOCOL_ERROR)  # type: ignore[union-attr]
            return _ERR_PAUSE
        fields = stream.fields
        if fields is not None:
            fields.append((name, value))
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_frame_recv(session: int, frame: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        if server._error is not None:
            return 0
        server._block_open = False
        hd = Hd.from_address(frame)
        kind = hd.type
        sid = hd.stream_id
        if kind == _HEADERS:
            server._current = None
            stream = server._streams.get(sid)
            if stream is None or stream.refused:
                return 0
            end = bool(hd.flags & _FLAG_END_STREAM)
            if stream.trailers:
                if end:
                    server._events.append(BodyEnd(sid))
                return 0
            fields, stream.fields = stream.fields or [], None
            head = request_head(fields)
            stream.content_length = getattr(head, "content_length", None)
            stream.announced = True
            server._events.append(RequestHead(sid, head, end))
            limits = server.limits
            if server.requests >= limits.max_requests and not server.goaway_sent:
                server._goaway_now(sid)
        elif kind == _DATA:
            if hd.flags & _FLAG_END_STREAM:
                stream = server._streams.get(sid)
                if stream is not None and stream.announced:
                    server._events.append(BodyEnd(sid))
        elif kind == _WINDOW_UPDATE:
            server._events.append(WindowOpened(sid))
        elif kind == _RST_STREAM:
            code = RstStream.from_address(frame).error_code
            stream = server._streams.get(sid)
            if stream is not None:
                stream.client_reset = True
                if stream.announced:
                    server._events.append(StreamReset(sid, code))
            if not server._resets.take(server._now):
                server._calm("too many stream resets")
        elif kind == _SETTINGS:
            if not hd.flags & _FLAG_ACK:
                if not server._settings_bucket.take(server._now):
                    server._calm("too many SETTINGS frames")
                    return 0
                settings = Settings.from_address(frame)
                # (nghttp2 bounds niv: NGHTTP2_DEFAULT_MAX_SETTINGS, 32 entries.)
                for i in range(min(settings.niv, 64)):
                    if settings.iv[i].settings_id == _SETTINGS_INITIAL_WINDOW_SIZE:
                        server._events.append(WindowOpened(0))
                        break
        elif kind == _PING:
            if not hd.flags & _FLAG_ACK and not server._pings.take(server._now):
                server._calm("too many PING frames")
        elif kind == _GOAWAY:
            goaway = Goaway.from_address(frame)
            server.ended = True
            server._events.append(ConnectionEnded(goaway.error_code, "client_goaway",
                                                  max(goaway.last_stream_id, 0),
                                                  by_client=True))
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_data_chunk(session: int, flags: int, sid: int, data: int, length: int,
                   user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        if server._error is not None:
            return 0
        server._block_open = False
        stream = server._streams.get(sid)
        if stream is None or not stream.announced:
            # (Refused, or reset: the connection's window is still given back.)
            consume(session, sid, length)
            return 0
        server._events.append(BodyData(sid, ctypes.string_at(data, length), length))
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_stream_close(session: int, sid: int, code: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        stream = server._streams.pop(sid, None)
        if stream is None:
            return 0
        if stream is server._current:
            server._current = None
        server._unsent -= stream.out_size
        if stream.refused:
            server._refused_open -= 1
        if (code != NO_ERROR and not stream.reset_by_us and not stream.client_reset
                and not stream.refused):
            # nghttp2 reset the stream on its own: an error of the client's.
            server._library_resets.append((sid, code, stream))
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_invalid_frame(session: int, frame: int, lib_error: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        if server._detail is None:
            server._detail = (strerror(lib_error) or b"").decode("ascii", "replace")
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_error(session: int, lib_error: int, msg: int, length: int, user_data: int | None) -> int:
    server = _ACTIVE
    try:
        assert server is not None
        if server._detail is None:
            server._detail = ctypes.string_at(msg, min(length, 200)).decode("ascii", "replace")
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _on_begin_frame(session: int, hd_ptr: int, user_data: int | None) -> int:
    """Only with a library that does not cap CONTINUATION frames itself."""
    server = _ACTIVE
    try:
        assert server is not None
        hd = Hd.from_address(hd_ptr)
        if hd.type == _CONTINUATION:
            server._continuations += 1
            if server._continuations > server.limits.max_continuations:
                server._calm(f"more than {server.limits.max_continuations} "
                             f"CONTINUATION frames")
        else:
            server._continuations = 0
        return 0
    except BaseException as exc:
        return _failed(server, exc)


def _read_body(session: int, sid: int, buf: int, length: int, data_flags: int,
               source: int | None, user_data: int | None) -> int:
    """The data source of every stream: copies at most ``length`` queued bytes to ``buf``."""
    server = _ACTIVE
    try:
        assert server is not None
        stream = server._streams.get(sid)
        if stream is None:
            ctypes.c_uint32.from_address(data_flags).value = _DATA_FLAG_EOF
            return 0
        out = stream.out
        n = 0
        while out and n < length:
            chunk = out[0]
            take = min(len(chunk), length - n)
            if take == len(chunk):
                out.popleft()
            else:
                out[0] = chunk[take:]
                chunk = chunk[:take]
            ctypes.memmove(buf + n, chunk, take)
            n += take
        stream.out_size -= n
        server._unsent -= n
        if not out:
            stream.providing = False
            # Nothing more queued: this source is done. Without END_STREAM when the
            # stream goes on (a later send_data submits a new source).
            flags = _DATA_FLAG_EOF if stream.end else _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
            ctypes.c_uint32.from_address(data_flags).value = flags
        return n
    except BaseException as exc:
        return _failed(server, exc)


_CALLBACKS: list[Any] = []  # the CFUNCTYPE objects, kept alive with the module
_CALLBACKS_PTR: int = 0
_READ = READ_CB(_read_body)


def _make_callbacks() -> int:
    assert lib is not None
    ptr = c_void_p()
    if callbacks_new(ctypes.byref(ptr)) != 0 or not ptr.value:
        raise MemoryError("nghttp2_session_callbacks_new failed")
    table: list[tuple[str, Any, Any]] = [
        ("on_begin_headers", FRAME_CB, _on_begin_headers),
        ("on_header", HEADER_CB, _on_header),
        ("on_frame_recv", FRAME_CB, _on_frame_recv),
        ("on_data_chunk_recv", CHUNK_CB, _on_data_chunk),
        ("on_stream_close", CLOSE_CB, _on_stream_close),
        ("on_invalid_frame_recv", INVALID_CB, _on_invalid_frame),
        ("error", ERROR2_CB, _on_error),
    ]
    if not LIBRARY_CAPS_CONTINUATIONS:
        table.append(("on_begin_frame", BEGIN_FRAME_CB, _on_begin_frame))
    for name, kind, func in table:
        setter_name = ("nghttp2_session_callbacks_set_error_callback2" if name == "error"
                       else f"nghttp2_session_callbacks_set_{name}_callback")
        setter = fn(setter_name, None, c_void_p, kind)
        cb = kind(func)
        _CALLBACKS.append(cb)
        setter(ptr, cb)
    return ptr.value


def _callbacks() -> int:
    global _CALLBACKS_PTR
    if not _CALLBACKS_PTR:
        _CALLBACKS_PTR = _make_callbacks()  # shared by every session; never freed
    return _CALLBACKS_PTR


# nghttp2_nv packed by struct: about three times cheaper than filling a ctypes array. The
# pointers are to one bytes object holding every name and value, alive for the submit call;
# its address is what ctypes gives for a c_char_p made from it (a pointer into the object,
# not a copy: ctypes documents this for bytes). The layout is checked once here, or ctypes
# arrays are used.
_NV_STRUCT = struct.Struct("=QQQQB7x")
_PACKED_NV = ctypes.sizeof(NV) == _NV_STRUCT.size and ctypes.sizeof(c_void_p) == 8


# Header lists seen recently -> their array and its bytes. A site answers the same few lists
# (a static file's head changes only with Date, once a second): packing is done once for
# them. An entry keeps its bytes alive, so its pointers stay valid while it is cached, and
# the caller holds both while nghttp2 reads them.
_NVA_CACHE: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, bytes]] = {}
_NVA_CACHE_MAX = 512


def _nva(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """An nghttp2_nv array for ``headers`` and the bytes it points into (keep both alive
    until the submit returns; nghttp2 copies the fields)."""
    key = tuple(headers)
    hit = _NVA_CACHE.get(key)
    if hit is None:
        if len(_NVA_CACHE) >= _NVA_CACHE_MAX:
            _NVA_CACHE.clear()
        hit = _NVA_CACHE[key] = _pack_nva(key)
    return hit


def _pack_nva(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[bytes, bytes]:
    if not _PACKED_NV:
        array = (NV * len(headers))(*[NV(n, v, len(n), len(v), 0) for n, v in headers])
        return bytes(array), b""  # (the ctypes array's pointers are to the header bytes)
    blob = b"".join([part for field in headers for part in field])
    start = at = ctypes.cast(ctypes.c_char_p(blob), c_void_p).value or 0
    pack = _NV_STRUCT.pack
    entries = []
    for name, value in headers:
        n, v = len(name), len(value)
        entries.append(pack(at, at + n, n, v, 0))
        at += n + v
    if at - start != len(blob):
        # (Lengths that are not byte counts, e.g. a memoryview of wider items: every
        # pointer must stay inside the blob.)
        raise TypeError("header names and values must be bytes")
    return b"".join(entries), blob


def _goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """A GOAWAY frame (RFC 9113 section 6.8) made here: for a graceful GOAWAY nghttp2 must
    not know of, and after a fatal error, when the session may not be used any more."""
    payload = struct.pack("!II", last_stream_id & 0x7FFFFFFF, code) + debug
    return struct.pack("!I", len(payload))[1:] + bytes((_GOAWAY, 0)) + b"\0\0\0\0" + payload


# -- the adapter -------------------------------------------------------------------------


class NgH2Server:
    """One server-side HTTP/2 connection on libnghttp2 (the interface of ``H2Server``)."""

    def __init__(self, limits: Limits) -> None:
        self._session = 0  # the nghttp2_session *, freed by _free (or when collected)
        if lib is None:
            raise RuntimeError("libnghttp2 is not installed")
        self.limits = limits
        self.requests = 0
        self.goaway_sent = False
        self.last_stream_id = 0
        self.ended = False
        self._out = bytearray()
        self._resets = Bucket(limits.resets)
        self._pings = Bucket(limits.pings)
        self._settings_bucket = Bucket(limits.settings)
        self._streams: dict[int, _Stream] = {}
        self._current: _Stream | None = None  # the stream whose header block is being read
        self._highest = 0  # the highest stream the client opened
        self._unsent = 0  # body bytes queued here, not yet taken by nghttp2
        self._now = 0.0
        self._events: list[Event] = []
        self._new_streams = 0
        self._block_open = False
        self._continuations = 0
        self._error: tuple[int, str] | None = None  # a limit of ours was crossed
        self._fault: str | None = None  # a Python exception in a callback
        self._detail: str | None = None  # nghttp2's words for what it refused
        self._refuse: list[int] = []
        self._refused_open = 0  # refused streams nghttp2 has not closed yet
        self._goaway_due = -1
        self._library_resets: list[tuple[int, int, _Stream]] = []
        self._dead = False  # a fatal nghttp2 error: the session may only be freed
        option = c_void_p()
        if option_new(ctypes.byref(option)) != 0:
            raise MemoryError("nghttp2_option_new failed")
        try:
            set_no_auto_window_update(option, 1)
            if set_max_continuations is not None:
                set_max_continuations(option, limits.max_continuations)
            session = c_void_p()
            if server_new(ctypes.byref(session), _callbacks(), None, option) != 0:
                raise MemoryError("nghttp2_session_server_new2 failed")
        finally:
            option_del(option)
        self._session = session.value or 0

    def _free(self) -> None:
        """Free the session, once. (``__del__``, not ``weakref.finalize``: compiled with
        mypyc, this class takes no weak references.)"""
        if self._session:
            session_del(self._session)
            self._session = 0

    def __del__(self) -> None:
        self._free()

    # -- input ----------------------------------------------------------------------------

    def initiate(self) -> None:
        """Our preface: the SETTINGS frame (RFC 9113 section 3.4)."""
        limits = self.limits
        iv = (SettingsEntry * 4)(
            SettingsEntry(_SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_streams),
            SettingsEntry(_SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            SettingsEntry(_SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window),
            SettingsEntry(_SETTINGS_ENABLE_PUSH, 0))
        self._check(submit_settings(self._session, 0, iv, 4), "nghttp2_submit_settings")
        # The connection window starts at 65535 whatever SETTINGS say (section 6.9.2):
        # open it by as much as a stream's, so one upload does not stall the others.
        self._check(submit_window_update(self._session, 0, 0, limits.initial_window),
                    "nghttp2_submit_window_update")

    def feed(self, data: bytes, now: float) -> list[Event]:
        global _ACTIVE
        if self.ended or self._dead:
            return []
        if not isinstance(data, bytes):
            data = bytes(data)
        self._now = now
        events: list[Event] = []
        self._events = events
        self._new_streams = 0
        _ACTIVE = self
        try:
            rv = mem_recv(self._session, data, len(data))
        finally:
            _ACTIVE = None
        if rv < 0:
            return self._fatal(events, rv)
        if self._error is not None:
            return self._end_for(events)
        if self._goaway_due >= 0:
            sid, self._goaway_due = self._goaway_due, -1
            self._write_goaway(sid, NO_ERROR)
        if self._refuse:
            for sid in self._refuse:
                submit_rst(self._session, 0, sid, REFUSED_STREAM)
            self._refuse.clear()
        # What nghttp2 queued in answer (ACKs, RST_STREAM, its own GOAWAY) goes out now, so
        # the streams it closes are known before the events are returned.
        if not self._drain():
            return self._fatal(events, _ERR_FATAL)
        if self._library_resets:
            resets, self._library_resets = self._library_resets, []
            for sid, code, stream in resets:
                if code == PROTOCOL_ERROR:
                    # A malformed request (RFC 9113 section 8.1.1): as the h2 engine does,
                    # the whole connection ends.
                    kind = ("InvalidBodyLengthError" if stream.announced
                            and stream.content_length is not None and not stream.trailers
                            else "ProtocolError")
                    self._calm(f"{kind}: stream {sid} "
                               f"({self._detail or 'malformed request'})", PROTOCOL_ERROR)
                    return self._end_for(events)
                if stream.announced:
                    events.append(StreamReset(sid, code))
            if not self._resets.take(now, len(resets)):
                self._calm("too many stream errors")
                return self._end_for(events)
        if self._error is not None:
            return self._end_for(events)
        if not self.ended and not want_read(self._session):
            # nghttp2 ended the connection itself (a GOAWAY of its own just went out).
            code, debug = _last_goaway(self._out)
            self.ended = True
            category = _CATEGORY.get(code, f"error {code}")
            events.append(ConnectionEnded(code, f"{category}: {debug or self._detail or ''}",
                                          self._highest))
        return events

    def _open_stream(self, sid: int) -> int:
        """on_begin_headers of a request: a new stream."""
        self.requests += 1
        self._new_streams += 1
        self._highest = max(self._highest, sid)
        limits = self.limits
        stream = _Stream(limits.max_header_list_size)
        if self.goaway_sent and sid > self.last_stream_id:
            # After our GOAWAY: not processed, the client may retry it (section 8.7).
            stream.refused = True
            stream.fields = None
            self._refused_open += 1
            self._refuse.append(sid)
        elif len(self._streams) - self._refused_open >= limits.max_streams:
            # SETTINGS_MAX_CONCURRENT_STREAMS (section 5.1.2); nghttp2 itself would only
            # refuse the stream until our SETTINGS are acknowledged.
            self._calm(f"TooManyStreamsError: more than {limits.max_streams} concurrent "
                       f"streams", PROTOCOL_ERROR)
            return 0
        if self._new_streams > 2 * limits.max_streams:
            # Streams opened and reset within one read never count as concurrent: this
            # bounds the work one read can cause (nginx's answer to rapid reset).
            self._calm("too many new streams in one read")
            return 0
        self._streams[sid] = stream
        self._current = stream
        return 0

    def _calm(self, reason: str, code: int = ENHANCE_YOUR_CALM) -> None:
        """A limit of ours (or a malformed request): the connection ends with ``code``.
        nghttp2 ignores every later frame once it is told to terminate."""
        if self._error is None:
            self._error = (code, reason)
            terminate(self._session, self._highest, code)

    def _end_for(self, events: list[Event]) -> list[Event]:
        assert self._error is not None
        code, reason = self._error
        self.ended = True
        self._drain()
        return [*events, ConnectionEnded(code, reason, self._highest)]

    def _fatal(self, events: list[Event], rv: int) -> list[Event]:
        """nghttp2 returned a fatal error: the session may only be freed now. The GOAWAY
        is made here."""
        self._dead = True
        self.ended = True
        if rv == _ERR_BAD_CLIENT_MAGIC:
            code, reason = PROTOCOL_ERROR, "ProtocolError: Invalid HTTP/2 preface"
        elif rv == _ERR_TOO_MANY_CONTINUATIONS:
            code = ENHANCE_YOUR_CALM
            reason = f"more than {self.limits.max_continuations} CONTINUATION frames"
        elif rv == _ERR_FLOODED:
            code, reason = ENHANCE_YOUR_CALM, "flooded: too many frames to answer queued"
        elif rv == _ERR_CALLBACK_FAILURE and self._fault is not None:
            code, reason = INTERNAL_ERROR, f"adapter_error: {self._fault}"
        else:
            code = INTERNAL_ERROR
            reason = f"nghttp2: {(strerror(rv) or b'').decode('ascii', 'replace')}"
        self._out += _goaway_frame(self._highest, code)
        self._free()  # now: nothing may touch the session again
        return [*events, ConnectionEnded(code, reason, self._highest)]

    @property
    def header_block_open(self) -> bool:
        """A HEADERS frame arrived whose block is not complete (CONTINUATION frames due)."""
        return self._block_open

    # -- output ---------------------------------------------------------------------------

    def _drain(self) -> bool:
        """Take every byte nghttp2 has to send into ``_out``; False on a fatal error."""
        global _ACTIVE
        if self._dead:
            return True
        session = self._session
        ptr = c_void_p()
        out = self._out
        _ACTIVE = self
        try:
            while True:
                n = mem_send(session, ctypes.byref(ptr))
                if n <= 0:
                    break
                if ptr.value:
                    out += ctypes.string_at(ptr.value, n)
        finally:
            _ACTIVE = None
        if n < 0:
            self._dead = True
            self.ended = True
            self._free()
            return False
        return True

    def output(self) -> bytes:
        """The bytes to write now (empty when there are none)."""
        self._drain()
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def _check(self, rv: int, what: str) -> bool:
        """A submit refused because the stream or the session is closing is nothing to do
        (False: as with ``h2``'s closed streams); anything else is a bug of ours."""
        if rv in _BUG_ERRORS or rv <= _ERR_FATAL:
            raise RuntimeError(f"{what}: {(strerror(rv) or b'').decode()}")
        return rv >= 0

    @property
    def answerable(self) -> bool:
        """Streams can be answered until the session ends (after the client's GOAWAY too:
        RFC 9113 section 6.8)."""
        return not self._dead

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> bool:
        if self._dead or stream_id not in self._streams:
            return False
        nva, blob = _nva(headers)
        rv = submit_headers(self._session, _FLAG_END_STREAM if end_stream else 0, stream_id,
                             None, nva, len(headers), None)
        del blob  # (alive until here: nva points into it)
        return self._check(rv, "nghttp2_submit_headers")

    def window(self, stream_id: int) -> int:
        """How many body bytes may be sent on ``stream_id`` now (0 if it is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or self._dead:
            return 0
        session = self._session
        window: int = min(stream_window(session, stream_id) - stream.out_size,
                          conn_window(session) - self._unsent)
        return max(window, 0)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> bool:
        """``data`` must fit the window (``window``); nghttp2 cuts it to the peer's frame
        size."""
        stream = self._streams.get(stream_id)
        if stream is None or self._dead or stream.end:
            return False
        if data:
            chunk = data if type(data) is bytes else bytes(data)
            stream.out.append(chunk)
            stream.out_size += len(chunk)
            self._unsent += len(chunk)
        if end_stream:
            stream.end = True
        return self._provide(stream_id, stream)

    def _provide(self, stream_id: int, stream: _Stream) -> bool:
        if stream.providing or (not stream.out and not stream.end):
            return True
        stream.providing = True
        provider = DataProvider(None, _READ)
        # END_STREAM is set by the source (NGHTTP2_DATA_FLAG_EOF without NO_END_STREAM).
        return self._check(submit_data(self._session, _FLAG_END_STREAM, stream_id,
                                        ctypes.byref(provider)), "nghttp2_submit_data")

    def end_stream(self, stream_id: int) -> bool:
        return self.send_data(stream_id, b"", True)

    def reset(self, stream_id: int, code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or self._dead:
            return  # (already closed: nothing to reset)
        if stream.providing:
            # RST_STREAM is sent before DATA still queued in the stream: what was given to
            # send (within the windows) goes out first.
            if not self._drain():
                return  # (a fatal error: the session is freed)
            stream = self._streams.get(stream_id)
            if stream is None:
                return
        stream.reset_by_us = True
        self._unsent -= stream.out_size
        stream.out.clear()
        stream.out_size = 0
        submit_rst(self._session, 0, stream_id, code)

    def ack(self, stream_id: int, n: int) -> None:
        """Give back ``n`` bytes of window: the body bytes were taken (RFC 9113 6.9)."""
        if n > 0 and not self._dead:
            # (A stream that is gone: nghttp2 still gives back the connection's window.)
            consume(self._session, stream_id, n)

    def stream_open(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.refused

    def _goaway_now(self, sid: int) -> None:
        """Inside a callback: later streams of this read are refused, the frame is written
        once nghttp2 has returned."""
        self.goaway_sent = True
        self.last_stream_id = sid
        self._goaway_due = sid

    def goaway(self, last_stream_id: int | None = None, code: int = NO_ERROR) -> int:
        """A graceful GOAWAY: streams up to ``last_stream_id`` (default: the highest opened)
        are still answered; later ones are refused."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.last_stream_id = self._highest if last_stream_id is None else last_stream_id
            self._write_goaway(self.last_stream_id, code)
        return self.last_stream_id

    def _write_goaway(self, sid: int, code: int) -> None:
        self._drain()  # what was queued before the GOAWAY goes before it
        self._out += _goaway_frame(sid, code)



def _last_goaway(out: bytearray) -> tuple[int, str]:
    """The error code and debug data of the last GOAWAY frame in ``out`` (frames whole)."""
    view = memoryview(out)
    pos, found = 0, (INTERNAL_ERROR, "")
    while pos + 9 <= len(view):
        length = int.from_bytes(view[pos:pos + 3], "big")
        if view[pos + 3] == _GOAWAY and length >= 8 and pos + 9 + length <= len(view):
            body = bytes(view[pos + 9:pos + 9 + length])
            found = (int.from_bytes(body[4:8], "big"),
                     body[8:8 + 200].decode("ascii", "replace"))
        pos += 9 + length
    return found
