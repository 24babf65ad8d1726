"""One event loop serving connections: accept, read the hello, route, hand off.

Job: own the listeners, the per-worker connection caps and the set of live connections of
one process, and write each connection's log line when it ends.

Rules: every connection that is accepted ends in ``finish`` exactly once, with the reason it
ended, or in ``forget`` when it moved to another worker (``handover.py``), which then
writes its line; bad input from one client closes that client only; the worker never
blocks. The worker is ``net.conn.Owner`` for the connection code in net/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from sniport import handover, iplimits, metrics
from sniport.addresses import TcpAddress
from sniport.certs.backends import challenge_source
from sniport.certs.challenges import ChallengeAnswers
from sniport.config import ProxyHandler, Server
from sniport.handover import Relayed
from sniport.http.accesslog import RequestLog
from sniport.http.contract import Exchange, WorkerHandler
from sniport.http.engine import App, HttpConnection, Limits
from sniport.http.h2conn import H2Connection
from sniport.http.handlers import HttpsRedirectApp
from sniport.http.proxy import ProxyRoute
from sniport.http.site import SiteApp, lifecycle
from sniport.iplimits import IpLimiter, IpTable
from sniport.logs import AccessLog, diag, throttle
from sniport.metrics import DECISIONS, HELLO_REASONS, NO_BLOCK, WorkerMetrics, hello_reason
from sniport.net.binding import BoundListener, defers_accept
from sniport.net.conn import ConnRecord
from sniport.net.descriptors import LEDGER, MOST_PER_CONNECTION, RESERVE, soft_limit
from sniport.net.listener import RESOURCE_PAUSE, HelloReader, Listener
from sniport.net.passthrough import PassthroughConnection
from sniport.net.poller import Poller
from sniport.net.relay import PipePool
from sniport.net.tls import TlsError
from sniport.routing import Acl, FirstBytes
from sniport.runtime import Runtime, SiteRuntime
from sniport.wire import proxyproto
from sniport.wire.acme import ACME_TLS_ALPN
from sniport.wire.alerts import ACCESS_DENIED, NO_APPLICATION_PROTOCOL, UNRECOGNIZED_NAME
from sniport.wire.clienthello import Hello, NotTLS
from sniport.wire.detect import Detected, Silent, Unknown
from sniport.wire.h2 import Limits as H2Limits
from sniport.wire.h2 import Rate

SSL_SHUTDOWN_TIMEOUT = 1.0


# Bytes read off (and dropped) from a refused client that did not speak TLS, so that the
# close is a FIN rather than a reset (RFC 9293 section 3.10.7.1: unread data means RST).
READ_OFF_BEFORE_CLOSE = 16384


def connection_cap(configured: int) -> tuple[int, str | None]:
    """``max_connections`` lowered to what RLIMIT_NOFILE allows at two descriptors each (a
    passthrough connection's two sockets). The descriptor ledger (net/descriptors.py) then
    counts what connections really hold, pipes included, and pauses accepting before the
    limit: the connection cap alone would let stalled relays run the process out."""
    soft = soft_limit()
    LEDGER.limit = max(MOST_PER_CONNECTION, soft - RESERVE)
    allowed = max(1, (soft - RESERVE) // 2)
    if configured > allowed:
        return allowed, (f"max_connections = {configured} lowered to {allowed}: RLIMIT_NOFILE "
                         f"is {soft} and a passthrough connection holds two descriptors")
    return configured, None


class Worker:
    def __init__(self, runtime: Runtime, bound: list[BoundListener], access_log: AccessLog,
                 loop: asyncio.AbstractEventLoop,
                 http_bound: list[BoundListener] | None = None,
                 control: socket.socket | None = None,
                 worker_metrics: WorkerMetrics | None = None,
                 ip_table: tuple[IpTable, int | None] | None = None) -> None:
        self.loop = loop
        # This worker's metrics slot (metrics.py): a private one when nobody reads it.
        self.m = worker_metrics or WorkerMetrics.disabled(runtime.layout)
        self.mview = self.m.view
        self._mcells = _MetricCells(runtime, self.m)
        self.runtime = runtime
        self.table = runtime.table
        server = runtime.loaded.config.server
        self.client_hello_timeout = server.client_hello_timeout
        self.detects = self.table.detects
        self.silent_after = self.table.silent_after
        self.defers_accept = defers_accept(self.client_hello_timeout, self.silent_after)
        self.max_connections, warning = connection_cap(server.max_connections)
        if warning:
            diag.warning("%s", warning)
        # None when both per-address limits are off: then accepting costs nothing more.
        self.iplimits = ip_limiter(server, ip_table)
        self.live: set[ConnRecord] = set()
        self.access_log = access_log
        self.pipes = PipePool()
        self.poller = Poller(loop)
        self.request_log = RequestLog(access_log, self.mview)
        self.handshake_timeout = server.handshake_timeout
        self.limits = Limits(server.header_timeout, server.keepalive_timeout)
        self.h2limits = h2_limits(server)
        self.h2_max_queued = server.http2_max_queued_output
        # ``bound`` is in the order of ``[server] listen`` (the master binds them so).
        self.listeners = [Listener(self, b, e.proxy_protocol, str(e.address),
                                   self._mcells.open.get(str(e.address), -1))
                          for b, e in zip(bound, server.listen, strict=False)]
        # Whose PROXY headers are believed (DESIGN.md "PROXY protocol from a load balancer").
        self.trusted = Acl(server.trusted_proxies, []) if server.trusted_proxies else None
        self._http_bound = http_bound or []
        self._http_servers: list[asyncio.AbstractServer] = []
        tcp_ports = [b.address.port for b in bound if isinstance(b.address, TcpAddress)]
        acme = runtime.acme
        self.answers = ChallengeAnswers(challenge_source(acme.storage)) if acme else None
        forward: dict[str, ProxyRoute] = {
            block.name: ProxyRoute(ProxyHandler.model_construct(upstreams=[block.http_upstream]),
                                   "/", list(server.trusted_proxies))
            for block in runtime.loaded.config.passthrough if block.http_upstream is not None}
        self._redirect_app = HttpsRedirectApp(self.table, tcp_ports[0] if tcp_ports else None,
                                              self.answers, forward)
        self._accepting = False
        self._full = False  # accepting paused at max_connections or the descriptor budget
        self._resource_timer: asyncio.TimerHandle | None = None
        self.draining = False
        self._drained: asyncio.Future[None] | None = None
        self._lifecycle: list[WorkerHandler] = [
            h for site in runtime.sites.values() for h in lifecycle(site.app)]
        self._lifecycle += forward.values()
        self.control = control  # to the master: relays offered, taken, adopted
        self._offers: dict[int, PassthroughConnection] = {}
        self._offer_ids = 0

    # -- accepting ------------------------------------------------------------------------

    async def start(self) -> None:
        metrics.use(self.m)
        for cell in self._mcells.healthy:
            self.mview[cell] = 1  # until a health check says otherwise
        if self.control is not None:
            self.control.setblocking(False)
            self.loop.add_reader(self.control.fileno(), self._on_control)
        for handler in self._lifecycle:
            handler.start(self.loop)
        self._accepting = True
        for listener in self.listeners:
            listener.resume()
        for bound in self._http_bound:
            server = await self.loop.create_server(self._plain_http, sock=bound.sock)
            self._http_servers.append(server)

    def stop_accepting(self) -> None:
        """No more accepts in this process, for good: its copies of the listening sockets
        close (the master's stay open), so that nothing here keeps a port or a socket
        file alive once the master is gone."""
        self._accepting = False
        for listener in self.listeners:
            listener.pause()
            listener.sock.close()
        for server in self._http_servers:
            server.close()
        self._http_servers.clear()

    def _plain_http(self) -> HttpConnection:
        return HttpConnection(self.loop, self._redirect_app, self.limits, self.request_log,
                              sni=None, client="", scheme="http", on_close=_ignore_close)

    def at_capacity(self) -> bool:
        if len(self.live) < self.max_connections and LEDGER.room_for_a_connection():
            return False
        self._full = True
        for listener in self.listeners:
            listener.pause()  # resumed by finish() when a connection ends
        return True

    def out_of_descriptors(self, exc: OSError) -> None:
        diag.warning("accept: %s; pausing accepts for %.1fs", exc.strerror, RESOURCE_PAUSE)
        for listener in self.listeners:
            listener.pause()
        if self._resource_timer is None:
            self._resource_timer = self.loop.call_later(RESOURCE_PAUSE, self._resume_after_pause)

    def _resume_after_pause(self) -> None:
        self._resource_timer = None
        if self._accepting and len(self.live) < self.max_connections:
            self._full = False
            for listener in self.listeners:
                listener.resume()

    def accepted(self, listener: Listener, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        ip = peer[0] if isinstance(peer, tuple) else ""
        conn = ConnRecord(peer, ip, listener.label, self.loop.time())
        conn.mlabel, conn.mopen = listener.mlabel, listener.mopen
        if listener.proxy_protocol:
            # A unix-socket listener's peers are whoever its file mode lets in: trusted.
            if ip and (self.trusted is None or not self.trusted.permits(ip)):
                sock.close()
                self._log(conn, "proxy_untrusted")
                return
            # The client is known only once the header is read: counted per IP then.
            conn.via, conn.ip = conn.client, ""
        elif self.iplimits is not None and (refused := self._take_ip(conn)):
            sock.close()
            self._log(conn, refused)
            return
        LEDGER.take()  # the client's socket, given back in finish()
        self.live.add(conn)
        self._mopen(conn, 1)
        reader = HelloReader(self, sock, conn, listener.bound.is_unix,
                             proxy=listener.proxy_protocol)
        conn.handler = reader
        reader.start()

    def _take_ip(self, conn: ConnRecord) -> str:
        """Count ``conn`` under the per-address limits of every worker (iplimits.py): ""
        if admitted (``_release`` gives its place back), else the reason it is refused,
        counted as a denial."""
        limits = self.iplimits
        if limits is None or not conn.ip:
            return ""
        key = limits.admit(conn.ip)
        if key >= iplimits.NOT_COUNTED:
            conn.ipkey = key
            return ""
        if key == iplimits.OVER_COUNT:
            self.mview[self._mcells.denied_per_ip] += 1
            return "per_ip_limit"
        self.mview[self._mcells.denied_per_ip_rate] += 1
        return "per_ip_rate"

    def proxied(self, conn: ConnRecord, header: proxyproto.Proxied) -> bool:
        """A PROXY header was read: its source is the client from now on (allow/deny,
        per-IP limits, logs, X-Forwarded-For, the PROXY header sent upstream); LOCAL and
        UNKNOWN keep the socket's addresses (a balancer's health check). False, with the
        line written, if the per-IP limit refuses the client."""
        if header.command == "PROXY" and header.source is not None:
            conn.peer = header.source
            conn.ip = header.client_ip() or ""
            conn.local = header.dest
        else:
            conn.ip = conn.peer[0] if isinstance(conn.peer, tuple) else ""
            # LOCAL is what balancers send for their own checks; UNKNOWN and unix sources
            # are real clients whose address the balancer could not give.
            conn.probe = header.command == "LOCAL"
        unique = header.unique_id
        if unique:
            # As text when it is printable without spaces (HAProxy's unique-id-format), else
            # hex: a log field never carries raw bytes.
            printable = all(33 <= b < 127 for b in unique)
            conn.proxy_id = unique.decode("ascii") if printable else unique.hex()
        refused = self._take_ip(conn)
        if refused:
            self._release(conn)  # not counted under the per-IP limits: nothing to give back
            self._log(conn, refused)
            return False
        return True

    # -- routing --------------------------------------------------------------------------

    def dispatch(self, sock: socket.socket, conn: ConnRecord,
                 outcome: Hello | NotTLS | Detected | Unknown | Silent) -> None:
        """Route a connection by its first bytes (README "Decision order"): a ClientHello
        by its name, other bytes by what they are."""
        why = ""  # bytes of no known protocol: what was wrong with them, for the log
        if isinstance(outcome, Hello):
            conn.sni = outcome.sni
            conn.alpn = outcome.alpn
            conn.hello_size = outcome.size
            conn.ech = outcome.ech
            # An ECH hello: by its outer (public) name.
            route = self.table.decide(outcome.sni, outcome.alpn)
        elif isinstance(outcome, NotTLS):
            route = self.table.non_tls()
        else:
            first: FirstBytes
            if isinstance(outcome, Detected) and outcome.protocol in ("ssh", "http"):
                first = "ssh" if outcome.protocol == "ssh" else "http"
            elif isinstance(outcome, Silent):
                first = "silent"
            else:
                first = "other"
                why = outcome.reason if isinstance(outcome, Unknown) else ""
            conn.proto = first
            route = self.table.by_first_bytes(first)
        conn.route = route.label
        denied = route.acl is not None and not route.acl.permits(conn.ip)
        block = route.block.name if route.block is not None else ""
        challenge = route.kind == "terminate" and isinstance(outcome, Hello) \
            and ACME_TLS_ALPN in outcome.alpn
        cells = self._mcells
        if route.kind == "reject":
            decision = "reject" if isinstance(outcome, Hello) else "non_tls"
        else:
            decision = "acme_challenge" if challenge else route.kind
        cell = cells.connections.get((conn.mlabel, decision, block))
        if cell is not None:
            self.mview[cell] += 1
        if denied:
            self.mview[cells.denied_acl[block]] += 1
        if denied and route.kind != "terminate":
            # A passthrough block's client that its allow/deny lists refuse: a TLS
            # access_denied alert (for bytes that are not TLS, just the close).
            self._refuse(sock, conn, ACCESS_DENIED if isinstance(outcome, Hello) else b"")
            self.finish(conn, "denied")
            return
        if route.kind == "reject":
            # RFC 6066 section 3: unrecognized_name, fatal; RFC 7301 section 3.2:
            # no_application_protocol for a name whose blocks all want another ALPN.
            alert = b"" if not isinstance(outcome, Hello) else \
                NO_APPLICATION_PROTOCOL if route.rule == "alpn" else UNRECOGNIZED_NAME
            self._refuse(sock, conn, alert)
            self.finish(conn, f"rejected_{route.rule}: {why}" if why else
                        f"rejected_{route.rule}")
            return
        if route.kind == "http":
            # [default] non_tls = "http": answered as on http_listen, on this socket.
            task = self.loop.create_task(self._plain_http_here(sock, conn))
            conn.handler = _TaskHandle(task)
            return
        assert route.block is not None
        if challenge:
            assert isinstance(outcome, Hello)
            self._acme_challenge(sock, conn, outcome, self.runtime.sites[route.block.name])
            return
        if route.kind == "passthrough":
            handler = PassthroughConnection(self, sock, conn,
                                            self.runtime.passthrough[route.block.name],
                                            conn.sni, not isinstance(outcome, Hello))
            conn.handler = handler
            handler.start()
            return
        site = self.runtime.sites[route.block.name]
        # A terminated site's refused client gets what nginx's `deny` gives: the handshake,
        # then 403 (the site's error page) for its request, and a close.
        task = self.loop.create_task(self._terminate(sock, conn, site, denied))
        conn.handler = _TaskHandle(task)

    def _acme_challenge(self, sock: socket.socket, conn: ConnRecord, hello: Hello,
                        site: SiteRuntime) -> None:
        """A hello offering ``acme-tls/1`` for one of our sites (RFC 8737): the challenge
        certificate if it is one of our ACME names, offers exactly that protocol and has a
        challenge pending; else a failed handshake. (Passthrough names never come here:
        their hellos are relayed untouched, whatever they offer.) The site's allow/deny
        lists do not apply: the CA validates from addresses nobody lists, and the answer
        reveals nothing."""
        if not site.acme or hello.sni not in site.site.hosts:
            why = "not an ACME name"
        elif hello.alpn != (ACME_TLS_ALPN,):
            why = "acme-tls/1 offered with other protocols"
        elif self.answers is None:
            why = "no challenge pending"
        else:
            # The answer is looked up in the storage (a file, or Redis): asynchronously.
            task = self.loop.create_task(self._answer_challenge(sock, conn, self.answers,
                                                                hello.sni))
            conn.handler = _TaskHandle(task)
            return
        self._refuse(sock, conn, NO_APPLICATION_PROTOCOL)
        self.finish(conn, f"acme_tls_alpn_refused: {why}")

    async def _answer_challenge(self, sock: socket.socket, conn: ConnRecord,
                                answers: ChallengeAnswers, name: str) -> None:
        """The handshake is the answer (RFC 8737 section 3): then the connection closes."""
        why = "no challenge pending"
        try:
            context = await answers.tls_alpn01(name)
        except asyncio.CancelledError:
            sock.close()
            self.finish(conn, "shutdown")
            raise
        except (OSError, TlsError, ValueError) as exc:  # e.g. out of descriptors
            context, why = None, f"cannot build the challenge answer: {exc}"
        if context is None:
            self._refuse(sock, conn, NO_APPLICATION_PROTOCOL)
            self.finish(conn, f"acme_tls_alpn_refused: {why}")
            return
        transport = await self._handshake(sock, conn, asyncio.Protocol, context)
        if transport is not None:
            transport.close()
            self.finish(conn, "acme_tls_alpn_01")

    async def _handshake(self, sock: socket.socket, conn: ConnRecord,
                         factory: Callable[[], asyncio.BaseProtocol],
                         context: ssl.SSLContext) -> asyncio.BaseTransport | None:
        """TLS on the socket as it is (the hello still unread in it); None (the connection
        ended, with its reason) if the handshake fails."""
        try:
            transport, _ = await self.loop.connect_accepted_socket(
                factory, sock, ssl=context, ssl_handshake_timeout=self.handshake_timeout,
                # A close sends close_notify and waits this long for the client's: not the
                # 30 s default, or every graceful stop would wait on lazy clients.
                ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT)
        except asyncio.CancelledError:
            sock.close()
            self.finish(conn, "shutdown")
            raise
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            sock.close()
            self.finish(conn, f"tls_handshake_failed: {_tls_reason(exc)}")
            return None
        except Exception as exc:  # a bug here must cost one connection, never the worker
            diag.exception("terminating TLS for %s", conn.client)
            sock.close()
            if conn in self.live:
                self.finish(conn, f"internal_error: {type(exc).__name__}")
            return None
        return transport

    async def _plain_http_here(self, sock: socket.socket, conn: ConnRecord) -> None:
        """Plaintext HTTP on the TLS port: the request line still unread in the socket,
        served by what serves ``http_listen`` (308 to https:// for site hosts, a passthrough
        block's http_upstream, ACME HTTP-01, 404 otherwise)."""
        def closed(reason: str, bytes_in: int, bytes_out: int) -> None:
            conn.up, conn.down = bytes_in, bytes_out
            self.finish(conn, reason)

        proto = HttpConnection(self.loop, self._redirect_app, self.limits, self.request_log,
                               sni=None, client=conn.client, scheme="http", on_close=closed,
                               client_ip=conn.ip)
        if self.draining:
            proto.closing = True
        try:
            await self.loop.connect_accepted_socket(lambda: proto, sock)
        except asyncio.CancelledError:
            sock.close()
            self.finish(conn, "shutdown")
            raise
        except OSError as exc:
            sock.close()
            self.finish(conn, f"client_error: {exc.strerror or type(exc).__name__}")
            return
        except Exception as exc:  # a bug here must cost one connection, never the worker
            diag.exception("plaintext HTTP for %s", conn.client)
            sock.close()
            self.finish(conn, f"internal_error: {type(exc).__name__}")
            return
        if conn in self.live:  # else it ended already, during connection_made
            conn.handler = _HttpHandle(proto)
            if self.draining:
                proto.begin_drain()

    @staticmethod
    def _refuse(sock: socket.socket, conn: ConnRecord, alert: bytes) -> None:
        """Close a connection we will not serve, with ``alert`` first. The peeked hello is
        read off first, so that the close is a FIN after the alert, not a reset that could
        destroy the alert before the client reads it. Best effort, never blocks."""
        with contextlib.suppress(OSError):
            if conn.hello_size:
                sock.recv(conn.hello_size)
            elif not alert:  # bytes that were not TLS: whatever of them is there
                sock.recv(READ_OFF_BEFORE_CLOSE)
            if alert:
                sock.send(alert)
        sock.close()

    async def _terminate(self, sock: socket.socket, conn: ConnRecord,
                         site: SiteRuntime, denied: bool = False) -> None:
        """TLS on the socket as it is (the hello still unread in it), then HTTP/1.1."""
        def closed(reason: str, bytes_in: int, bytes_out: int) -> None:
            conn.up, conn.down = bytes_in, bytes_out
            self.finish(conn, "denied" if denied else reason)

        made: list[HttpConnection | H2Connection] = []
        app: App = _Denied(site.app) if denied else site.app

        def protocol(alpn: str | None) -> HttpConnection | H2Connection:
            proto: HttpConnection | H2Connection
            if alpn == "h2":
                proto = H2Connection(self.loop, app, self.limits, self.h2limits,
                                     self.request_log, sni=conn.sni, client=conn.client,
                                     scheme="https", on_close=closed, client_ip=conn.ip,
                                     max_queued_output=self.h2_max_queued)
            else:
                proto = HttpConnection(self.loop, app, self.limits, self.request_log,
                                       sni=conn.sni, client=conn.client, scheme="https",
                                       on_close=closed, client_ip=conn.ip)
            if self.draining:  # accepted before the drain: one request, then close
                proto.closing = True
            made.append(proto)
            return proto

        tls = self._mcells.tls.get(site.site.name)
        if await self._handshake(sock, conn, lambda: _Alpn(protocol), site.context) is None:
            if tls is not None:
                self.mview[tls[1]] += 1
            return
        if tls is not None:
            self.mview[tls[0]] += 1
        if conn in self.live:  # else it ended already, during connection_made
            conn.handler = _HttpHandle(made[0])
            if self.draining:  # the drain began during the handshake
                made[0].begin_drain()

    # -- ending ---------------------------------------------------------------------------

    def finish(self, conn: ConnRecord, reason: str) -> None:
        """``conn`` has ended: its one log line, and what the metrics count at the end."""
        if conn.probe and reason in ("eof_before_hello", "client_reset"):
            # A balancer's health check: a LOCAL header, then a close (HAProxy resets), not
            # a client's failure.
            reason = "balancer_check"
        if self._release(conn):
            self._log(conn, reason)
            route = conn.route
            if route.startswith("passthrough:"):
                cells = self._mcells.relayed.get(route)
                if cells is not None:
                    self.mview[cells[0]] += conn.up
                    self.mview[cells[1]] += conn.down
            elif not route and not (conn.via and not conn.ip):  # not before its PROXY header
                cell = self._mcells.hello_failure(reason)
                if cell is not None:
                    self.mview[cell] += 1

    def _mopen(self, conn: ConnRecord, delta: int) -> None:
        if conn.mopen >= 0:
            self.mview[conn.mopen] += delta

    def forget(self, conn: ConnRecord) -> None:
        """``conn`` moved to another worker: it is not ours any more, and its log line is
        written where it ends."""
        self._release(conn)

    def _release(self, conn: ConnRecord) -> bool:
        """Take ``conn`` off the books (False if it was already): its descriptor, its
        place under the caps; then accept again if the caps had stopped us."""
        if conn not in self.live:
            return False
        self.live.discard(conn)
        self._mopen(conn, -1)
        LEDGER.give()
        conn.handler = None
        if conn.ipkey >= 0 and self.iplimits is not None:
            self.iplimits.release(conn.ipkey)
            conn.ipkey = -1
        if self._drained is not None and not self.live and not self._drained.done():
            self._drained.set_result(None)
        if (self._full and self._accepting and self._resource_timer is None
                and len(self.live) < self.max_connections and LEDGER.room_for_a_connection()):
            self._full = False
            for listener in self.listeners:
                listener.resume()
        return True

    # -- relays moving between generations (handover.py) ---------------------------------

    def offer(self, handler: PassthroughConnection, relayed: Relayed, fds: list[int]) -> bool:
        """Offer a held relay to the master, for the new generation; False if it cannot be
        sent (no master, its socket full): the relay then goes on here."""
        if self.control is None:
            return False
        self._offer_ids += 1
        if not handover.send(self.control, handover.encode("offer", self._offer_ids, relayed),
                             fds):
            return False
        self._offers[self._offer_ids] = handler
        return True

    def _on_control(self) -> None:
        control = self.control
        assert control is not None
        while True:
            got = handover.receive(control)
            if got is None:
                return
            data, fds = got
            try:
                if not data:  # the master is gone: the lifeline says so too
                    self.loop.remove_reader(control.fileno())
                    return
                op, ident, relayed = handover.decode(data)
                if op == "cert" and len(fds) == 1:
                    self._new_certificate(handover.cert_key(data), fds[0])
                    continue
                if op == "adopt" and relayed is not None and len(fds) == handover.DESCRIPTORS:
                    self._adopt(relayed, fds)
                    fds = []  # the relay's now
                    continue
                handler = self._offers.pop(ident, None)
                if handler is not None and op == "taken":
                    handler.taken()
                elif handler is not None:
                    handler.kept()
            except (ValueError, TypeError) as exc:
                diag.error("control message refused: %s", exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _new_certificate(self, key: str, fd: int) -> None:
        """The master validated a new certificate for the source ``key`` names: new
        handshakes use it, connections already made keep theirs (certs/slots.py)."""
        for slot in self.runtime.slots:
            if slot.key == key:
                try:
                    slot.swap(fd, None, "")
                except TlsError as exc:  # the master loaded the same bytes: a bug if so
                    diag.error("certificate update refused: %s", exc)

    def _adopt(self, relayed: Relayed, fds: list[int]) -> None:
        """A relay handed over by a worker of an older generation: it goes on here."""
        client = socket.socket(fileno=fds[0])
        up = socket.socket(fileno=fds[1])
        client.setblocking(False)
        up.setblocking(False)
        rt = self.runtime.passthrough.get(relayed.block)
        peer = tuple(relayed.peer) if isinstance(relayed.peer, list) else relayed.peer
        conn = ConnRecord(peer, relayed.ip, relayed.listener, self.loop.time() - relayed.age)
        conn.sni, conn.alpn, conn.hello_size = relayed.sni, tuple(relayed.alpn), relayed.hello
        conn.route, conn.upstream = relayed.route, relayed.upstream
        conn.up, conn.down = relayed.up, relayed.down
        conn.via, conn.proxy_id, conn.ech = relayed.via, relayed.proxy_id, relayed.ech
        conn.proto = relayed.proto
        for listener in self.listeners:  # the same sockets in every generation
            if listener.label == relayed.listener:
                conn.mlabel, conn.mopen = listener.mlabel, listener.mopen
        LEDGER.take(2)
        self.live.add(conn)
        self._mopen(conn, 1)
        if self.iplimits is not None and conn.ip:  # it keeps its place, even over the limit
            conn.ipkey = self.iplimits.adopt(conn.ip)
        if rt is None:  # the master checked the block exists; a bug if not
            client.close()
            up.close()
            LEDGER.give()
            self.finish(conn, "internal_error: handed a relay of an unknown block")
            return
        PassthroughConnection.carry_on(self, client, up, conn, rt, relayed)

    def _log(self, conn: ConnRecord, reason: str) -> None:
        if self.access_log.enabled:
            self.access_log.write("conn", conn.fields(self.loop.time(), reason))

    def abort_all(self, reason: str) -> None:
        for conn in list(self.live):
            if conn.handler is not None:
                conn.handler.abort(reason)

    def close(self) -> None:
        self.stop_accepting()
        self.abort_all("shutdown")
        self.pipes.close()
        self.poller.close()
        for handler in self._lifecycle:
            handler.stop()

    async def drain(self, timeout: float) -> None:
        """Graceful stop: no new connections; requests in flight finish, idle keep-alive
        connections close now, passthrough streams and tunnels run until ``timeout``."""
        self.draining = True
        self.stop_accepting()
        for conn in list(self.live):
            handler = conn.handler
            if handler is not None and hasattr(handler, "drain"):
                handler.drain()
        if self.live:
            self._drained = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                diag.info("drain: %d connection(s) still open after %gs; closing them",
                          len(self.live), timeout)
        self.close()


class _MetricCells:
    """The cells of this worker's counters (metrics.py ``Layout``), found once at start so
    that counting is one indexed add: connections by listener, decision and block; open
    connections by listener; denials; TLS handshakes by site; relayed bytes by block;
    ClientHello failures by reason; upstream health."""

    def __init__(self, runtime: Runtime, m: WorkerMetrics) -> None:
        layout = m.layout
        config = runtime.loaded.config
        listeners = [str(e.address) for e in config.server.listen]
        blocks = [NO_BLOCK, *(b.name for b in config.passthrough), *(s.name for s in config.site)]
        self.connections = {
            (lst, decision, block): layout.cell("sniport_connections_total", listener=lst,
                                                decision=decision, block=block)
            for lst in listeners for decision in DECISIONS for block in blocks}
        self.open = {lst: layout.cell("sniport_open_connections", listener=lst)
                     for lst in listeners}
        self.denied_acl = {block: layout.cell("sniport_denied_connections_total", block=block,
                                              kind="acl") for block in blocks}
        self.denied_per_ip = layout.cell("sniport_denied_connections_total", block=NO_BLOCK,
                                         kind="per_ip_limit")
        self.denied_per_ip_rate = layout.cell("sniport_denied_connections_total",
                                              block=NO_BLOCK, kind="per_ip_rate")
        self.tls = {s.name: (layout.cell("sniport_tls_handshakes_total", site=s.name),
                             layout.cell("sniport_tls_handshake_failures_total", site=s.name))
                    for s in config.site}
        self.relayed = {f"passthrough:{b.name}": tuple(
            layout.cell("sniport_passthrough_bytes_total", block=b.name, direction=d)
            for d in ("up", "down")) for b in config.passthrough}
        self._hello = {r: layout.cell("sniport_clienthello_failures_total", reason=r)
                       for r in HELLO_REASONS}
        self.healthy = [layout.cell("sniport_upstream_healthy_workers", upstream=label)
                        for (label,) in layout.domains["upstream"]]

    def hello_failure(self, reason: str) -> int | None:
        """The ClientHello failure a connection that reached no route ended with, if any."""
        if reason.startswith("malformed_hello: "):
            return self._hello[hello_reason(reason[len("malformed_hello: "):])]
        if reason == "client_hello_timeout":
            return self._hello["timeout"]
        if reason in ("eof_before_hello", "eof_in_hello", "client_reset"):
            return self._hello["closed"]
        return None


def _tls_reason(exc: BaseException) -> str:
    # uvloop reports its ssl_handshake_timeout as ConnectionAbortedError("... taking longer")
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "handshake_timeout"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def _ignore_close(reason: str, bytes_in: int, bytes_out: int) -> None:
    pass


class _Denied:
    """The App of a terminated connection from a client the site's allow/deny lists refuse:
    403 through the site's error pages, then close."""

    __slots__ = ("_site",)

    def __init__(self, site: SiteApp) -> None:
        self._site = site

    def handle(self, ex: Exchange) -> None:
        ex.close_after = True
        self._site.fail(ex, 403, "denied")


class _Alpn(asyncio.Protocol):
    """The protocol of a terminated connection until its handshake is done: then the engine
    for the protocol ALPN chose (RFC 7301) takes the transport, HTTP/2 or HTTP/1.1."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[str | None], asyncio.Protocol]) -> None:
        self._make = make

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        proto = self._make(tls.selected_alpn_protocol() if tls is not None else None)
        transport.set_protocol(proto)
        proto.connection_made(transport)


def ip_limiter(server: Server,
               shared: tuple[IpTable, int | None] | None) -> IpLimiter | None:
    """The ``[server]`` per-address limits over the master's shared table (this worker's
    slot in it), or over a private one (the limits then count this worker only) when the
    master had no slot to give; None when both limits are off."""
    rate = server.max_connection_rate_per_ip
    if not server.max_connections_per_ip and rate is None:
        return None
    table, slot = shared if shared is not None else (None, None)
    if table is None or slot is None:
        table = IpTable(iplimits.MIN_BUCKETS, 1)
        slot = table.acquire_slot()
        assert slot is not None
    return IpLimiter(table, slot, server.max_connections_per_ip, rate)


def h2_limits(server: Server) -> H2Limits:
    """The ``[server] http2_*`` keys as the HTTP/2 machine's limits."""
    return H2Limits(
        max_streams=server.http2_max_streams, max_requests=server.http2_max_requests,
        max_header_list_size=server.http2_max_header_list_size,
        max_continuations=server.http2_max_continuations,
        resets=Rate(*server.http2_reset_rate), pings=Rate(*server.http2_ping_rate),
        settings=Rate(*server.http2_settings_rate))


class _TaskHandle:
    """A connection still in its TLS handshake: aborting cancels the handshake."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    def abort(self, reason: str) -> None:
        self._task.cancel()


class _HttpHandle:
    __slots__ = ("_proto",)

    def __init__(self, proto: HttpConnection | H2Connection) -> None:
        self._proto = proto

    def abort(self, reason: str) -> None:
        transport = self._proto.transport
        if transport is not None:
            transport.abort()

    def drain(self) -> None:
        self._proto.begin_drain()


EXIT_PRIVILEGES = 3  # the worker would not drop privileges: it refused to serve


def worker_main(runtime: Runtime, bound: list[BoundListener], http_bound: list[BoundListener],
                access_log: AccessLog, lifeline_fd: int, ready_fd: int,
                control: socket.socket | None = None,
                worker_metrics: WorkerMetrics | None = None,
                ip_table: tuple[IpTable, int | None] | None = None) -> int:
    """The body of a forked worker process; returns its exit code.

    The event loop is created here, after the fork. Signals: SIGTERM/SIGQUIT drain, SIGINT
    stops at once, SIGUSR1 reopens the access log. The lifeline pipe's write end is held
    only by the master: EOF on it means the master is gone (even killed with -9), and the
    worker drains at once, closing its listening sockets so that the next start can bind.
    """
    import signal

    import uvloop

    from sniport.privileges import PrivilegeError, drop

    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    server = runtime.loaded.config.server
    _fixed_mmap_threshold()  # before the drop: it imports ctypes, which "nobody" may not read
    try:
        drop(server.user, server.group)
    except PrivilegeError as exc:
        diag.error("worker refuses to serve: %s", exc)
        return EXIT_PRIVILEGES

    # Everything loaded so far lives as long as the worker: out of the collector's sight
    # (collections stop walking it, and its pages stay shared with the master after the
    # fork); per-connection objects are acyclic and freed by reference counting, so the
    # young generation is collected less often than the default 700 allocations.
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_exception)
        worker = Worker(runtime, bound, access_log, loop, http_bound, control, worker_metrics,
                        ip_table)
        done: asyncio.Future[None] = loop.create_future()
        tasks: list[asyncio.Task[None]] = []

        def graceful() -> None:
            if not worker.draining:
                task = loop.create_task(worker.drain(server.drain_timeout))
                task.add_done_callback(lambda _: finished())
                tasks.append(task)

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def fast() -> None:
            worker.close()
            finished()

        def master_gone() -> None:
            try:
                data = os.read(lifeline_fd, 64)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(lifeline_fd)
                diag.warning("worker: the master is gone; draining and exiting")
                graceful()

        loop.add_signal_handler(signal.SIGTERM, graceful)
        loop.add_signal_handler(signal.SIGQUIT, graceful)
        loop.add_signal_handler(signal.SIGINT, fast)
        loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master's business
        os.set_blocking(lifeline_fd, False)
        loop.add_reader(lifeline_fd, master_gone)
        await worker.start()
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        await done

    uvloop.run(serve())
    access_log.close()
    return 0


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
# With a fixed mmap threshold glibc also stops adapting its trim threshold, which stays at
# 128 KiB: then the 256 KiB read buffer freed at the top of the heap after each TLS read
# gives memory back with brk, and the next read takes it again (strace: two brk per
# request, a third of the worker's time under keep-alive load). Free memory at the top is
# kept up to this much instead.
TRIM_THRESHOLD = 64 * 1024 * 1024


def _fixed_mmap_threshold() -> None:
    """Keep buffers of up to a few MiB on the heap.

    uvloop's TLS layer reads into a 256 KiB buffer and shrinks it to what arrived; glibc
    serves that from mmap, and the free of the shrunk chunk lowers glibc's dynamic mmap
    threshold to a page, so from then on every allocation above 4 KiB is an mmap, a
    mremap and a munmap (py-spy: 19% of a worker's time under keep-alive load). A fixed
    threshold ends the dynamic one."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        diag.debug("mallopt: %s", exc)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception no callback caught: logged, at most once a second per kind (a fault
    that every connection meets must not fill the disk with tracebacks)."""
    exc = context.get("exception")
    message = context.get("message")
    suffix = throttle.allow(f"loop:{type(exc).__name__ if exc else message}")
    if suffix is None:
        return
    if exc is not None:
        diag.error("event loop: %s%s", message, suffix, exc_info=exc)
    else:
        diag.error("event loop: %s%s", message, suffix)
