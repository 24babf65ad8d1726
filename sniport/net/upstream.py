"""Connecting to a passthrough block's upstreams, in order, with failover.

Job: open a non-blocking stream socket to the first upstream that accepts within
``connect_timeout``; report the socket, or the reason the last one failed.

Rules: names were resolved once when the config was loaded (``Target``), never per
connection; each attempt has its own timeout; only connect errors fail over (nothing has been
sent yet, so trying the next upstream is always safe). Plain callbacks, no Task: this runs for
every new connection.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sniport import metrics
from sniport.addresses import Address, TcpAddress, UnixAddress, resolve
from sniport.deadlines import deadlines_for
from sniport.logs import diag, throttle
from sniport.net.descriptors import LEDGER
from sniport.net.poller import EPOLLERR, EPOLLHUP, EPOLLOUT, Poller


@dataclass(frozen=True, slots=True)
class Target:
    family: int
    sockaddr: Any  # (host, port) / (host, port, flow, scope) / a unix path
    label: str  # as configured, for logs


def targets_for(upstreams: Sequence[Address]) -> list[Target]:
    """Resolve each upstream once; a name may give several addresses, tried in order."""
    out: list[Target] = []
    for up in upstreams:
        if isinstance(up, UnixAddress):
            out.append(Target(socket.AF_UNIX, up.sockaddr, str(up)))
        else:
            assert isinstance(up, TcpAddress)
            out.extend(Target(fam, sa, str(up)) for fam, sa in resolve(up))
    return out


_REASONS = {
    errno.ECONNREFUSED: "upstream_refused",
    errno.ECONNRESET: "upstream_reset",
    errno.ENOENT: "upstream_refused",  # unix socket file missing: nobody listens
    errno.EAGAIN: "upstream_busy",  # unix socket backlog full
    errno.ETIMEDOUT: "upstream_timeout",
    errno.EHOSTUNREACH: "upstream_unreachable",
    errno.ENETUNREACH: "upstream_unreachable",
}

ConnectDone = Callable[[socket.socket | None, Target | None, str], None]


class UpstreamConnect:
    """One connection's attempt through ``targets``; ``on_done(sock, target, reason)`` once."""

    __slots__ = (
        "_index",
        "_loop",
        "_poller",
        "_on_done",
        "_reason",
        "_sock",
        "_targets",
        "_timeout",
        "deadline",
        "deadline_slot",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, poller: Poller,
                 targets: Sequence[Target], timeout: float, on_done: ConnectDone) -> None:
        self._loop = loop
        self._poller = poller
        self._targets = targets
        self._timeout = timeout
        self._on_done = on_done
        self._index = -1
        self._sock: socket.socket | None = None
        self.deadline = 0.0
        self.deadline_slot = 0
        self._reason = "no_upstream"

    def start(self) -> None:
        self._next()

    def cancel(self) -> None:
        self._drop()
        self._on_done = _ignore

    def _next(self) -> None:
        while True:
            self._index += 1
            if self._index >= len(self._targets):
                self._on_done(None, None, self._reason)
                return
            target = self._targets[self._index]
            try:
                # Non-blocking from birth: no separate fcntl/ioctl.
                sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: this connection cannot go on
                suffix = throttle.allow("upstream:socket")
                if suffix is not None:
                    diag.warning("passthrough: cannot open a socket to %s: %s%s",
                                 target.label, exc.strerror, suffix)
                self._on_done(None, None, f"out_of_descriptors: {exc.strerror}")
                return
            LEDGER.take()  # given back by whoever closes it (here, or the passthrough)
            err = sock.connect_ex(target.sockaddr)
            if err == 0:
                self._success(sock, target)
                return
            if err == errno.EINPROGRESS:
                # On loopback (and often a LAN) the handshake is over by the time connect()
                # returns: no need to wait for writability (saves a poll cycle per connection).
                err = _connect_state(sock)
                if err == 0:
                    self._success(sock, target)
                    return
            if err == errno.EINPROGRESS:
                self._sock = sock
                self._poller.register(sock.fileno(), EPOLLOUT, self._on_event, self._crashed)
                deadlines_for(self._loop).after(self, self._timeout)
                return
            sock.close()
            LEDGER.give()
            self._reason = _REASONS.get(err, f"upstream_error: {errno.errorcode.get(err, err)}")
            metrics.upstream_error(target.label)

    def _on_event(self, events: int) -> None:
        # Writable, or an error (EPOLLERR: refused, unreachable): SO_ERROR tells which.
        sock = self._sock
        if sock is None:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0 and not events & (EPOLLERR | EPOLLHUP):
            self._poller.unregister(sock.fileno())
            deadlines_for(self._loop).clear(self)
            self._sock = None
            self._success(sock, self._targets[self._index])
            return
        if err == 0:
            err = errno.ECONNRESET
        self._reason = _REASONS.get(err, f"upstream_error: {errno.errorcode.get(err, err)}")
        metrics.upstream_error(self._targets[self._index].label)
        self._drop()
        self._next()

    def expired(self, now: float) -> None:
        """``connect_timeout`` for this attempt: on to the next upstream."""
        self._reason = "upstream_timeout"
        metrics.upstream_error(self._targets[self._index].label)
        self._drop()
        self._next()

    def _crashed(self, exc: BaseException) -> None:
        self._drop()
        done, self._on_done = self._on_done, _ignore
        done(None, None, f"internal_error: {type(exc).__name__}")

    def _drop(self) -> None:
        deadlines_for(self._loop).clear(self)
        if self._sock is not None:
            self._poller.forget(self._sock.fileno())
            self._sock.close()
            LEDGER.give()
            self._sock = None

    def _success(self, sock: socket.socket, target: Target) -> None:
        if target.family != socket.AF_UNIX:
            # Relayed bytes are already coalesced by the client; do not add Nagle delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_done(sock, target, "")


def _connect_state(sock: socket.socket) -> int:
    """0 when connected, EINPROGRESS while connecting, else the error it ended with."""
    try:
        sock.getpeername()
    except OSError:
        # Not connected: still connecting, or failed (SO_ERROR says; reading it clears it).
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EINPROGRESS
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _ignore(sock: socket.socket | None, target: Target | None, reason: str) -> None:
    if sock is not None:
        sock.close()
        LEDGER.give()
