"""A request as both protocols hand it to handlers: its head, and its body as a stream.

Job: ``Request`` (the head: method, target, path, query, headers, framing facts) and
``Body`` (the body as it arrives, pulled with ``await read()`` or pushed to a ``BodySink``,
with backpressure through its owner), shared by HTTP/1.1 (``engine.py``) and HTTP/2
(``h2conn.py``).

Rules:
- Header names are lower case, values the raw bytes (latin-1 when read as text).
- "100 Continue" (RFC 9110 section 10.1.1) is sent once, when a handler first takes the body
  (reads it, attaches a sink, or asks to drop it and be told its end), and only if the
  client asked for it and the body has not all arrived: one place, ``Body._take``.
- A body past its ``limit`` fails with ``BodyTooLarge``; a client that goes away fails it
  with ``ClientGone``. Buffered bytes over ``BODY_HIGH_WATER`` pause the owner's reading.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Protocol

BODY_HIGH_WATER = 256 * 1024  # buffered request body bytes before reading pauses


class BodyOwner(Protocol):
    """The connection (HTTP/1.1) or stream (HTTP/2) a body arrives on."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def send_continue(self) -> None: ...
    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class Request:
    __slots__ = (
        "body",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "path",
        "query",
        "start",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, start: float) -> None:
        self.method = "GET"
        self.target = ""
        self.path = "/"
        self.query = ""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased, values raw
        self.keep_alive = True
        self.body: Body | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.upgrade = False
        self.complete = False  # the whole message, body included, has been parsed
        self.start = start
        self.host: str | None = None

    def header(self, name: bytes) -> str | None:
        """The first value of a header (``name`` lower case), decoded as latin-1."""
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None


class BodySink(Protocol):
    """Where a pushed request body goes (the reverse proxy): chunks as they arrive."""

    def body_data(self, chunk: bytes) -> None: ...
    def body_end(self) -> None: ...
    def body_error(self, exc: Exception) -> None: ...


class Body:
    """A request body as it arrives: either pulled (``await read()`` returns chunks, then
    b"" at its end) or pushed to a ``BodySink`` once one is attached."""

    __slots__ = (
        "_buffered",
        "_sink",
        "_on_end",
        "_on_error",
        "_chunks",
        "_conn",
        "_continue_sent",
        "_done",
        "_error",
        "_request",
        "_waiter",
        "discard",
        "limit",
        "received",
    )

    def __init__(self, conn: BodyOwner, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.limit = 0  # 0 = no limit
        self._continue_sent = False
        self.discard = False
        self._sink: BodySink | None = None
        self._on_end: Callable[[], None] | None = None
        self._on_error: Callable[[Exception], None] | None = None

    def then(self, on_end: Callable[[], None], on_error: Callable[[Exception], None]) -> None:
        """For handlers that do not read bodies: drop the body as it arrives, enforcing its
        limit, and call ``on_end`` once it has all arrived (``on_error`` if it fails), so
        that the answer comes after the whole request, as for a body that is read."""
        self.drop()
        self._on_end, self._on_error = on_end, on_error
        self._take()
        if self._error is not None:
            self._fire_error(self._error)
        elif self._done:
            self._fire_end()

    def _fire_end(self) -> None:
        callback, self._on_end, self._on_error = self._on_end, None, None
        if callback is not None:
            callback()

    def _fire_error(self, exc: Exception) -> None:
        callback, self._on_end, self._on_error = self._on_error, None, None
        if callback is not None:
            callback(exc)

    def attach(self, sink: BodySink) -> None:
        """Push the body to ``sink`` from now on, starting with what is buffered."""
        self._sink = sink
        self._take()
        while self._chunks:
            sink.body_data(self._chunks.popleft())
        self._buffered = 0
        self._conn.resume_body()
        if self._error is not None:
            sink.body_error(self._error)
        elif self._done:
            sink.body_end()

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.limit and self.received > self.limit:
            self.fail(BodyTooLarge())
            return
        if self.discard:
            return
        if self._sink is not None:
            self._sink.body_data(chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > BODY_HIGH_WATER:
            self._conn.pause_body()
        self._wake()

    def finish(self) -> None:
        self._done = True
        if self._sink is not None and not self.discard:
            self._sink.body_end()
        if self._on_end is not None:
            self._fire_end()
        self._wake()

    def fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
            if self._sink is not None and not self.discard:
                self._sink.body_error(exc)
            if self._on_error is not None:
                self._fire_error(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def done(self) -> bool:
        return self._done

    def _take(self) -> None:
        """A handler takes the body: the client that waits for "100 Continue" gets it now
        (once, and not when the whole body came anyway)."""
        if not self._continue_sent:
            self._continue_sent = True
            if self._request.expect_continue and not self._done:
                self._conn.send_continue()

    async def read(self) -> bytes:
        self._take()
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= BODY_HIGH_WATER // 2:
                    self._conn.resume_body()
                return chunk
            if self._done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def drop(self) -> None:
        """Nobody will read the rest: drop what is buffered and what is still to come."""
        self.discard = True
        self._sink = None
        self._chunks.clear()
        self._buffered = 0
        self._conn.resume_body()
