"""The passthrough path: connect upstream, send the PROXY header if asked, then relay.

Job: for a connection routed to a ``[[passthrough]]`` block, open the upstream (with
failover), write the optional PROXY protocol header, and start the splice relay; report how
the connection ended.

Rules: the client's bytes, including the peeked ClientHello, are still unread in its socket:
the relay sends them first, untouched (TLS is not terminated). The PROXY header goes before
any client byte, and its send is bounded by ``connect_timeout`` like the connect itself.
When the worker drains for a reload, a running relay is offered to the new generation once
it is quiet (``handover.py``); until the master answers (or ``OFFER_TIMEOUT``) it is held.
An upstream template (``{label}.lan:443``) is filled from the connection's server name before
the first connect; a name the template refuses ends the connection at once with
``upstream_template: why`` (the name came from the client: no upstream is tried for it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sniport.addresses import UnixAddress
from sniport.config import Passthrough
from sniport.deadlines import deadlines_for
from sniport.handover import Relayed
from sniport.net.descriptors import LEDGER
from sniport.net.poller import EPOLLOUT
from sniport.net.relay import SpliceRelay
from sniport.net.upstream import Plan, Target, Unresolved, UpstreamConnect, targets_of
from sniport.upstream_template import TemplateError, UpstreamTemplate, label_for
from sniport.wire import proxyproto

OFFER_TIMEOUT = 5.0  # seconds a held relay waits for the master's answer, then goes on here

if TYPE_CHECKING:
    from sniport.net.conn import ConnRecord, Owner


@dataclass(frozen=True, slots=True)
class PassthroughRuntime:
    """A passthrough block with its upstreams resolved, built once per config load."""

    block: Passthrough
    targets: tuple[Target, ...]  # the fixed upstreams' targets, in order
    # Each upstream in order: its targets, or its template (None: no template at all, and
    # ``targets`` is the whole plan of every connection).
    entries: tuple[tuple[Target, ...] | UpstreamTemplate, ...] | None = None

    @classmethod
    def build(cls, block: Passthrough) -> PassthroughRuntime:
        entries = tuple(up if isinstance(up, UpstreamTemplate) else tuple(targets_of(up))
                        for up in block.upstreams)
        targets = tuple(t for e in entries if isinstance(e, tuple) for t in e)
        templated = any(isinstance(e, UpstreamTemplate) for e in entries)
        return cls(block, targets, entries if templated else None)

    @property
    def upstream_labels(self) -> list[str]:
        """What metrics count and a reload compares: fixed upstreams as configured, each
        template as written (filled names are not config names: unbounded)."""
        if self.entries is None:
            return [t.label for t in self.targets]
        return [label for e in self.entries
                for label in ([e.text] if isinstance(e, UpstreamTemplate)
                              else [t.label for t in e])]

    def plan(self, sni: str | None) -> Plan:
        """The upstreams of one connection, templates filled; TemplateError for a name the
        templates cannot be filled with."""
        if self.entries is None:
            return self.targets
        label = label_for(sni, self.block.hosts)
        out: list[Target | Unresolved] = []
        for entry in self.entries:
            if not isinstance(entry, UpstreamTemplate):
                out.extend(entry)
                continue
            addr = entry.fill(label)
            if isinstance(addr, UnixAddress):
                out.append(Target(socket.AF_UNIX, addr.sockaddr, str(addr), entry.text))
            else:
                out.append(Unresolved(addr.host, addr.port, str(addr), entry.text))
        return out


def _loops_back(family: int, upstream: Any, mine: Any) -> bool:
    """Whether the upstream just connected to (its sockaddr) is the very address (ours) the
    client connected to (``mine``): an upstream (a template filled with a name that resolves
    to this machine, or a config mistake) that leads back to this listener would relay to
    itself, one new connection per hop, until max_connections. Caught at the latest on the
    second hop, which reached us on the looping address."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(mine, tuple):
        return False
    return bool(upstream[1] == mine[1] and _plain_ip(upstream[0]) == _plain_ip(mine[0]))


