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
  costs its two sockets and nothing more (DESIGN.md "Performance notes").
- Reads go on until EAGAIN: uvloop stops a watcher after an error event without telling us
  (DESIGN.md "uvloop add_reader trap"), so a callback may not leave bytes unread.
- Readers and writers are removed before a socket is closed: fd numbers are reused.
- No byte passes for ``idle_timeout``: both sockets are closed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable

PIPE_SIZE = 1 << 20  # bytes one splice may move (bench/relay_compare.py: 1 MiB costs least)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Idle, empty pipes kept for reuse; a pipe that still holds bytes is never pooled."""

    __slots__ = ("_idle", "_max_idle", "size")

    def __init__(self, max_idle: int = 32, size: int = PIPE_SIZE) -> None:
        self._idle: list[tuple[int, int]] = []
        self._max_idle = max_idle
        self.size = size

    def get(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
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
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self._idle:
            os.close(r)
            os.close(w)
        self._idle.clear()


class _Flow:
    """One direction of a relay: ``src`` -> pipe -> ``dst``."""

    __slots__ = (
        "count",
        "dst",
        "dst_name",
        "eof",
        "on_readable",
        "on_writable",
        "pending",
        "pipe",
        "src",
        "src_name",
    )

    def __init__(self, src: int, dst: int, src_name: str, dst_name: str) -> None:
        self.src = src
        self.dst = dst
        self.src_name = src_name
        self.dst_name = dst_name
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe not yet written to dst
        self.eof = False
        self.count = 0
        self.on_readable: Callable[[], None] = _noop
        self.on_writable: Callable[[], None] = _noop


RelayDone = Callable[[str, int, int], None]  # (how it ended, bytes client->up, bytes up->client)


class SpliceRelay:
    __slots__ = (
        "_client",
        "_closed",
        "_down",
        "_idle_timeout",
        "_last",
        "_loop",
        "_on_done",
        "_pool",
        "_timer",
        "_up",
        "_upstream",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: PipePool, client: socket.socket,
                 upstream: socket.socket, idle_timeout: float, on_done: RelayDone) -> None:
        self._loop = loop
        self._pool = pool
        self._client = client
        self._upstream = upstream
        cfd, ufd = client.fileno(), upstream.fileno()
        self._up = _Flow(cfd, ufd, "client", "upstream")
        self._down = _Flow(ufd, cfd, "upstream", "client")
        up, down = self._up, self._down
        up.on_readable = lambda: self._pump(up)
        down.on_readable = lambda: self._pump(down)
        up.on_writable = lambda: self._flush(up)
        down.on_writable = lambda: self._flush(down)
        self._idle_timeout = idle_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._on_done = on_done
        self._closed = False

    def start(self) -> None:
        self._last = self._loop.time()
        self._loop.add_reader(self._up.src, self._up.on_readable)
        self._loop.add_reader(self._down.src, self._down.on_readable)
        self._timer = self._loop.call_at(self._last + self._idle_timeout, self._check_idle)

    def close(self, reason: str) -> None:
        """End the relay now (drain deadline, shutdown): both sockets are closed."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if self._timer is not None:
            self._timer.cancel()
        for flow in (self._up, self._down):
            loop.remove_reader(flow.src)
            loop.remove_writer(flow.dst)
            if flow.pipe is not None:
                if flow.pending:
                    os.close(flow.pipe[0])
                    os.close(flow.pipe[1])
                else:
                    self._pool.put(flow.pipe)
                flow.pipe = None
        self._client.close()
        self._upstream.close()
        self._on_done(reason, self._up.count, self._down.count)

    def _pump(self, f: _Flow) -> None:
        self._last = self._loop.time()
        pool = self._pool
        while True:
            if f.pending == 0:
                pipe = f.pipe
                if pipe is None:
                    pipe = f.pipe = pool.get()
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
                self._loop.remove_reader(f.src)
                self._loop.add_writer(f.dst, f.on_writable)
                return

    def _flush(self, f: _Flow) -> None:
        self._last = self._loop.time()
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
            self._loop.remove_writer(f.dst)
            self._pool.put(f.pipe)
            f.pipe = None
            self._loop.add_reader(f.src, f.on_readable)

    def _end_of_stream(self, f: _Flow) -> None:
        # Everything read before the end is already written (pending == 0): pass it on.
        f.eof = True
        self._loop.remove_reader(f.src)
        try:
            (self._upstream if f is self._up else self._client).shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._fail(f.dst_name, exc)
                return
        if self._up.eof and self._down.eof:
            self.close("eof")

    def _fail(self, side: str, exc: OSError) -> None:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            self.close(f"{side}_reset")
        else:
            self.close(f"{side}_error: {exc.strerror}")

    def _check_idle(self) -> None:
        deadline = self._last + self._idle_timeout
        if self._loop.time() >= deadline:
            self._timer = None
            self.close("idle_timeout")
        else:
            self._timer = self._loop.call_at(deadline, self._check_idle)




def _noop() -> None:
    pass
