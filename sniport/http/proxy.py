"""The reverse proxy: a route's ``proxy = { upstreams = [...] }``.

Job: forward each request to an upstream application chosen by the load balancer, stream
the request body to it and its response back, both ways with backpressure; turn an accepted
Upgrade (WebSocket) into a tunnel; answer 502/504 when the upstream cannot.

Rules:
- Callbacks, no Task per request: a pooled connection is taken, the head written, the body
  pushed as it arrives (``Body.attach``), the response pushed to the client as it arrives.
- Backpressure: a client that reads slowly pauses reading from the upstream; an upstream
  that reads slowly pauses reading from the client. Memory stays bounded whatever the size.
- Failures before any byte reached the upstream (connect refused, connect timeout) go to
  the next upstream, whatever the method: the application never saw the request. A request
  without a body whose pooled connection turns out closed is retried once on a fresh one;
  after that, only idempotent requests (RFC 9110 section 9.2.2) without a body go on to
  another upstream.
- Before the response head reached the client an error is a 502 (504 for a timeout); after
  it, the client connection is closed: never a second response (house rule 6).
- The upstream's response is parsed by httptools; a malformed one is a 502 and its
  connection is closed, never pooled.
- A request holds its upstream connection through an ``UpstreamLease`` (http/upstream.py),
  and every way it ends releases that lease (``_complete`` for an answer, ``_release`` for
  anything else): the upstream's count of requests in flight (``least_conn``), its health
  and the pool are settled there, once.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from sniport import metrics
from sniport.config import ProxyHandler
from sniport.deadlines import deadlines_for
from sniport.http.request import BodyTooLarge, ClientGone
from sniport.http.upstream import (
    HealthChecker,
    Outcome,
    Upstream,
    UpstreamConn,
    UpstreamLease,
    upstream_tls_context,
)
from sniport.logs import diag
from sniport.routing import Acl, Network
from sniport.wire.proxyheaders import client_response_headers, serialize, upstream_request_headers

if TYPE_CHECKING:
    from sniport.http.contract import Exchange

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class ProxyRoute:
    """The handler of one proxy route; its upstreams' pools are per worker process."""

    reads_body = True  # the body streams to the upstream as it arrives

    def __init__(self, cfg: ProxyHandler, prefix: str, trusted: list[Network]) -> None:
        self.cfg = cfg
        self.prefix = prefix
        tls: ssl.SSLContext | None = None
        if any(u.scheme == "https" for u in cfg.upstreams):
            tls = upstream_tls_context(cfg)
        self.upstreams = [Upstream(u, cfg, tls if u.scheme == "https" else None)
                          for u in cfg.upstreams]
        self.checkers = [HealthChecker(u) for u in self.upstreams] if cfg.health else []
        self._rr = 0
        self._trusted = Acl(trusted, []) if trusted else None
        self.set_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in cfg.request_headers.items()]
        self.remove = frozenset(n.lower().encode("latin-1") for n in cfg.remove_request_headers)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for checker in self.checkers:
            checker.start(loop)

    def stop(self) -> None:
        for checker in self.checkers:
            checker.stop()
        for up in self.upstreams:
            up.close_idle()

    def trusts(self, ip: str) -> bool:
        return self._trusted is not None and self._trusted.permits(ip)

    def pick(self, now: float, tried: list[Upstream]) -> Upstream | None:
        ups = self.upstreams
        n = len(ups)
        if self.cfg.lb == "least_conn":
            best: Upstream | None = None
            for i in range(n):  # ties go round robin, so equal loads still spread
                up = ups[(self._rr + i) % n]
                if up in tried or not up.available(now):
                    continue
                if best is None or up.active < best.active:
                    best = up
            self._rr = (self._rr + 1) % n
            return best
        for _ in range(n):
            up = ups[self._rr]
            self._rr = (self._rr + 1) % n
            if up not in tried and up.available(now):
                return up
        return None

    def handle(self, ex: Exchange, rest: str) -> None:
        ProxyExchange(self, ex, rest).start()