def _plain_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4, so that the two spellings compare equal."""
    return ip[7:] if ip.startswith("::ffff:") else ip


def _endpoint(addr: object) -> proxyproto.Endpoint:
    if isinstance(addr, tuple):
        return (str(addr[0]), int(addr[1]))
    if isinstance(addr, bytes):
        return "@" + addr[1:].decode(errors="replace") if addr[:1] == b"\0" else addr.decode()
    return str(addr or "")


class PassthroughConnection:
    __slots__ = (
        "_conn",
        "_connect",
        "_header",
        "_moving",
        "_non_tls",
        "_loop",
        "_rt",
        "_sni",
        "_sock",
        "_up",
        "_worker",
        "deadline",
        "deadline_slot",
        "relay",
    )

    def __init__(self, worker: Owner, sock: socket.socket, conn: ConnRecord,
                 rt: PassthroughRuntime, sni: str | None, non_tls: bool = False) -> None:
        self._worker = worker
        self._loop = worker.loop
        self._sock = sock
        self._conn = conn
        self._rt = rt
        self._sni = sni
        self._connect: UpstreamConnect | None = None
        self._up: socket.socket | None = None
        self._header = b""
        self.deadline = 0.0  # the PROXY header waits for room (rare); an offer its answer
        self.deadline_slot = 0
        self.relay: SpliceRelay | None = None
        self._moving = ""  # "": no; "wanted": offer once relaying; "offered": held, waiting
        self._non_tls = non_tls  # routed by [default].non_tls, not by name

    @classmethod
    def carry_on(cls, worker: Owner, client: socket.socket, up: socket.socket,
                 conn: ConnRecord, rt: PassthroughRuntime, relayed: Relayed) -> None:
        """A relay that a draining worker handed over: go on with it here."""
        self = cls(worker, client, conn, rt, relayed.sni, relayed.non_tls)
        self._up = up
        conn.handler = self
        self.relay = SpliceRelay(self._loop, worker.poller, worker.pipes, client, up,
                                 rt.block.idle_timeout, self._relay_done)
        self.relay.carry_on(relayed.up, relayed.down, relayed.up_eof, relayed.down_eof)
        if worker.draining and self._relaying():
            self.drain()

    # -- moving to a worker of a new config ---------------------------------------------

    def drain(self) -> None:
        """The worker drains: offer the relay to the next generation once it is quiet."""
        if self._moving:
            return
        self._moving = "wanted"
        if self.relay is not None:
            self.relay.hold(self._offer)

    def _offer(self) -> None:
        relay = self.relay
        assert relay is not None and self._up is not None
        up, down, up_eof, down_eof = relay.state()
        conn = self._conn
        relayed = Relayed(
            block=self._rt.block.name, non_tls=self._non_tls, sni=conn.sni,
            alpn=list(conn.alpn), hello=conn.hello_size, route=conn.route,
            upstream=conn.upstream, peer=list(conn.peer) if isinstance(conn.peer, tuple)
            else str(conn.peer or ""), ip=conn.ip, listener=conn.listener, up=up, down=down,
            age=self._loop.time() - conn.start, up_eof=up_eof, down_eof=down_eof,
            via=conn.via, proxy_id=conn.proxy_id, ech=conn.ech,
            proto=conn.proto)
        self._moving = "offered"
        if self._worker.offer(self, relayed, [self._sock.fileno(), self._up.fileno()]):
            deadlines_for(self._loop).after(self, OFFER_TIMEOUT)
        else:
            self.kept()

    def taken(self) -> None:
        """A worker of the new generation has the connection now: let go of it here, with
        no log line (its one line is written where it ends)."""
        if self._moving != "offered" or self.relay is None:
            return
        self._moving = ""
        deadlines_for(self._loop).clear(self)
        relay, self.relay = self.relay, None
        relay.release()
        LEDGER.give()  # the upstream socket; the client's goes with forget()
        self._worker.forget(self._conn)

    def kept(self) -> None:
        """The new config routes this connection elsewhere (or nobody answered): it goes on
        here, until the connection ends or drain_timeout."""
        if self._moving != "offered":
            return
        self._moving = "kept"
        deadlines_for(self._loop).clear(self)
        if self.relay is not None:
            self.relay.resume()

    def start(self) -> None:
        # The client socket has TCP_NODELAY from its listener (binding.tune_listener).
        if self._worker.draining:
            # Routed after the drain began (a hello, or a silent client's non_tls_timeout,
            # that ended after it): offered to the new generation like the others.
            self._moving = "wanted"
        try:
            plan = self._rt.plan(self._sni)
        except TemplateError as exc:
            self._end(f"upstream_template: {exc}")
            return
        self._connect = UpstreamConnect(self._loop, self._worker.poller, plan,
                                        self._rt.block.connect_timeout, self._connected)
        self._connect.start()

    def abort(self, reason: str) -> None:
        """Close now (fast shutdown or drain deadline)."""
        if self.relay is not None:
            self.relay.close(reason)
            return
        if self._connect is not None:
            self._connect.cancel()
        self._end(reason)

    def _connected(self, up: socket.socket | None, target: Target | None, reason: str) -> None:
        self._connect = None
        if up is None or target is None:
            self._end(reason)
            return
        self._up = up
        self._conn.upstream = target.label
        try:
            mine = self._sock.getsockname()  # the address the client connected to
        except OSError as exc:
            self._end(f"client_error: {exc.strerror}")
            return
        if _loops_back(up.family, target.sockaddr, mine):
            self._end("upstream_loop: the upstream is the address this client reached")
            return
        mode = self._rt.block.proxy_protocol
        if mode != "off":
            src = _endpoint(self._conn.peer)
            # The address the client connected to: the balancer's, when a PROXY header
            # named it, else this socket's.
            dst = _endpoint(self._conn.local or mine)
            self._header = (proxyproto.encode_v1(src, dst) if mode == "v1"
                            else proxyproto.encode_v2(src, dst, self._sni))
            self._send_header()
        else:
            self._start_relay()

    def _send_header(self) -> None:
        assert self._up is not None
        try:
            sent = self._up.send(self._header)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._end(f"upstream_error: {exc.strerror}")
            return
        self._header = self._header[sent:]
        if not self._header:
            if self.deadline:
                deadlines_for(self._loop).clear(self)
                self._worker.poller.unregister(self._up.fileno())
            self._start_relay()
        elif not self.deadline:
            # A fresh connection's send buffer takes ~200 bytes at once; this is the rare case.
            self._worker.poller.register(self._up.fileno(), EPOLLOUT, self._header_writable,
                                         self._crashed)
            deadlines_for(self._loop).after(self, self._rt.block.connect_timeout)

    def _header_writable(self, events: int) -> None:
        self._send_header()

    def _crashed(self, exc: BaseException) -> None:
        self._end(f"internal_error: {type(exc).__name__}")

    def expired(self, now: float) -> None:
        """The PROXY header did not fit into the upstream within ``connect_timeout``; or
        an offer got no answer within OFFER_TIMEOUT (then the relay goes on here)."""
        if self._moving == "offered":
            self.kept()
            return
        assert self._up is not None
        self._worker.poller.forget(self._up.fileno())
        self._end("upstream_timeout")

    def _start_relay(self) -> None:
        assert self._up is not None
        self.relay = SpliceRelay(self._loop, self._worker.poller, self._worker.pipes,
                                 self._sock, self._up, self._rt.block.idle_timeout,
                                 self._relay_done)
        self.relay.start()
        if self._moving == "wanted" and self._relaying():
            self.relay.hold(self._offer)

    def _relaying(self) -> bool:
        # The relay's first pump may already have ended it (_relay_done). A method of its
        # own: read right after the assignment above, mypy would type the check by that
        # assignment (it narrows attributes across calls), and the compiled build checks
        # types at run time.
        return self.relay is not None

    def _relay_done(self, reason: str, up: int, down: int) -> None:
        self.relay = None  # no cycle left for the garbage collector
        LEDGER.give()  # the upstream socket, closed by the relay
        self._conn.up = up
        self._conn.down = down
        self._worker.finish(self._conn, reason)

    def _end(self, reason: str) -> None:
        if self._up is not None:
            self._up.close()
            LEDGER.give()
        self._sock.close()
        self._worker.finish(self._conn, reason)
