"""Accepting connections and reading each one's ClientHello without consuming it.

Job: accept on a bound socket within the worker's connection caps, then peek (MSG_PEEK) at the
client's first bytes until the ClientHello parser has an outcome, and hand the socket, still
holding every byte the client sent, to the worker's dispatch.

Rules:
- Peeked bytes are never consumed here (DESIGN.md house rule 3): TLS or the relay reads them.
- No busy-spinning on a partial hello: a peeked socket stays readable, so TCP sockets get
  ``SO_RCVLOWAT`` set to the bytes still missing (reset to 1 before the hand-off); unix
  sockets ignore it in poll and are re-armed by a short timer instead.
- ``client_hello_timeout`` bounds the whole wait, counted from the connection's arrival as
  far as the kernel can tell (TCP_INFO; the deferred-accept wait; time in the accept
  backlog), not from accept(): a silent client is held for the timeout, not twice it, and
  sockets that waited in the backlog while sniport was at its cap do not get a fresh
  timeout each. A silent client delays nobody else.
- Bytes that are not TLS are looked at further (``wire/detect.py``) when the config has a
  use for it (a ``[[passthrough]] protocol`` block, or ``[default] non_tls = "http"``): until
  an SSH identification or HTTP/1.x request line is complete, or nothing known can follow,
  within ``DETECT_MAX_BYTES`` and the same ``client_hello_timeout``. Otherwise the first byte
  that is not TLS decides, as before.
- A client that sends nothing at all for ``non_tls_timeout`` (counted like the hello's) goes
  to ``[default].silent`` when that names a block: it waits for the server to speak first.
- At ``max_connections`` accepting pauses (the kernel's backlog holds new clients) and resumes
  as connections close; EMFILE/ENFILE pause accepting briefly instead of spinning.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import TYPE_CHECKING

from sniport.deadlines import deadlines_for
from sniport.logs import diag
from sniport.net.binding import DEFER_ACCEPT, BoundListener
from sniport.net.poller import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLRDHUP
from sniport.wire import proxyproto
from sniport.wire.clienthello import (
    MAX_HELLO_BYTES,
    ClientHelloParser,
    MalformedHello,
    NeedMore,
    NotTLS,
)
from sniport.wire.detect import SILENT, detect
from sniport.wire.detect import NeedMore as DetectMore

if TYPE_CHECKING:
    from sniport.net.conn import ConnRecord, Owner

ACCEPT_BATCH = 64  # accepts per wake-up, so one busy listener cannot starve the loop
RESOURCE_PAUSE = 0.1  # seconds to stop accepting when the process is out of descriptors
UNIX_REARM = 0.005  # seconds between peeks of a partial hello on a unix socket
PEEK_SIZE = MAX_HELLO_BYTES + 1  # one byte more than the cap, so an oversized hello is seen
PROXY_V2_MAX = 4096  # bytes of a v2 header after its fixed 16 (addresses and TLVs)
# Bytes in which a non-TLS protocol must show itself: an HTTP request line longer than this
# is not answered on the TLS port (nginx's large_client_header_buffers is 8K; a plain-http
# URL that long is hardly typed by a person, and SSH's line is 255 at most).
DETECT_MAX_BYTES = 4096

_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
READ_EVENTS = EPOLLIN | EPOLLRDHUP
HANGUP_EVENTS = EPOLLRDHUP | EPOLLHUP | EPOLLERR

# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s; tcpi_last_data_recv and
# tcpi_last_ack_recv (milliseconds since the last data / ACK received) are u32 13 and 14.
_TCP_INFO_TIMES = struct.Struct("=52xII")


def arrival_time(sock: socket.socket, now: float, deferred: bool) -> float:
    """When the client's connection arrived, in event-loop time: the kernel's time since the
    last packet received from it (TCP_INFO) — for a client that sent nothing or one burst,
    its arrival, however long it waited in the accept backlog — less the deferred-accept
    wait when accept() returned it without data (``deferred``). ``now`` where the kernel
    cannot tell (unix sockets)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_TIMES.size)
    except OSError:
        return now
    if len(info) < _TCP_INFO_TIMES.size:
        return now
    since_data, since_ack = _TCP_INFO_TIMES.unpack_from(info)
    waited: float = min(since_data, since_ack) / 1000.0
    return now - waited - (DEFER_ACCEPT if deferred else 0)