class ProxyExchange:
    """One request through the proxy, from picking an upstream to the end of the response."""

    __slots__ = ("route", "ex", "loop", "req", "head", "chunked_body", "tried", "up",
                 "lease", "connecting", "status", "headers", "responded", "done", "body_sent",
                 "body_done", "stale_retried", "reading_paused", "deadlines", "deadline",
                 "deadline_slot", "keep_alive", "framed", "last_reason", "tunnel",
                 "pending_head")

    def __init__(self, route: ProxyRoute, ex: Exchange, rest: str) -> None:
        self.route = route
        self.ex = ex
        self.loop = ex.loop
        req = self.req = ex.request
        cfg = route.cfg
        path = ("/" + rest.lstrip("/")) if cfg.strip_prefix else req.path
        target = f"{path}?{req.query}" if req.query else path
        upgrade = None
        if req.upgrade:
            value = req.header(b"upgrade")
            upgrade = value.encode("latin-1") if value else None
        client_ip = ex.conn.client_ip
        self.chunked_body = req.body is not None and req.content_length is None
        headers = upstream_request_headers(
            req.headers, client_ip=client_ip, trusted=route.trusts(client_ip),
            scheme=ex.conn.scheme, host=None, upgrade=upgrade, forwarded=cfg.forwarded,
            set_headers=route.set_headers, remove=route.remove)
        if req.content_length is not None:  # also "Content-Length: 0" on an empty POST
            headers.append((b"content-length", str(req.content_length).encode()))
        elif req.body is not None:
            headers.append((b"transfer-encoding", b"chunked"))
        self.head = (f"{req.method} {target} HTTP/1.1\r\n".encode("latin-1"), headers)
        self.tried: list[Upstream] = []
        self.up: Upstream | None = None
        self.lease: UpstreamLease | None = None  # the connection carrying the request
        self.connecting: asyncio.Task[UpstreamConn] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.responded = False  # the final response head arrived from the upstream
        self.done = False
        self.body_sent = False  # some request body bytes went to the upstream
        self.body_done = req.body is None
        self.stale_retried = False
        self.reading_paused = False
        self.deadlines = deadlines_for(self.loop)
        self.deadline = 0.0  # to the response head, then between body bytes
        self.deadline_slot = 0
        self.keep_alive = False
        self.framed = False  # the response has a Content-Length or chunks
        self.last_reason = ""
        self.tunnel: Tunnel | None = None
        self.pending_head: tuple[int, int | None, list[tuple[bytes, bytes]]] | None = None

    # -- choosing and connecting ----------------------------------------------------------

    def start(self) -> None:
        self.ex.on_abort = self._client_gone
        if self.req.body is not None:
            # Wait until the bytes that came with the head are parsed: a request whose
            # body is broken right there (a smuggling attempt) gets its 400 and nothing
            # of it reaches the upstream.
            self.ex.conn.after_feed(self._begin)
        else:
            self._next_upstream()

    def _begin(self) -> None:
        if not self.done:
            self._next_upstream()

    def _next_upstream(self) -> None:
        up = self.route.pick(self.loop.time(), self.tried)
        if up is None:
            if not self.tried:
                self._fail(502, "no_live_upstream")
            else:
                # 504 only when the application did not answer in time; an upstream that
                # cannot be reached (refused, connect timeout) is a 502.
                status = 504 if self.last_reason == "upstream_timeout" else 502
                self._fail(status, self.last_reason)
            return
        self.tried.append(up)
        self.up = up
        self.ex.upstream = up.label
        conn = up.take()
        if conn is not None:
            self._use(conn)
            return
        self._connect(up)

    def _connect(self, up: Upstream) -> None:
        task = self.loop.create_task(up.connect(self.loop))
        self.connecting = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConn]) -> None:
        self.connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.done:
            if exc is None:
                task.result().close()
            return
        if exc is None:
            self._use(task.result())
            return
        up = self.up
        assert up is not None
        reason = _connect_reason(exc)
        self.last_reason = reason
        metrics.upstream_error(up.label)
        up.failed(self.loop.time(), reason)
        diag.warning("proxy: upstream %s: %s", up.label, reason)
        # Nothing reached the application: any request may go to the next upstream.
        self._next_upstream()

    def _use(self, conn: UpstreamConn) -> None:
        up = self.up
        assert up is not None
        if conn.closed or conn.transport.is_closing():
            # Closed between the connect and now (reset at accept): nothing was sent.
            conn.close()
            self.last_reason = "upstream_closed_before_request"
            up.failed(self.loop.time(), self.last_reason)
            self._next_upstream()
            return
        self.lease = up.lease(conn, self.loop)
        conn.begin(self)
        line, headers = self.head
        if self.route.cfg.host == "upstream":
            headers = [(b"host", up.host_header), *(h for h in headers if h[0] != b"host")]
        conn.transport.write(line + serialize(headers) + b"\r\n")
        self._arm(self.route.cfg.timeout)
        body = self.req.body
        if body is not None and not self.body_sent:
            body.attach(self)

    # -- the request body, pushed by the client connection ---------------------------------

    def body_data(self, chunk: bytes) -> None:
        lease = self.lease
        if lease is None or lease.conn.closed or self.done:
            return
        conn = lease.conn
        self.body_sent = True
        if self.chunked_body:
            conn.transport.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            conn.transport.write(chunk)

    def body_end(self) -> None:
        self.body_done = True
        lease = self.lease
        if lease is not None and not lease.conn.closed and self.chunked_body and not self.done:
            lease.conn.transport.write(b"0\r\n\r\n")  # trailers, if any, are dropped

    def body_error(self, exc: Exception) -> None:
        if isinstance(exc, BodyTooLarge):
            self._fail(413, "body_too_large")
        elif isinstance(exc, ClientGone):
            self._client_gone()

    # -- the upstream's response ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.responded:
            self.headers.append((name, value))
        # after the head: trailer fields of a chunked body, dropped (RFC 9112 section 7.1.2)

    def on_headers_complete(self) -> None:
        assert self.lease is not None  # the connection reports only to its leaseholder
        conn = self.lease.conn
        status = conn.get_status()
        if status < 200:
            if status != 101:
                self.headers = []  # 1xx interim responses are not passed on
            return
        self.status = status
        self.responded = True
        self.keep_alive = conn.keep_alive()
        length: int | None = None
        chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = True
        self.framed = length is not None or chunked or status in (204, 304)
        if chunked:
            length = None
        # The head goes to the client with the first body bytes, or at the end of this read
        # from the upstream: a body broken in the same read is still a clean 502.
        self.pending_head = (status, length, client_response_headers(self.headers,
                                                                     upgrade=False))
        if self.req.method == "HEAD":
            # httptools would wait for a body that never comes (httptools#47): the message
            # ends here, and this connection is not reused.
            self.keep_alive = False
            self._complete()
            return
        self._arm(self.route.cfg.read_timeout)

    def _send_head(self) -> None:
        if self.pending_head is not None:
            status, length, raw = self.pending_head
            self.pending_head = None
            self.ex.start(status, [], length, raw)

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if self.done:
            return
        if self.pending_head is not None:
            self._send_head()
        ex.send(body)
        self._arm(self.route.cfg.read_timeout)
        if not ex.writable and not self.reading_paused:
            # The client reads slower than the upstream sends: stop reading the upstream.
            self.reading_paused = True
            assert self.lease is not None
            self.lease.conn.transport.pause_reading()
            ex.on_resume = self._client_resumed

    def _client_resumed(self) -> None:
        lease = self.lease
        if self.reading_paused and lease is not None and not lease.conn.closed:
            self.reading_paused = False
            lease.conn.transport.resume_reading()
            self._arm(self.route.cfg.read_timeout)

    def on_message_complete(self) -> None:
        if self.responded and not self.done and self.tunnel is None:
            self._complete()

    def upstream_upgraded(self, rest: bytes) -> None:
        lease = self.lease
        assert lease is not None
        if lease.conn.get_status() != 101 or not self.req.upgrade or self.done:
            self.upstream_failed("bad_response: unexpected upgrade")
            return
        self.status = 101
        self.responded = True
        self._disarm()
        raw = client_response_headers(self.headers, upgrade=True)
        self.ex.start(101, [], None, raw)
        self.tunnel = Tunnel(self, lease.conn, rest)

    def upstream_failed(self, reason: str) -> None:
        self.last_reason = reason
        diag.warning("proxy: upstream %s: %s", self.up.label if self.up else "?", reason)
        self._release("failed", reason)
        self._fail(502, reason)

    def upstream_lost(self) -> None:
        if self.done:
            return
        if self.tunnel is not None:
            self.tunnel.upstream_closed()
            return
        if self.responded:
            if not self.framed:
                self._complete()  # the body was delimited by the close (RFC 9112 6.3)
            else:
                self._abort("upstream_closed_mid_response")
            return
        up = self.up
        assert up is not None
        reused = self.lease is not None and self.lease.conn.reused
        if self.body_sent or (self.req.body is not None and self.req.body.received):
            # Not counted against the upstream's health, as before the lease existed.
            self._release("abandoned")
            self._fail(502, "upstream_closed_before_response")
            return
        if reused and not self.stale_retried:
            # A pooled connection the upstream had already closed: once more, on a new one.
            # Not the upstream's failure: keep-alive races are how HTTP/1.1 works (RFC 9112
            # section 9.6).
            self._release("abandoned")
            self.stale_retried = True
            self._connect(up)
            return
        self.last_reason = "upstream_closed_before_response"
        self._release("failed", self.last_reason)
        if self.req.method in IDEMPOTENT and self.req.body is None:
            self._next_upstream()
        else:
            self._fail(502, self.last_reason)

    def cork(self) -> None:
        self.ex.conn.cork()

    def uncork(self) -> None:
        if self.pending_head is not None and not self.done:
            self._send_head()
        self.ex.conn.uncork()

    def upstream_paused(self) -> None:
        self.ex.pause_body()

    def upstream_resumed(self) -> None:
        self.ex.resume_body()

    # -- endings --------------------------------------------------------------------------

    def _complete(self) -> None:
        self._send_head()
        self.done = True
        self._disarm()
        # Reusable only in a known state (upstream.py's rules): framed, the request sent
        # whole, no close asked for, and no read left paused.
        reusable = self.keep_alive and self.framed and self.body_done and not self.reading_paused
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release("reuse" if reusable else "answered")
        self.ex.on_resume = None
        self.ex.on_abort = None
        self.ex.end()

    def _fail(self, status: int, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.pending_head = None
        self._disarm()
        self._drop_conn()
        if self.ex.head_sent:
            self.ex.note = reason
            self.ex.abort()
        else:
            self.ex.close_after = self.ex.close_after or not self.body_done
            self.ex.fail(status, reason)

    def _abort(self, reason: str) -> None:
        self.done = True
        self.pending_head = None
        self._disarm()
        self._drop_conn()
        self.ex.note = reason
        self.ex.abort()

    def _drop_conn(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._release("abandoned")

    def _release(self, outcome: Outcome, reason: str = "") -> None:
        """The one way this request lets go of its upstream connection (see the module's
        rules); a no-op once let go."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release(outcome, reason)
        elif outcome == "failed" and self.up is not None:
            # No connection held (a timeout while a stale one is being replaced): the
            # failure is the upstream's all the same.
            self.up.failed(self.loop.time(), reason)

    def _client_gone(self) -> None:
        if self.tunnel is not None:
            self.tunnel.client_closed()
        self.done = True
        self._disarm()
        self._drop_conn()

    # -- deadlines ------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self.deadlines.set(self, self.loop.time() + delay)

    def _disarm(self) -> None:
        self.deadlines.clear(self)

    def expired(self, now: float) -> None:
        """The worker's Deadlines found ``deadline`` passed."""
        if self.done:
            return
        if self.reading_paused:
            self._arm(self.route.cfg.read_timeout)  # the client is the slow one
            return
        if not self.responded:
            self.last_reason = "upstream_timeout"
            if self.up is not None:
                self._release("failed", self.last_reason)
                diag.warning("proxy: upstream %s: no response within %gs", self.up.label,
                             self.route.cfg.timeout)
            self._fail(504, "upstream_timeout")
        else:
            self._abort("upstream_read_timeout")


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, ssl.SSLError):
        return f"tls_error: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"connect_error: {exc.strerror or exc}"
    return f"connect_error: {type(exc).__name__}"


class Tunnel:
    """After a 101: bytes both ways, untouched, until either side closes or nothing moves for
    ``idle_timeout``. Backpressure both ways; the TLS side cannot half-close in asyncio, so
    the end of either direction ends the tunnel once what was sent is flushed."""

    __slots__ = ("px", "conn", "closed", "deadline", "deadline_slot", "idle")

    def __init__(self, px: ProxyExchange, conn: UpstreamConn, first: bytes) -> None:
        self.px = px
        self.conn = conn
        self.closed = False
        self.deadline = 0.0
        self.deadline_slot = 0
        self.idle = px.route.cfg.idle_timeout  # 0: no idle limit
        px.deadlines.after(self, self.idle)
        conn.raw = self.from_upstream
        pending = px.ex.upgrade(self.from_client)
        px.ex.on_resume = self._client_resumed
        if first:
            self.from_upstream(first)
        if pending:
            self.from_client(pending)

    def from_client(self, data: bytes) -> None:
        if self.idle:
            self.px.deadlines.after(self, self.idle)
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > 256 * 1024:
            self.px.ex.pause_body()  # resumed by upstream_resumed

    def from_upstream(self, data: bytes) -> None:
        if self.idle:
            self.px.deadlines.after(self, self.idle)
        self.px.ex.send(data)
        if not self.px.ex.writable and not self.px.reading_paused:
            self.px.reading_paused = True
            self.conn.transport.pause_reading()

    def _client_resumed(self) -> None:
        if self.px.reading_paused and not self.conn.closed:
            self.px.reading_paused = False
            self.conn.transport.resume_reading()

    def expired(self, now: float) -> None:
        """No byte either way for ``idle_timeout``."""
        self._end("tunnel_idle_timeout")

    def upstream_closed(self) -> None:
        self._end("tunnel_closed_by_upstream")

    def client_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.px.deadlines.clear(self)
            self.px._release("abandoned")

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        px = self.px
        px.deadlines.clear(self)
        px.done = True
        px._release("abandoned")
        ex = px.ex
        ex.note = reason
        ex.close_after = True
        ex.on_abort = None
        ex.on_resume = None
        ex.end()
