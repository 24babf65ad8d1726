"""The passthrough path: connect upstream, send the PROXY header if asked, then relay.

Job: for a connection routed to a ``[[passthrough]]`` block, open the upstream (with
failover), write the optional PROXY protocol header, and start the splice relay; report how
the connection ended.

Rules: the client's bytes, including the peeked ClientHello, are still unread in its socket:
the relay sends them first, untouched (TLS is not terminated). The PROXY header goes before
any client byte, and its send is bounded by ``connect_timeout`` like the connect itself.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sniport.config import Passthrough
from sniport.deadlines import Deadlines, deadlines_for
from sniport.net.descriptors import LEDGER
from sniport.net.poller import EPOLLOUT
from sniport.net.relay import SpliceRelay
from sniport.net.upstream import Target, UpstreamConnect, targets_for
from sniport.wire import proxyproto

if TYPE_CHECKING:
    from sniport.net.conn import ConnRecord
    from sniport.worker import Worker


@dataclass(frozen=True, slots=True)
class PassthroughRuntime:
    """A passthrough block with its upstreams resolved, built once per config load."""

    block: Passthrough
    targets: tuple[Target, ...]

    @classmethod
    def build(cls, block: Passthrough) -> PassthroughRuntime:
        return cls(block, tuple(targets_for(block.upstreams)))


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

    def __init__(self, worker: Worker, sock: socket.socket, conn: ConnRecord,
                 rt: PassthroughRuntime, sni: str | None) -> None:
        self._worker = worker
        self._loop = worker.loop
        self._sock = sock
        self._conn = conn
        self._rt = rt
        self._sni = sni
        self._connect: UpstreamConnect | None = None
        self._up: socket.socket | None = None
        self._header = b""
        self.deadline = 0.0  # while the PROXY header waits for room (rare)
        self.deadline_slot = 0
        self.relay: SpliceRelay | None = None

    def start(self) -> None:
        # The client socket has TCP_NODELAY from its listener (binding.tune_listener).
        self._connect = UpstreamConnect(self._loop, self._worker.poller, self._rt.targets,
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
        mode = self._rt.block.proxy_protocol
        if mode != "off":
            src = _endpoint(self._conn.peer)
            dst = _endpoint(self._sock.getsockname())
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
                Deadlines.clear(self)
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
        """The PROXY header did not fit into the upstream within ``connect_timeout``."""
        assert self._up is not None
        self._worker.poller.forget(self._up.fileno())
        self._end("upstream_timeout")

    def _start_relay(self) -> None:
        assert self._up is not None
        self.relay = SpliceRelay(self._loop, self._worker.poller, self._worker.pipes,
                                 self._sock, self._up, self._rt.block.idle_timeout,
                                 self._relay_done)
        self.relay.start()

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