class Listener:
    __slots__ = ("_active", "_loop", "_worker", "bound", "fd", "label", "mlabel", "mopen",
                 "proxy_protocol", "sock")

    def __init__(self, worker: Owner, bound: BoundListener,
                 proxy_protocol: bool = False, mlabel: str = "", mopen: int = -1) -> None:
        self.bound = bound
        self.mlabel = mlabel  # its label in the metrics: the config's address (port 0 too)
        self.mopen = mopen  # its open-connections cell in the worker's metrics slot
        self.proxy_protocol = proxy_protocol  # each connection starts with a PROXY header
        self.label = str(bound.address)
        self.sock = bound.sock
        self.fd = bound.sock.fileno()
        self._worker = worker
        self._loop = worker.loop
        self._active = False

    def resume(self) -> None:
        if not self._active:
            self._active = True
            self._loop.add_reader(self.fd, self._on_acceptable)

    def pause(self) -> None:
        if self._active:
            self._active = False
            self._loop.remove_reader(self.fd)

    def _on_acceptable(self) -> None:
        worker = self._worker
        for _ in range(ACCEPT_BATCH):
            if worker.at_capacity():
                return
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    worker.out_of_descriptors(exc)
                    return
                # ECONNABORTED, EPROTO, ...: that one client is gone; keep accepting.
                diag.debug("accept on %s: %s", self.label, exc)
                continue
            worker.accepted(self, sock, addr)


