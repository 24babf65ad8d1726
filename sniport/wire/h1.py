"""The HTTP/1.1 server connection as a sans-IO state machine: bytes in, events out.

Job: turn what a client sends into ``RequestHead``, ``BodyData``, ``MessageEnd`` and
``ProtocolError`` events, one request at a time, and know the connection's phase (``State``).
``sniport/http/engine.py`` drives it from asyncio; the tests drive it with bytes only.

Rules:
- Parsing is httptools' (llhttp), never by hand (house rule 8). This module imports no
  asyncio, socket or ssl (house rule 1).
- The phase is one ``State``; ``TRANSITIONS`` lists what may follow what, and a transition
  not in it is a bug (``TransitionError``), never a quiet change of meaning.
- A request's body framing is ``body_framing``, RFC 9112 section 6.3, one pure function:
  Transfer-Encoding whose final coding is chunked, else a valid Content-Length, else no body;
  Content-Length with Transfer-Encoding, a Transfer-Encoding not ending in chunked and a bad
  Content-Length are errors (400 and close: RFC 9112 sections 6.1 and 6.3, request
  smuggling). llhttp refuses most of them first; the function is what the machine believes.
- Limits: a request target over ``MAX_TARGET`` -> 414 (RFC 9110 section 15.5.15); a header
  section over ``MAX_HEADER_BYTES``, or a head that stays unfinished over ``MAX_HEAD_BYTES``
  of reads -> 431 (RFC 6585 section 5); a version other than 1.0/1.1 -> 505 (RFC 9110
  section 15.6.6). Any other bad byte -> 400. After an error nothing more is read.
- Pipelining (RFC 9112 section 9.3.2): requests are answered one at a time, in order. The
  next request's head (or an error in it) is held until ``response_done()`` says the answer
  before it is complete; the body of the request being answered, and an error in that body,
  are never held. So bad bytes after good pipelined requests are answered after them.
- No request is read after the last one (RFC 9112 section 9.6): after a request that did
  not ask to keep the connection (``keep_alive`` false: "Connection: close", or HTTP/1.0
  without keep-alive) and after ``close()`` (a response said "Connection: close"), input is
  dropped, and requests held behind the answer in progress are dropped with it.
- "Expect: 100-continue" is detected here (``RequestHead.expect_continue``); whether and when
  to answer it is the body's business (RFC 9110 section 10.1.1, http/request.py).
- An Upgrade request (RFC 9110 section 7.8) ends the HTTP part of the connection: the bytes
  after its head are kept (``take_upgrade_bytes``) for whoever accepts the upgrade.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import httptools

MAX_TARGET: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
# httptools keeps a header that has not ended (an endless value) in its own buffer, out of
# on_header's sight: the reads that arrive while one head stays unfinished from their first
# byte to their last are all head, and past this many such bytes the request is refused
# (431) before that buffer grows further. (The read a head begins in is not counted: where
# in it the head began is not known, and counting all of it would refuse a small head that
# follows pipelined requests. The buffer is then bounded by one read plus this.)
MAX_HEAD_BYTES: Final = MAX_TARGET + MAX_HEADER_BYTES + 1024

# body_framing's answers besides a length (a length is >= 0).
NO_BODY: Final = -2  # no Content-Length, no Transfer-Encoding: RFC 9112 section 6.3 rule 7
CHUNKED: Final = -1  # Transfer-Encoding ending in chunked: section 6.3 rule 4


@dataclass(frozen=True, slots=True)
class BadFraming:
    """The framing headers cannot be believed: 400 and close."""

    reason: str


def _ends_in_chunked(lines: Sequence[bytes]) -> bool:
    """Whether the transfer codings of ``lines`` end with chunked, applied once (RFC 9112
    section 7: never twice; section 6.3 rule 4: last). Nothing may follow it, not even an
    empty list element or field line (llhttp refuses those too)."""
    seen = False
    for line in lines:
        if not line.strip(b" \t"):
            return False  # an empty field line (RFC 9110 section 5.6.1: a list has members)
        for token in line.split(b","):
            if seen:
                return False
            coding = token.strip(b" \t").lower()
            if coding == b"chunked":
                seen = True
    return seen


def body_framing(headers: Sequence[tuple[bytes, bytes]]) -> int | BadFraming:
    """How a request's body is delimited (RFC 9112 section 6.3), from its header fields
    (names lower case): ``CHUNKED``, a Content-Length (>= 0), ``NO_BODY``, or ``BadFraming``.
    """
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
    if codings:
        if lengths:
            # Section 6.3 rule 3: a server may refuse both, and must not trust the length;
            # refusing closes the door on request smuggling (section 11.2).
            return BadFraming("content-length with transfer-encoding")
        if not _ends_in_chunked(codings):
            return BadFraming("transfer-encoding not ending in chunked")  # rule 4
        return CHUNKED
    if not lengths:
        return NO_BODY
    if len(lengths) > 1:
        # Section 6.3 rule 5 allows a list of identical values to be taken as one; llhttp
        # refuses any repetition, and so does this.
        return BadFraming("repeated content-length")
    value = lengths[0].strip(b" \t")
    if not value.isdigit() or len(value) > 18:
        return BadFraming("invalid content-length")
    return int(value)


# -- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestHead:
    """A request's head. ``content_length`` is None without that header; ``chunked`` is true
    for Transfer-Encoding: chunked; ``has_body`` says whether body bytes follow."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: list[tuple[bytes, bytes]]  # names lower case, values raw
    keep_alive: bool
    upgrade: bool
    content_length: int | None
    chunked: bool
    has_body: bool
    expect_continue: bool
    start: float  # the clock when the head began


