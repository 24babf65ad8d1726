"""The master's /metrics endpoint: a tiny HTTP/1.1 server driven by the master's select loop.

Job: answer ``GET /metrics`` (and ``HEAD``) with the rendered totals, from the master's
single thread, without ever blocking it.

Rules:
- Non-blocking sockets only. A response that does not fit the socket buffer is kept and
  finished when the socket is writable (``fds_writable``/``on_writable``); a client that does
  not read cannot stall the loop, it only reaches its deadline.
- Every connection has a deadline (house rule 2): ``request_timeout`` to send a complete
  request, then ``response_timeout`` to take the response. ``expire(now)`` closes the late.
- A request is parsed by httptools (house rule 8) and capped at ``max_request`` bytes; a
  broken or oversized one gets 400/431 and the connection closes (house rule 6).
- One request per connection, answered with ``Connection: close`` (a scraper reconnects;
  keep-alive would only add state to the master).
- At most ``max_connections`` at once; one more is answered 503 at once and closed.
- After the response the master shuts down its sending side and waits briefly for the
  client's close before closing, so that unread request bytes do not turn the close into a
  reset that could destroy the response in flight (RFC 9112 section 9.6).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httptools

from sniport.logs import diag

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PATH = b"/metrics"
LINGER = 2.0  # seconds to wait for the client's close once the response is out
MAX_ACCEPTS = 64  # per readable event, so a flood cannot hold the loop


def _response(status: bytes, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
              head_only: bool = False, extra: bytes = b"") -> bytes:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n" + extra + b"\r\n")
    return head if head_only else head + body


BUSY = _response(b"503 Service Unavailable", b"too many connections\n")


class _Request:
    """httptools callbacks: the URL and whether the message is complete."""

    __slots__ = ("url", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.complete = True


class _Conn:
    __slots__ = ("sock", "deadline", "received", "request", "parser", "out", "state")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = 0
        self.request = _Request()
        self.parser = httptools.HttpRequestParser(self.request)
        self.out = memoryview(b"")  # what is left to send (a view: no copy per partial send)
        self.state = "reading"  # then "writing", then "closing" (waiting for the client's EOF)


class MetricsEndpoint:
    def __init__(self, sock: socket.socket, render: Callable[[], bytes], *,
                 max_connections: int = 16, request_timeout: float = 5.0,
                 response_timeout: float = 30.0, max_request: int = 8192,
                 clock: Callable[[], float] = time.monotonic) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.render = render
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.response_timeout = response_timeout
        self.max_request = max_request
        self.clock = clock
        self._conns: dict[int, _Conn] = {}

    # -- what the loop selects on -------------------------------------------------------------

    def fds(self) -> list[int]:
        """Descriptors to select for reading: the listening socket and every connection
        that is sending its request or whose close we wait for."""
        return [self.sock.fileno(), *(fd for fd, c in self._conns.items()
                                      if c.state != "writing")]

    def fds_writable(self) -> list[int]:
        return [fd for fd, c in self._conns.items() if c.state == "writing"]

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._conns.values()), default=None)

    def connections(self) -> int:
        return len(self._conns)

    # -- events -------------------------------------------------------------------------------

    def on_readable(self, fd: int) -> None:
        if fd == self.sock.fileno():
            self._accept()
            return
        conn = self._conns.get(fd)
        if conn is None:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if conn.state != "reading":  # answered already: what comes now is read and dropped
            if not data and conn.state == "closing":
                self._close(fd)
            return
        if not data:  # the client gave up before its request was complete
            self._close(fd)
            return
        conn.received += len(data)
        if conn.received > self.max_request:
            self._answer(conn, _response(b"431 Request Header Fields Too Large",
                                         b"request too large\n"))
            return
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # llhttp stops at an upgrade; one without a complete head is refused below
        except httptools.HttpParserError:
            self._answer(conn, _response(b"400 Bad Request", b"bad request\n"))
            return
        if conn.request.complete:
            self._answer(conn, self._respond(conn))

    def on_writable(self, fd: int) -> None:
        conn = self._conns.get(fd)
        if conn is not None and conn.state == "writing":
            self._send(conn)

    def expire(self, now: float) -> None:
        for fd, conn in list(self._conns.items()):
            if now >= conn.deadline:
                self._close(fd)

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        self.sock.close()

    # -- inside -------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the listener stays, try later
                diag.warning("metrics: cannot accept a connection: %s", exc.strerror)
                return
            sock.setblocking(False)
            if len(self._conns) >= 2 * self.max_connections:
                sock.close()  # a flood: not even a 503
                continue
            conn = _Conn(sock, self.clock() + self.request_timeout)
            self._conns[sock.fileno()] = conn
            if len(self._conns) > self.max_connections:
                # Over the cap: 503, sent the way every answer is (then a half-close and
                # a short linger), so that the request the client is sending meanwhile
                # does not turn the close into a reset that destroys the 503.
                self._answer(conn, BUSY)

    def _respond(self, conn: _Conn) -> bytes:
        method = conn.parser.get_method()
        path = conn.request.url.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"method not allowed\n",
                             extra=b"Allow: GET, HEAD\r\n")
        head_only = method == b"HEAD"
        if path != PATH:
            return _response(b"404 Not Found", b"not found\n", head_only=head_only)
        try:
            body = self.render()
        except Exception as exc:  # a bug in rendering must not take down the master
            diag.error("metrics: rendering failed: %r", exc)
            return _response(b"500 Internal Server Error", b"rendering failed\n",
                             head_only=head_only)
        return _response(b"200 OK", body, CONTENT_TYPE, head_only=head_only)

    def _answer(self, conn: _Conn, response: bytes) -> None:
        conn.out = memoryview(response)
        conn.state = "writing"
        conn.deadline = self.clock() + self.response_timeout
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(fd)
            return
        conn.state = "closing"
        conn.deadline = min(conn.deadline, self.clock() + LINGER)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()