class HelloReader:
    """Peeks until the ClientHello is complete, then calls ``worker.dispatch``.

    The first peek happens at accept time (with TCP_DEFER_ACCEPT the hello is usually there
    already); only a client that makes us wait gets a place in the poller and a timer."""

    __slots__ = (
        "_detecting",
        "_had_bytes",
        "_loop",
        "_lowat",
        "_parser",
        "_poller",
        "_proxy",
        "_rearm",
        "_registered",
        "_seen",
        "_silent",
        "_on_unix",
        "_worker",
        "conn",
        "deadline",
        "deadline_slot",
        "fd",
        "sock",
    )

    def __init__(self, worker: Owner, sock: socket.socket, conn: ConnRecord, unix: bool,
                 proxy: bool = False) -> None:
        self._worker = worker
        self._proxy = proxy  # a PROXY header comes first: read it, then peek the hello
        self._loop = worker.loop
        self._poller = worker.poller
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self._parser = ClientHelloParser()
        self._seen = 0
        self._lowat = False
        self._on_unix = unix
        self._registered = False
        self._detecting = False  # not TLS: wire/detect.py is looking at the first bytes
        self._had_bytes = False  # a PROXY header came and was consumed (_seen starts again)
        self._silent = False  # the deadline is non_tls_timeout's, not client_hello_timeout's
        self._rearm: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.deadline_slot = 0

    def start(self) -> None:
        self._peek(0)

    def _on_event(self, events: int) -> None:
        self._peek(events)

    def _peek(self, events: int) -> None:
        try:
            data = self.sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._wait(READ_EVENTS)
            return
        except OSError as exc:
            self._fail("client_reset" if exc.errno == errno.ECONNRESET else
                       f"client_error: {exc.strerror}")
            return
        if not data:
            if self._proxy:
                self._fail("eof_before_proxy_header" if self._seen == 0 else
                           "eof_in_proxy_header")
                return
            self._fail("eof_before_hello" if self._seen == 0 else "eof_in_hello")
            return
        if len(data) == self._seen:
            # Nothing new: a peek never sees the end of stream behind bytes still unread,
            # but epoll reports the peer's shutdown (EPOLLRDHUP).
            if events & HANGUP_EVENTS:
                self._fail("eof_in_proxy_header" if self._proxy else "eof_in_hello")
            else:
                self._wait(READ_EVENTS)
            return
        if self._proxy:
            self._proxy_header(data)
            return
        if self._detecting:
            self._first_bytes(data)
            return
        try:
            outcome = self._parser.feed(memoryview(data)[self._seen :])
        except MalformedHello as exc:
            self._fail(f"malformed_hello: {exc.reason}")
            return
        self._seen = len(data)
        if isinstance(outcome, NeedMore):
            self._need(len(data) + outcome.at_least)
            return
        if isinstance(outcome, NotTLS) and self._worker.detects:
            self._detecting = True
            self._first_bytes(data)
            return
        self._stop_waiting()
        self._worker.dispatch(self.sock, self.conn, outcome)

    def _first_bytes(self, data: bytes) -> None:
        """Not TLS: which protocol, if any, these bytes begin (wire/detect.py); looked at
        whole each time, as a prefix can change its verdict only as it grows."""
        result = detect(data, max_bytes=DETECT_MAX_BYTES)
        self._seen = len(data)
        if isinstance(result, DetectMore):
            self._need(result.at_least)
            return
        self._stop_waiting()
        self._worker.dispatch(self.sock, self.conn, result)

    def _need(self, total: int) -> None:
        """Wait until ``total`` bytes are there in all."""
        if not self._on_unix:
            # Readable again only once the missing bytes are all there: no spinning.
            self._lowat = True
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, total)
        self._wait(READ_EVENTS)

    def _proxy_header(self, data: bytes) -> None:
        """DESIGN.md "PROXY protocol from a load balancer": the header is consumed exactly
        (peeked, parsed, then read to its last byte), so that the hello behind it stays in
        the socket; ``client_hello_timeout`` bounds both."""
        header = proxyproto.parse(data, max_v2=PROXY_V2_MAX)
        if isinstance(header, proxyproto.Invalid):
            self._fail(f"proxy_protocol_invalid: {header.reason}")
            return
        if isinstance(header, proxyproto.NeedMore):
            self._seen = len(data)
            if not self._on_unix:
                self._lowat = True
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, header.at_least)
            self._wait(READ_EVENTS)
            return
        try:
            taken = self.sock.recv(header.length)
        except OSError as exc:
            self._fail(f"client_error: {exc.strerror}")
            return
        if len(taken) != header.length:  # it was all there (peeked): never, but say so
            self._fail("proxy_protocol_invalid: header not read whole")
            return
        self._proxy = False
        self._seen = 0
        self._had_bytes = True
        if self._lowat:
            self._lowat = False
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if not self._worker.proxied(self.conn, header):
            self._fail_closed()
            return
        if len(data) > header.length:
            self._peek(0)  # the hello came with it
        else:
            self._wait(READ_EVENTS)
            self._arm_silence()

    def _fail_closed(self) -> None:
        """The worker refused the connection and wrote its line: only release it here."""
        if self._registered:
            self._poller.forget(self.fd)
        self._cancel_timers()
        self.sock.close()

    def _wait(self, mask: int) -> None:
        if self._on_unix and self._seen:
            # poll() on a unix socket ignores SO_RCVLOWAT: watch only for a hang-up, and
            # look again shortly.
            mask = EPOLLRDHUP
            if self._rearm is None:
                self._rearm = self._loop.call_later(UNIX_REARM, self._on_rearm)
        if not self._registered:
            # The first wait (most hellos are complete at accept: no timer, no syscall).
            self._registered = True
            self._poller.register(self.fd, mask, self._on_event, self._crashed)
            conn = self.conn
            if not self._on_unix:
                # accept() returned without data only if nothing at all has come, not
                # even a PROXY header since consumed.
                deferred = self._seen == 0 and not self._had_bytes \
                    and self._worker.defers_accept
                conn.start = arrival_time(self.sock, conn.start, deferred)
            deadlines_for(self._loop).set(self, conn.start + self._worker.client_hello_timeout)
            self._arm_silence()
        else:
            self._poller.modify(self.fd, mask)

    def _arm_silence(self) -> None:
        """Nothing has come yet: with a ``[default].silent`` block, the wait for a first
        byte ends at ``non_tls_timeout``."""
        after = self._worker.silent_after
        if after and self._seen == 0 and not self._proxy and not self._silent:
            self._silent = True
            deadlines_for(self._loop).set(self, min(self.deadline, self.conn.start + after))

    def _on_rearm(self) -> None:
        self._rearm = None
        self._poller.modify(self.fd, READ_EVENTS)

    def expired(self, now: float) -> None:
        """``client_hello_timeout`` since the connection arrived, or ``non_tls_timeout``
        for a client that has said nothing: the server is to speak first."""
        if self._silent:
            self._silent = False
            hello_deadline = self.conn.start + self._worker.client_hello_timeout
            if self._seen == 0 and not self._proxy:
                if not self._bytes_waiting():
                    self._stop_waiting()
                    self._worker.dispatch(self.sock, self.conn, SILENT)
                    return
                # Its first bytes came in the same turn of the loop as the timer: they
                # decide, not the silence.
                deadlines_for(self._loop).set(self, hello_deadline)
                self._peek(0)
                return
            # It has spoken since: the rest of its client_hello_timeout.
            if hello_deadline > now:
                deadlines_for(self._loop).set(self, hello_deadline)
                return
        self._fail("client_hello_timeout")

    def _bytes_waiting(self) -> bool:
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False  # nothing yet (EAGAIN), or an error the next peek reports

    def _crashed(self, exc: BaseException) -> None:
        self._fail(f"internal_error: {type(exc).__name__}")

    def _cancel_timers(self) -> None:
        if self._registered:
            deadlines_for(self._loop).clear(self)
        if self._rearm is not None:
            self._rearm.cancel()
            self._rearm = None

    def _stop_waiting(self) -> None:
        """The socket lives on (relay or TLS): out of the poller, options back to normal."""
        if self._registered:
            self._poller.unregister(self.fd)
        self._cancel_timers()
        if self._lowat:
            # The relay and TLS read whatever is there: back to the default.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _fail(self, reason: str) -> None:
        if self._registered:
            self._poller.forget(self.fd)
        self._cancel_timers()
        self.sock.close()
        self._worker.finish(self.conn, reason)

    def abort(self, reason: str) -> None:
        """Close now (fast shutdown)."""
        self._fail(reason)
