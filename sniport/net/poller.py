"""The worker's own epoll set for the raw sockets it drives itself.

Job: watch the sockets that are not asyncio transports (a hello being peeked, an upstream
being connected, both ends of a splice relay) and call back with the epoll event mask.

Why not ``loop.add_reader``: uvloop stops a watcher whose socket reports an error (a reset,
a refused connect) without calling the reader: libuv hands it EBADF and uvloop only logs it
(DESIGN.md, "uvloop add_reader trap"). A relay would then wait for its idle timeout, and a
refused connect for its connect timeout. Here the callback always sees EPOLLERR/EPOLLHUP.
It is also cheaper: one epoll_ctl per change, no per-socket libuv handle (whose creation
costs an ioctl and an allocation per add_reader).

Rules: level-triggered; the epoll fd itself is the one thing uvloop watches; callbacks must
tolerate a spurious wake-up (EAGAIN); ``forget`` (no syscall) is for a socket about to be
closed, since closing removes it from the set, ``unregister`` for one handed to another owner.
A callback that raises (EMFILE somewhere, a bug) would be called again at once, forever
(level-triggered): its fd leaves the set, the owner's ``crashed`` ends that one connection,
and the event is logged, at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable

from sniport.logs import diag, throttle

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

Callback = Callable[[int], None]
Crashed = Callable[[BaseException], None]
MAX_EVENTS = 256


class Poller:
    __slots__ = ("_callbacks", "_crashed", "_epoll", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()  # close-on-exec (Python's default)
        self._callbacks: dict[int, Callback] = {}
        self._crashed: dict[int, Crashed] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def register(self, fd: int, events: int, callback: Callback, crashed: Crashed) -> None:
        """Call ``callback(events)`` while ``fd`` is ready; ``crashed(exc)`` if it raises."""
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback
        self._crashed[fd] = crashed

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``, which lives on (handed to TLS, say)."""
        if self._callbacks.pop(fd, None) is not None:
            self._crashed.pop(fd, None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: the close takes it out of the epoll set."""
        self._callbacks.pop(fd, None)
        self._crashed.pop(fd, None)

    def _dispatch(self) -> None:
        callbacks = self._callbacks
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            callback = callbacks.get(fd)
            if callback is None:  # closed earlier in this same batch
                continue
            try:
                callback(events)
            except Exception as exc:
                self._crash(fd, exc)

    def _crash(self, fd: int, exc: Exception) -> None:
        crashed = self._crashed.get(fd)
        self.unregister(fd)
        suffix = throttle.allow(f"poller:{type(exc).__name__}")
        if suffix is not None:
            diag.error("connection dropped after an unexpected %s: %s%s",
                       type(exc).__name__, exc, suffix, exc_info=not isinstance(exc, OSError))
        if crashed is not None:
            try:
                crashed(exc)
            except Exception:
                diag.exception("cleaning up after %s", type(exc).__name__)

    def close(self) -> None:
        if not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._callbacks.clear()
