"""What sniport knows about one client connection, for its log line at close.

Rules: filled in as the connection goes (hello, route, upstream, byte counts); written once,
by ``Worker.finish``; ``handler`` is whatever owns the socket now, so a stop can abort it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sniport.handover import Relayed
    from sniport.net.poller import Poller
    from sniport.net.relay import PipePool
    from sniport.wire.clienthello import Hello, NotTLS
    from sniport.wire.detect import Detected, Silent, Unknown
    from sniport.wire.proxyproto import Proxied


class Abortable(Protocol):
    def abort(self, reason: str) -> None: ...


class Owner(Protocol):
    """What the connection code in ``net/`` needs from the worker that owns it: its loop,
    its poller and pipes, and where a connection goes next. The worker implements it; net/
    never imports the worker (no import cycle, and net/ can be driven by anything that
    keeps these promises)."""

    loop: asyncio.AbstractEventLoop
    poller: Poller
    pipes: PipePool
    client_hello_timeout: float
    detects: bool  # bytes that are not TLS are looked at further (RouteTable.detects)
    silent_after: float  # non_tls_timeout when [default].silent names a block, else 0
    defers_accept: bool  # its TCP listeners defer accept (net/binding.py defers_accept)
    draining: bool

    def at_capacity(self) -> bool: ...
    def out_of_descriptors(self, exc: OSError) -> None: ...
    def accepted(self, listener: Any, sock: socket.socket, peer: Any) -> None: ...
    def dispatch(self, sock: socket.socket, conn: ConnRecord,
                 outcome: Hello | NotTLS | Detected | Unknown | Silent) -> None: ...
    def finish(self, conn: ConnRecord, reason: str) -> None: ...
    def proxied(self, conn: ConnRecord, header: Proxied) -> bool: ...
    def forget(self, conn: ConnRecord) -> None: ...
    def offer(self, handler: Any, relayed: Relayed, fds: list[int]) -> bool: ...


class ConnRecord:
    __slots__ = (
        "alpn",
        "down",
        "ech",
        "handler",
        "hello_size",
        "ip",
        "ipkey",
        "listener",
        "local",
        "mlabel",
        "mopen",
        "peer",
        "probe",
        "proto",
        "proxy_id",
        "route",
        "sni",
        "start",
        "up",
        "upstream",
        "via",
    )

    def __init__(self, peer: Any, ip: str, listener: str, start: float) -> None:
        self.peer = peer  # as accept() returned it
        self.ip = ip  # "" for unix-socket clients
        self.listener = listener
        self.sni: str | None = None
        self.alpn: tuple[str, ...] = ()
        self.hello_size = 0
        self.ech = False  # the hello offered ECH (real or GREASE: a router cannot tell)
        # Not TLS, as the first bytes showed (routing.FirstBytes: ssh, http, other, silent);
        # "" for TLS, and for bytes routed by their first byte alone.
        self.proto = ""
        self.route = ""
        self.upstream = ""
        self.up = 0  # bytes client -> upstream
        self.down = 0  # bytes upstream -> client
        self.start = start
        self.handler: Abortable | None = None
        # Through a PROXY header: the balancer it came from, the address the client
        # connected to (for the header sent upstream), the balancer's unique id.
        self.via = ""
        self.local: Any = None
        self.proxy_id = ""
        self.probe = False  # a LOCAL/UNKNOWN PROXY header: the balancer's own health check
        self.mlabel = ""  # the listener's metrics label, and its open-connections cell
        self.mopen = -1
        self.ipkey = -1  # its place under max_connections_per_ip (iplimits.py); -1: none

    @property
    def client(self) -> str:
        if isinstance(self.peer, tuple):
            host = self.peer[0]
            return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"
        return "unix"

    def fields(self, now: float, end: str) -> dict[str, Any]:
        fields = {
            "client": self.client,
            "listener": self.listener,
            "sni": self.sni,
            "alpn": ",".join(self.alpn),
            "hello": self.hello_size,
            "route": self.route,
            "upstream": self.upstream,
            "up": self.up,
            "down": self.down,
            "duration": round(now - self.start, 3),
            "end": end,
        }
        if self.ech:  # RFC 9849: said only when offered, so other lines are unchanged
            fields["ech"] = "offered"
        if self.proto:  # likewise: only for connections that were not TLS
            fields["proto"] = self.proto
        if self.via:  # only for connections through a PROXY header: the usual line unchanged
            fields["via"] = self.via
            if self.proxy_id:
                fields["proxy_id"] = self.proxy_id
        return fields
