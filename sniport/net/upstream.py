"""Connecting to a passthrough block's upstreams, in order, with failover.

Job: open a non-blocking stream socket to the first upstream that accepts within
``connect_timeout``; report the socket, or the reason the last one failed.

Rules: names of fixed upstreams were resolved once when the config was loaded (``Target``);
a name filled from an upstream template (``Unresolved``, README "Upstreams from the name")
is resolved when its turn comes, through the worker's ``Resolver`` (cached, bounded by the
same ``connect_timeout``), and its addresses are then tried in order like a fixed name's.
Each attempt has its own timeout; connect errors and a name that does not resolve fail over
(nothing has been sent yet, so trying the next upstream is always safe). Plain callbacks, no
Task: this runs for every new connection.
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
from sniport.net.resolver import Addresses, Waiter, resolver_for, with_port


@dataclass(frozen=True, slots=True)
class Target:
    family: int
    sockaddr: Any  # (host, port) / (host, port, flow, scope) / a unix path
    label: str  # as configured (or as filled from a template), for logs
    metric: str = ""  # the metrics label when it is not ``label``: the template as configured

    @property
    def counted(self) -> str:
        return self.metric or self.label


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A host name filled from a template: resolved when the connection gets to it."""

    host: str
    port: int
    label: str  # "nas.lan:443", for logs
    metric: str  # the template as configured, for metrics

    @property
    def counted(self) -> str:
        return self.metric


def targets_of(up: Address) -> list[Target]:
    """One fixed upstream's targets (a name is resolved now, blocking: at config load)."""
    if isinstance(up, UnixAddress):
        return [Target(socket.AF_UNIX, up.sockaddr, str(up))]
    assert isinstance(up, TcpAddress)
    return [Target(fam, sa, str(up)) for fam, sa in resolve(up)]


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
Plan = Sequence[Target | Unresolved]


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
        "_waiter",
        "deadline",
        "deadline_slot",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, poller: Poller,
                 targets: Plan, timeout: float, on_done: ConnectDone) -> None:
        self._loop = loop
        self._poller = poller
        self._targets = targets
        self._timeout = timeout
        self._on_done = on_done
        self._index = -1
        self._sock: socket.socket | None = None
        self._waiter: Waiter | None = None
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
            if isinstance(target, Unresolved):
                if self._resolve(target):
                    return  # waiting for the resolver
                continue
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
            metrics.upstream_error(target.counted)

    def _resolve(self, target: Unresolved) -> bool:
        """Put ``target``'s addresses in its place from the cache (False: go on), or start
        a lookup (True: ``_resolved`` goes on). A failure sets the reason (False)."""
        resolver = resolver_for(self._loop)
        found = resolver.cached(target.host)
        if isinstance(found, tuple):
            self._expand(target, found)
            return False
        if found is None:
            self._waiter = resolver.resolve(target.host, self._timeout, self._resolved)
            if self._waiter is not None:
                return True
            found = "resolver busy (too many names being looked up)"
        self._unresolved(target, found)
        return False

    def _resolved(self, addresses: Addresses | None, why: str) -> None:
        self._waiter = None
        target = self._targets[self._index]
        assert isinstance(target, Unresolved)
        if addresses is None:
            self._unresolved(target, why)
        else:
            self._expand(target, addresses)
        self._next()

    def _expand(self, target: Unresolved, addresses: Addresses) -> None:
        """The name's addresses take its place; ``_next`` tries the first of them."""
        here = self._index
        resolved = [Target(family, with_port(sa, target.port), target.label, target.metric)
                    for family, sa in addresses]
        self._targets = [*self._targets[:here], *resolved, *self._targets[here + 1:]]
        self._index = here - 1

    def _unresolved(self, target: Unresolved, why: str) -> None:
        self._reason = f"upstream_unresolved: {target.host}: {why}"
        metrics.upstream_error(target.metric)

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
            target = self._targets[self._index]
            assert isinstance(target, Target)
            self._success(sock, target)
            return
        if err == 0:
            err = errno.ECONNRESET
        self._reason = _REASONS.get(err, f"upstream_error: {errno.errorcode.get(err, err)}")
        metrics.upstream_error(self._targets[self._index].counted)
        self._drop()
        self._next()

    def expired(self, now: float) -> None:
        """``connect_timeout`` for this attempt: on to the next upstream."""
        self._reason = "upstream_timeout"
        metrics.upstream_error(self._targets[self._index].counted)
        self._drop()
        self._next()

    def _crashed(self, exc: BaseException) -> None:
        self._drop()
        done, self._on_done = self._on_done, _ignore
        done(None, None, f"internal_error: {type(exc).__name__}")

    def _drop(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None
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