@dataclass(slots=True)
class BodyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The request's message (head and body) has all arrived."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Bad bytes (or, from ``fail``, a head that did not come in time): answer ``status``
    and close. ``in_body``: they belong to the body of the last ``RequestHead``; else to a
    head that never completed, whose ``target`` (as far as it came) is given for the log."""

    status: int
    reason: str
    in_body: bool
    target: str = ""


MESSAGE_END: Final = MessageEnd()  # one instance: it carries nothing

Event = RequestHead | BodyData | MessageEnd | ProtocolError


# -- states -------------------------------------------------------------------------------


class State(enum.Enum):
    IDLE = "idle"  # between requests: the next byte begins a head
    HEAD = "head"  # a request head has begun and not ended
    BODY = "body"  # a head has ended; its body (possibly empty) is being read
    UPGRADED = "upgraded"  # an Upgrade head ended HTTP: what follows belongs to the tunnel
    CLOSED = "closed"  # no request is read any more (the last one ended, an error, close())

    # Enum hashes by name, in Python; the transition check hashes states on every request.
    __hash__ = object.__hash__


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.IDLE: frozenset({State.HEAD, State.CLOSED}),
    State.HEAD: frozenset({State.BODY, State.CLOSED}),
    State.BODY: frozenset({State.IDLE, State.UPGRADED, State.CLOSED}),
    State.UPGRADED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class TransitionError(Exception):
    """A transition the table does not allow: a bug in the machine or its driver."""


class _Refuse(Exception):
    """Raised in a parser callback: the request is refused with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Stop(Exception):
    """Raised in a parser callback: nothing more is read (no request after the last)."""


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                                    "PATCH", "TRACE", "CONNECT")}


def _no_clock() -> float:
    return 0.0


