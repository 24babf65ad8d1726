"""Upstream HTTP applications of a proxy route: connections, the keep-alive pool, health.

Job: per worker, per upstream, keep up to ``keepalive`` idle connections for reuse, open new
ones (TCP, unix socket, TLS) within ``connect_timeout``, parse responses with httptools, and
track health: passive (``max_fails`` failures in a row mark an upstream down for
``fail_timeout``) and active (``health`` checks that take it out and put it back).

Rules:
- A connection is only pooled in a known state: the response was complete, framed by length
  or chunks, the request fully sent, the upstream did not ask to close. Anything else closes.
- Responses are parsed by httptools only (house rule 8); a response to HEAD ends at its head
  and its connection is not reused (httptools cannot be told that a message answers HEAD,
  MagicStack/httptools#47).
- A pooled connection that the upstream closes while idle is dropped from the pool at once;
  idle connections close after ``keepalive_timeout`` (0: none is kept).
- A response head is capped at ``MAX_RESPONSE_HEAD`` bytes: past it the response is a 502
  ("upstream sent too big header", as nginx says), counted on the bytes fed to httptools,
  since it buffers an unfinished header itself, out of our callbacks' sight.
- State changes of an upstream (down, up) are logged once, with the reason.
- A request holds its connection through an ``UpstreamLease``: taking one counts the request
  in ``Upstream.active`` (what ``least_conn`` balances on), and its ``release(outcome)`` is
  the one place that count goes down, the upstream's health is told the outcome, and the
  connection is pooled or closed. It acts once: a second release (an error path that meets
  another) is a no-op, so the count can neither leak nor go negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, Literal, Protocol

import httptools

from sniport import metrics
from sniport.addresses import HttpUpstream, TcpAddress, UnixAddress
from sniport.config import ProxyHandler
from sniport.deadlines import Deadlines, deadlines_for
from sniport.logs import diag
from sniport.net.descriptors import LEDGER

MAX_RESPONSE_HEAD = 64 * 1024


class ResponseHandler(Protocol):
    """What a connection reports to the exchange that uses it."""

    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_message_complete(self) -> None: ...
    def upstream_upgraded(self, rest: bytes) -> None: ...
    def upstream_failed(self, reason: str) -> None: ...
    def upstream_lost(self) -> None: ...
    def upstream_paused(self) -> None: ...
    def upstream_resumed(self) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class UpstreamConn(asyncio.Protocol):
    """One connection to an upstream; between requests it waits in the pool."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: Any = None
        self.parser: Any = None
        self.handler: ResponseHandler | None = None
        self.deadline = 0.0  # while idle in the pool: keepalive_timeout
        self.deadline_slot = 0
        self.deadlines: Deadlines | None = None  # where it is filed, once pooled
        self.closed = False
        self.reused = False
        self.raw: Callable[[bytes], None] | None = None  # a tunnel takes the bytes as they are
        self._feeding = False
        self._release_loop: asyncio.AbstractEventLoop | None = None  # pool me after the feed
        self._stray = False  # a message began after the one that was asked for
        self._in_head = False  # a response head has begun and not ended
        self._head_fed = 0

    # -- lifecycle ------------------------------------------------------------------------

    def begin(self, handler: ResponseHandler) -> None:
        """Take the connection for one request; a fresh parser for a fresh message."""
        self._unfile()
        self.handler = handler
        self._stray = False
        if self.parser is None:
            # One parser for the connection's life: llhttp is ready for the next message
            # once one completes, and a connection is only reused after a clean completion.
            self.parser = httptools.HttpResponseParser(self)

    def release_when_clean(self, loop: asyncio.AbstractEventLoop) -> None:
        """The response is complete: back to the pool, once the current read is parsed to
        its end and held nothing more (or now, outside a read)."""
        self.handler = None
        if self._feeding:
            self._release_loop = loop
        else:
            self.upstream.release(self, loop)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.handler = None
            self._unfile()
            if self.transport is not None:
                self.transport.close()

    def _unfile(self) -> None:
        if self.deadlines is not None:
            self.deadlines.clear(self)

    def get_status(self) -> int:
        return int(self.parser.get_status_code())

    def keep_alive(self) -> bool:
        return bool(self.parser.should_keep_alive())

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        LEDGER.take()

    def data_received(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        handler = self.handler
        if handler is None:
            # Bytes while idle: the upstream broke the protocol; this one is not reusable.
            self.upstream.drop_idle(self)
            self.close()
            return
        handler.cork()  # a response head and its body reach the client in one write
        self._feeding = True
        try:
            self.parser.feed_data(data)
            # As for requests (http/engine.py, MAX_HEAD_BYTES): the reads in which one head
            # stays unfinished from first to last byte are all head.
            if self._in_head:
                if self._head_fed < 0:
                    self._head_fed = 0
                else:
                    self._head_fed += len(data)
                    if self._head_fed > MAX_RESPONSE_HEAD and self.handler is not None:
                        self._in_head = False
                        self.handler.upstream_failed("upstream sent too big header (over "
                                                     f"{MAX_RESPONSE_HEAD // 1024} KiB)")
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            if self.handler is not None:
                self.handler.upstream_upgraded(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            if self.handler is not None:
                self.handler.upstream_failed(f"bad_response: {exc.__context__ or exc}")
        except httptools.HttpParserError as exc:
            if self.handler is not None:
                self.handler.upstream_failed(f"bad_response: {exc}")
        finally:
            self._feeding = False
            handler.uncork()
            loop, self._release_loop = self._release_loop, None
            if loop is not None:
                if self._stray or self.closed:
                    self.close()  # bytes nobody asked for: not a known state
                else:
                    self.upstream.release(self, loop)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        LEDGER.give()
        self.closed = True
        self._unfile()
        handler, self.handler = self.handler, None
        self.upstream.drop_idle(self)
        if handler is not None:
            handler.upstream_lost()

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_paused()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_resumed()

    # -- httptools callbacks, passed on ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.handler is None:
            self._stray = True
        self._in_head = True
        self._head_fed = -1  # the head began in the current read

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.handler is not None:
            self.handler.on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.handler is not None:
            self.handler.on_headers_complete()

    def expired(self, now: float) -> None:
        """Idle in the pool for ``keepalive_timeout``."""
        self.upstream.drop_idle(self)
        self.close()

    def on_body(self, body: bytes) -> None:
        if self.handler is not None:
            self.handler.on_body(body)

    def on_message_complete(self) -> None:
        if self.handler is not None:
            self.handler.on_message_complete()


class Upstream:
    """One configured upstream of one proxy route, as seen by one worker."""

    def __init__(self, target: HttpUpstream, cfg: ProxyHandler,
                 tls: ssl.SSLContext | None) -> None:
        self.target = target
        self.label = str(target)
        self.cfg = cfg
        self.tls = tls
        self.idle: list[UpstreamConn] = []
        self.active = 0  # requests in flight (least_conn)
        self.fails = 0
        self.down_until = 0.0
        self.healthy = True  # as the active check last saw it
        self.host_header = target.authority.encode("latin-1")

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.down_until

    def take(self) -> UpstreamConn | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConn, loop: asyncio.AbstractEventLoop) -> None:
        """Back to the pool (the caller checked that its state is clean) or closed."""
        conn.handler = None
        if conn.closed or len(self.idle) >= self.cfg.keepalive or not self.cfg.keepalive_timeout:
            conn.close()
            return
        self.idle.append(conn)
        conn.deadlines = deadlines_for(loop)
        conn.deadlines.after(conn, self.cfg.keepalive_timeout)

    def lease(self, conn: UpstreamConn, loop: asyncio.AbstractEventLoop) -> UpstreamLease:
        """``conn`` taken for one request: counted in ``active`` until the lease's release."""
        return UpstreamLease(self, conn, loop)

    def drop_idle(self, conn: UpstreamConn) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    async def connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConn:
        addr = self.target.address
        timeout = self.cfg.connect_timeout
        if isinstance(addr, UnixAddress):
            coro = loop.create_unix_connection(
                lambda: UpstreamConn(self), addr.sockaddr)  # type: ignore[arg-type]
        else:
            assert isinstance(addr, TcpAddress)
            coro = loop.create_connection(
                lambda: UpstreamConn(self), addr.host, addr.port, ssl=self.tls,
                server_hostname=self.target.tls_name if self.tls is not None else None,
                ssl_handshake_timeout=timeout if self.tls is not None else None)
        _, proto = await asyncio.wait_for(coro, timeout)
        assert isinstance(proto, UpstreamConn)
        return proto

    # -- passive health -------------------------------------------------------------------

    def failed(self, now: float, reason: str) -> None:
        self.fails += 1
        max_fails = self.cfg.max_fails
        if max_fails and self.fails >= max_fails and now >= self.down_until:
            self.down_until = now + self.cfg.fail_timeout
            diag.warning("upstream %s down for %.0fs after %d failures in a row (last: %s)",
                         self.label, self.cfg.fail_timeout, self.fails, reason)

    def succeeded(self) -> None:
        if self.fails and self.down_until:
            diag.info("upstream %s answers again", self.label)
            self.down_until = 0.0
        self.fails = 0


# How a request's use of an upstream connection ended: what the upstream's health hears, and
# whether the connection may serve another request. (Literal strings, not an Enum: compared
# on every proxied request, and an Enum member costs a class attribute lookup each time.)
#   "reuse"      answered in full, the connection in a known state: pooled (once clean)
#   "answered"   answered, but the connection cannot be reused: closed
#   "failed"     the upstream failed this request: counts toward max_fails; closed
#   "abandoned"  ended on our side or the client's (client gone, 413, a tunnel's end), or
#                the upstream is not to blame (a stale pooled connection): no verdict on
#                its health; closed
Outcome = Literal["reuse", "answered", "failed", "abandoned"]
OUTCOMES: tuple[Outcome, ...] = ("reuse", "answered", "failed", "abandoned")


class UpstreamLease:
    """One request's hold on one upstream connection (see the module's rules).

    Taken with ``Upstream.lease`` once a connection is about to carry a request; ``release``
    ends it exactly once, whichever way the request ended."""

    __slots__ = ("upstream", "conn", "loop", "released")

    def __init__(self, upstream: Upstream, conn: UpstreamConn,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.upstream = upstream
        self.conn = conn
        self.loop = loop
        self.released = False
        upstream.active += 1

    def release(self, outcome: Outcome, reason: str = "") -> bool:
        """End the lease: ``active`` down by one, the outcome told to the upstream's health
        (``reason`` names a failure), the connection pooled (``"reuse"``) or closed. False,
        and nothing done, if it had already ended."""
        if self.released:
            return False
        self.released = True
        up = self.upstream
        up.active -= 1
        if outcome == "reuse":
            if up.fails:
                up.succeeded()
            # Pooled once the read that completed the response is parsed to its end: a
            # stray byte after it means an unknown state, and a close.
            self.conn.release_when_clean(self.loop)
            return True
        if outcome == "answered":
            up.succeeded()
        elif outcome == "failed":
            up.failed(self.loop.time(), reason)
        self.conn.close()
        return True


def upstream_tls_context(cfg: ProxyHandler) -> ssl.SSLContext:
    """Client context for https:// upstreams: verified against the system store or ``ca``
    unless ``verify = false``."""
    if not cfg.verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=cfg.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class HealthChecker:
    """Active checks of one upstream: GET ``path`` every ``interval``; a status other than
    ``expect`` (or no answer within ``timeout``) takes it out, the next good one puts it back."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.task is None:
            self.task = loop.create_task(self._run(loop))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        health = self.upstream.cfg.health
        assert health is not None
        while True:
            ok, reason = await self.check_once(loop)
            up = self.upstream
            if ok != up.healthy:
                up.healthy = ok
                metrics.upstream_health(up.label, ok)
                if ok:
                    diag.info("upstream %s is up (health check %s)", up.label, health.path)
                else:
                    diag.warning("upstream %s is down (health check %s: %s)", up.label,
                                 health.path, reason)
            await asyncio.sleep(health.interval)

    async def check_once(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, str]:
        health = self.upstream.cfg.health
        assert health is not None
        try:
            return await asyncio.wait_for(self._probe(loop, health.path, health.expect),
                                          health.timeout)
        except TimeoutError:
            return False, f"no answer within {health.timeout:g}s"
        except (OSError, ssl.SSLError) as exc:
            return False, str(exc) or type(exc).__name__

    async def _probe(self, loop: asyncio.AbstractEventLoop, path: str,
                     expect: int) -> tuple[bool, str]:
        conn = await self.upstream.connect(loop)
        probe = _Probe(loop, conn)
        conn.begin(probe)
        conn.transport.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + self.upstream.host_header
            + b"\r\nUser-Agent: sniport-health\r\nConnection: close\r\n\r\n")
        try:
            status = await probe.status
        finally:
            conn.close()
        if status != expect:
            return False, f"status {status}, expected {expect}"
        return True, ""


class OneResponse:
    """A base for handlers that read one whole response on a connection of their own
    (health checks, the ACME client): no flow control to pass on, nothing to cork."""

    def upstream_paused(self) -> None:
        pass

    def upstream_resumed(self) -> None:
        pass

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


class _Probe(OneResponse):
    """A ResponseHandler that only wants the status code of a health check."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: UpstreamConn) -> None:
        self.status: asyncio.Future[int] = loop.create_future()
        self.conn = conn

    def _set(self, value: int | Exception) -> None:
        if not self.status.done():
            if isinstance(value, Exception):
                self.status.set_exception(value)
            else:
                self.status.set_result(value)

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        status = self.conn.get_status()
        if status >= 200 or status == 101:
            self._set(status)

    def on_body(self, body: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        pass

    def upstream_upgraded(self, rest: bytes) -> None:
        self._set(OSError("unexpected upgrade"))

    def upstream_failed(self, reason: str) -> None:
        self._set(OSError(reason))

    def upstream_lost(self) -> None:
        self._set(OSError("connection closed before a response"))
