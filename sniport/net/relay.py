"""Moving bytes between two sockets without looking at them: the passthrough relay.

Job: copy client -> upstream and upstream -> client until both directions have ended, with
``os.splice`` through a pipe, so the bytes never enter Python (measured against a transport
relay: bench/relay_compare.py, bench/RESULTS.md).

Rules:
- Backpressure both ways: while a destination cannot take more, its source is not read, so
  the kernel's receive window closes instead of sniport buffering (DESIGN.md house rule 7).
- Half-close passes across: end of stream from one side becomes ``shutdown(SHUT_WR)`` on the
  other once every byte before it is delivered; the relay ends when both directions have.
- Pipes come from a pool and are held only while bytes are in flight, so an idle connection
  costs its two sockets and nothing more (DESIGN.md "Performance notes"). Pipes count in
  the worker's descriptor ledger; when none can be had (the ledger is full, or EMFILE), the
  direction that needs one stops reading and tries again shortly: a logged wait, not a
  crash and not a spin.
- The sockets are watched by the worker's own epoll set (net/poller.py), which reports
  errors and hang-ups to us instead of silently stopping the watch as uvloop's add_reader
  does (DESIGN.md "uvloop add_reader trap"). Reads go on until a short read (the socket
  is drained; level-triggered epoll calls again if it was not).
- One registration per socket for the relay's life; only its interest changes (EPOLLIN
  while its data is wanted, EPOLLOUT while bytes wait to be written to it).
- No byte passes for ``idle_timeout``: both sockets are closed (0: no idle limit).
- A relay can be held (``hold``) once no byte sits in its pipes, every byte still unread
  waiting in the kernel: then its two sockets are all there is to it, and another process
  can carry on from them (``handover.py``): ``release`` closes our copies without a
  shutdown, ``resume`` goes on here.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable

from sniport.deadlines import deadlines_for
from sniport.logs import diag, throttle
from sniport.net.descriptors import LEDGER
from sniport.net.poller import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Poller

PIPE_SIZE = 1 << 20  # bytes one splice may move (bench/relay_compare.py: 1 MiB costs least)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
STARVED_RETRY = 0.05  # seconds before a direction that found no pipe tries again
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Idle, empty pipes kept for reuse; a pipe that still holds bytes is never pooled."""

    __slots__ = ("_idle", "_max_idle", "size")

    def __init__(self, max_idle: int = 32, size: int = PIPE_SIZE) -> None:
        self._idle: list[tuple[int, int]] = []
        self._max_idle = max_idle
        self.size = size

    def get(self) -> tuple[int, int]:
        """An empty pipe; OSError (EMFILE) when the descriptor ledger or the kernel has no
        room for one."""
        if self._idle:
            return self._idle.pop()
        if not LEDGER.room(2):
            raise OSError(errno.EMFILE, "the worker's descriptor budget is used up")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        LEDGER.take(2)
        try:
            self.size = fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        except OSError:
            # Above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default.
            self.size = min(self.size, 1 << 16)
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe (one that may still hold bytes)."""
        os.close(pipe[0])
        os.close(pipe[1])
        LEDGER.give(2)

    def close(self) -> None:
        for pipe in self._idle:
            self.discard(pipe)
        self._idle.clear()


class _Flow:
    """One direction of a relay: ``src`` -> pipe -> ``dst``."""

    __slots__ = ("src", "dst", "pipe", "pending", "eof", "count", "src_name", "dst_name",
                 "starved")

    def __init__(self, src: int, dst: int, src_name: str, dst_name: str) -> None:
        self.src = src
        self.dst = dst
        self.src_name = src_name
        self.dst_name = dst_name
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe not yet written to dst
        self.eof = False
        self.count = 0
        self.starved = False  # no pipe could be had: waiting to try again

    @property
    def reading(self) -> bool:
        return not self.eof and not self.pending and not self.starved


RelayDone = Callable[[str, int, int], None]  # (how it ended, bytes client->up, bytes up->client)


class SpliceRelay:
    __slots__ = (
        "_client",
        "_closed",
        "_deadlines",
        "_held",
        "_on_quiet",
        "_down",
        "_idle_timeout",
        "_loop",
        "_masks",
        "_on_done",
        "_pool",
        "_poller",
        "_up",
        "_upstream",
        "deadline",
        "deadline_slot",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, poller: Poller, pool: PipePool,
                 client: socket.socket, upstream: socket.socket, idle_timeout: float,
                 on_done: RelayDone) -> None:
        self._loop = loop
        self._poller = poller
        self._pool = pool
        self._client = client
        self._upstream = upstream
        cfd, ufd = client.fileno(), upstream.fileno()
        self._up = _Flow(cfd, ufd, "client", "upstream")
        self._down = _Flow(ufd, cfd, "upstream", "client")
        self._masks = [EPOLLIN, EPOLLIN]  # interest of [client fd, upstream fd]
        self._idle_timeout = idle_timeout
        self._deadlines = deadlines_for(loop)
        self.deadline = 0.0
        self.deadline_slot = 0
        self._on_done = on_done
        self._closed = False
        self._held = False  # out of the poller, waiting to be released or resumed
        self._on_quiet: Callable[[], None] | None = None  # hold() asked while bytes moved

    def start(self) -> None:
        self._deadlines.after(self, self._idle_timeout)
        self._poller.register(self._up.src, EPOLLIN, self._on_client, self._crashed)
        self._poller.register(self._down.src, EPOLLIN, self._on_upstream, self._crashed)
        # The client's first bytes (its ClientHello) are waiting already: send them now
        # rather than one poll cycle later.
        self._pump(self._up)

    def carry_on(self, up: int, down: int, up_eof: bool, down_eof: bool) -> None:
        """Start a relay that another process began: its byte counts and the directions
        that have ended already; whatever the kernel holds is read from here on."""
        self._up.count, self._down.count = up, down
        self._up.eof, self._down.eof = up_eof, down_eof
        self._deadlines.after(self, self._idle_timeout)
        self._masks = [0, 0]
        self._poller.register(self._up.src, 0, self._on_client, self._crashed)
        self._poller.register(self._down.src, 0, self._on_upstream, self._crashed)
        self._watch(self._up.src)
        self._watch(self._down.src)
        for flow in (self._up, self._down):
            if flow.reading and not self._closed:
                self._pump(flow)

    # -- moving to another process ---------------------------------------------------------

    def state(self) -> tuple[int, int, bool, bool]:
        """(bytes up, bytes down, up ended, down ended), for carry_on elsewhere."""
        return self._up.count, self._down.count, self._up.eof, self._down.eof

    def _quiet(self) -> bool:
        up, down = self._up, self._down
        return not (up.pending or down.pending or up.starved or down.starved)

    def hold(self, on_quiet: Callable[[], None]) -> None:
        """Stop moving bytes as soon as none is in a pipe, then call ``on_quiet``."""
        if self._closed or self._held:
            return
        if not self._quiet():
            self._on_quiet = on_quiet  # checked after each event
            return
        self._on_quiet = None
        self._held = True
        for fd, index in ((self._up.src, 0), (self._down.src, 1)):
            if self._masks[index] >= 0:
                self._poller.unregister(fd)
        self._deadlines.clear(self)
        on_quiet()

    def resume(self) -> None:
        """Go on here after all (the new config routes this connection elsewhere)."""
        if not self._held or self._closed:
            return
        self._held = False
        masks, self._masks = self._masks, [0, 0]
        for fd, index, callback in ((self._up.src, 0, self._on_client),
                                    (self._down.src, 1, self._on_upstream)):
            if masks[index] >= 0:
                self._poller.register(fd, 0, callback, self._crashed)
            else:
                self._masks[index] = -1
        self._watch(self._up.src)
        self._watch(self._down.src)
        self._deadlines.after(self, self._idle_timeout)
        for flow in (self._up, self._down):
            if flow.reading and not self._closed:
                self._pump(flow)

    def release(self) -> None:
        """Another process carries on: close our copies of the sockets (a close, not a
        shutdown: the connection lives on in the other process's descriptors)."""
        if self._closed:
            return
        self._closed = True
        self._deadlines.clear(self)
        self._client.close()
        self._upstream.close()

    # -- events ---------------------------------------------------------------------------

    def _on_client(self, events: int) -> None:
        self._on_event(events, self._up, self._down)

    def _on_upstream(self, events: int) -> None:
        self._on_event(events, self._down, self._up)

    def _on_event(self, events: int, out: _Flow, into: _Flow) -> None:
        self._move(events, out, into)
        if self._on_quiet is not None and not self._closed and self._quiet():
            self.hold(self._on_quiet)

    def _move(self, events: int, out: _Flow, into: _Flow) -> None:
        """``out`` reads from this socket, ``into`` writes to it."""
        if self._idle_timeout:
            self._deadlines.set(self, self._loop.time() + self._idle_timeout)
        if events & EPOLLOUT and into.pending:
            self._flush(into)
            if self._closed:
                return
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR) and out.reading:
            self._pump(out)  # the read reports the end of stream or the error itself
            return
        if events & (EPOLLHUP | EPOLLERR) and not self._closed:
            # A hang-up or an error on a socket nothing is reading: the peer is gone for
            # good, and level-triggered epoll would report it again and again.
            sock = self._client if out is self._up else self._upstream
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(out.src_name, OSError(err, os.strerror(err)))
            elif into.pending:
                self.close(f"{out.src_name}_closed")  # what waits for it cannot be delivered
            else:
                # Closed both ways after its own end of stream: stop watching it (level-
                # triggered epoll would repeat the hang-up); a later write to it fails
                # with EPIPE and ends the relay, the other side's end of stream ends it.
                self._masks[0 if out is self._up else 1] = -1
                self._poller.unregister(out.src)

    def _watch(self, fd: int) -> None:
        """Set the interest of ``fd`` from what its two flows need now."""
        up, down = self._up, self._down
        if fd == up.src:
            mask = (EPOLLIN if up.reading else 0) | (EPOLLOUT if down.pending else 0)
            index = 0
        else:
            mask = (EPOLLIN if down.reading else 0) | (EPOLLOUT if up.pending else 0)
            index = 1
        if mask != self._masks[index] and self._masks[index] >= 0:  # -1: no longer watched
            self._masks[index] = mask
            self._poller.modify(fd, mask)

    # -- moving bytes ---------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the relay now (drain deadline, shutdown): both sockets are closed."""
        if self._closed:
            return
        self._closed = True
        self._deadlines.clear(self)
        for flow in (self._up, self._down):
            if not self._held:  # held: out of the poller already
                self._poller.forget(flow.src)
            if flow.pipe is not None:
                if flow.pending:
                    self._pool.discard(flow.pipe)
                else:
                    self._pool.put(flow.pipe)
                flow.pipe = None
        self._client.close()
        self._upstream.close()
        self._on_done(reason, self._up.count, self._down.count)

    def _pump(self, f: _Flow) -> None:
        pool = self._pool
        while True:
            if f.pending == 0:
                pipe = f.pipe
                if pipe is None:
                    try:
                        pipe = f.pipe = pool.get()
                    except OSError as exc:  # EMFILE, ENFILE, or the ledger is full
                        self._starve(f, exc)
                        return
                try:
                    n = os.splice(f.src, pipe[1], pool.size, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    pool.put(pipe)
                    f.pipe = None
                    return
                except OSError as exc:
                    self._fail(f.src_name, exc)
                    return
                if n == 0:
                    pool.put(pipe)
                    f.pipe = None
                    self._end_of_stream(f)
                    return
                f.pending = n
                f.count += n
            else:
                n = pool.size  # flushing what was left: then read on
            assert f.pipe is not None
            try:
                m = os.splice(f.pipe[0], f.dst, f.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                self._fail(f.dst_name, exc)
                return
            f.pending -= m
            if f.pending:
                # The destination is full: stop reading the source until it drains.
                self._watch(f.src)
                self._watch(f.dst)
                return
            if n < pool.size:
                # A short read means the socket is (almost surely) drained: skip the read
                # that would only say EAGAIN. Level-triggered epoll calls again if not.
                pool.put(f.pipe)
                f.pipe = None
                return

    def _flush(self, f: _Flow) -> None:
        assert f.pipe is not None
        try:
            m = os.splice(f.pipe[0], f.dst, f.pending, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f.dst_name, exc)
            return
        f.pending -= m
        if f.pending == 0:
            self._pool.put(f.pipe)
            f.pipe = None
            self._watch(f.dst)
            self._watch(f.src)
            self._pump(f)  # more may have arrived while we waited

    def _end_of_stream(self, f: _Flow) -> None:
        # Everything read before the end is already written (pending == 0): pass it on.
        f.eof = True
        try:
            (self._upstream if f is self._up else self._client).shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._fail(f.dst_name, exc)
                return
        if self._up.eof and self._down.eof:
            self.close("eof")
            return
        self._watch(f.src)

    def _fail(self, side: str, exc: OSError) -> None:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            sent_all = self._up.eof if side == "client" else self._down.eof
            # A side that had finished sending (its FIN came through) and then resets is a
            # TLS server closing without reading the client's close_notify: a normal end.
            self.close("eof" if sent_all else f"{side}_reset")
        else:
            self.close(f"{side}_error: {exc.strerror}")

    def expired(self, now: float) -> None:
        """No byte either way for ``idle_timeout``."""
        self.close("idle_timeout")

    def _crashed(self, exc: BaseException) -> None:
        self.close(f"internal_error: {type(exc).__name__}")

    def _starve(self, f: _Flow, exc: OSError) -> None:
        """No pipe for ``f`` now: stop reading its source (level-triggered epoll would call
        again at once) and try again shortly; the bytes wait in the kernel meanwhile."""
        suffix = throttle.allow("relay:no_pipe")
        if suffix is not None:
            diag.warning("relay: no pipe for a connection (%s); it waits%s",
                         exc.strerror or exc, suffix)
        f.starved = True
        self._watch(f.src)
        self._loop.call_later(STARVED_RETRY, self._unstarve, f)

    def _unstarve(self, f: _Flow) -> None:
        if self._closed:
            return
        f.starved = False
        self._watch(f.src)
        self._pump(f)