class H1Connection:
    """The server side of one HTTP/1.1 connection: ``feed`` bytes, take events with
    ``next_event`` until it returns None, and say ``response_done`` when an answer is
    complete (the next request is held until then)."""

    __slots__ = (
        "_answering",
        "_clock",
        "_events",
        "_head_fed",
        "_head_start",
        "_header_bytes",
        "_headers",
        "_keep_alive",
        "_parser",
        "_upgrade_bytes",
        "_target_bytes",
        "_upgrade",
        "_url",
        "expect_continue",
        "state",
    )

    def __init__(self, clock: Callable[[], float] = _no_clock) -> None:
        self.state = State.IDLE
        self._clock = clock
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._events: collections.deque[Event] = collections.deque()
        self._answering = False  # a head was handed out and its answer is not complete
        self._url: list[bytes] = []
        self._target_bytes = 0
        self._upgrade = False  # of the message being read
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._head_fed = 0  # see MAX_HEAD_BYTES; -1: the head began in the current read
        self._head_start = 0.0
        self._keep_alive = True  # of the message being read
        self._upgrade_bytes = b""
        self.expect_continue = False  # of the head being read

    def _to(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.state.name} -> {new.name}")
        self.state = new

    # -- input ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data``; its events wait in order for ``next_event``."""
        parser = self._parser
        if parser is None:
            if self.state is State.UPGRADED:
                self._upgrade_bytes += data  # the tunnel's, once someone takes them
            return  # CLOSED: dropped
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops at the end of an Upgrade request's head: the rest is the new
            # protocol's, kept for the handler that accepts the upgrade.
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade_bytes = data[offset:]
            self._parser = None
            if self.state is State.BODY:  # llhttp ends the message first; if it did not
                self._message_end()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                self._parser = None
                return
            if isinstance(cause, _Refuse):
                self._error(cause.status, cause.reason)
            else:
                self._error(400, "bad_request")
            return
        except httptools.HttpParserError as exc:
            if self.state is State.CLOSED:
                # llhttp's own "data after Connection: close": not a request, not read.
                self._parser = None
                return
            self._error(400, f"bad_request: {exc}")
            return
        if self.state is State.HEAD:
            if self._head_fed < 0:
                self._head_fed = 0  # began in this read: counting starts with the next
            else:
                self._head_fed += len(data)
                if self._head_fed > MAX_HEAD_BYTES:
                    self._error(431, "headers_too_large")

    def fail(self, status: int, reason: str) -> None:
        """An error found outside the bytes (a head that did not come in time: 408): it is
        answered in turn, like bad bytes, and nothing more is read."""
        if self.state is not State.CLOSED:
            self._error(status, reason)

    def _error(self, status: int, reason: str) -> None:
        in_body = self.state is State.BODY
        target = b"".join(self._url).decode("latin-1")[:200] if self.state is State.HEAD else ""
        self._parser = None
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        self._events.append(ProtocolError(status, reason, in_body, target))

    # -- output ---------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, or None: need more bytes, or the next head waits for
        ``response_done`` (the body of the request being answered never waits)."""
        events = self._events
        if not events:
            return None
        event = events[0]
        cls = event.__class__
        if cls is RequestHead or (cls is ProtocolError
                                  and not event.in_body):  # type: ignore[union-attr]
            if self._answering:
                return None
            self._answering = True
        return events.popleft()

    @property
    def blocked(self) -> bool:
        """Events wait for the answer in progress to complete."""
        return self._answering and bool(self._events)

    def response_done(self) -> None:
        """The answer to the request handed out last is complete: the next may come."""
        self._answering = False

    def close(self) -> bool:
        """No request is read any more (a response said "Connection: close", or the
        connection is closing): input is dropped from now on, and so are events not taken
        yet. Returns whether a body was still arriving (the caller may linger to read and
        drop it, so that unread input does not turn its close into a reset)."""
        in_body = self.state is State.BODY
        self._events.clear()
        self._parser = None
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        return in_body

    def take_upgrade_bytes(self) -> bytes:
        """The bytes after an Upgrade request's head (so far), for the tunnel."""
        data, self._upgrade_bytes = self._upgrade_bytes, b""
        return data

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is State.CLOSED:
            raise _Stop  # after the last request (RFC 9112 section 9.6)
        self._to(State.HEAD)
        self._url = []
        self._target_bytes = 0
        self._headers = []
        self._header_bytes = 0
        self._head_fed = -1
        self.expect_continue = False
        self._head_start = self._clock()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._target_bytes += len(url)
        if self._target_bytes > MAX_TARGET:
            raise _Refuse(414, "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refuse(431, "headers_too_large")
        name = name.lower()
        if name == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 has no headers (no Host, no framing) and "HTTP/2.0" in a request
            # line is not HTTP/1: RFC 9110 section 15.6.6, 505 and close.
            raise _Refuse(505, f"http_version_not_supported: {version}")
        headers = self._headers
        framing = body_framing(headers)
        if isinstance(framing, BadFraming):
            raise _Refuse(400, f"bad_request: {framing.reason}")
        method = parser.get_method()
        url = self._url
        target = (url[0] if len(url) == 1 else b"".join(url)).decode("latin-1")
        path, _, query = target.partition("?")
        keep_alive = self._keep_alive = parser.should_keep_alive()
        upgrade = self._upgrade = parser.should_upgrade()
        self._to(State.BODY)
        self._events.append(RequestHead(
            _METHODS.get(method) or method.decode("ascii", "replace"), target, path, query,
            version, headers, keep_alive, upgrade,
            framing if framing >= 0 else None, framing == CHUNKED, framing > 0 or
            framing == CHUNKED, self.expect_continue, self._head_start))

    def on_body(self, body: bytes) -> None:
        self._events.append(BodyData(body))

    def on_message_complete(self) -> None:
        self._message_end()

    def _message_end(self) -> None:
        self._events.append(MESSAGE_END)
        if self._upgrade:
            self._to(State.UPGRADED)
        elif self._keep_alive:
            self._to(State.IDLE)
        else:
            self._to(State.CLOSED)  # the client's last request (RFC 9112 section 9.6)
