"""The ACME service's process: a child of the master, supervised like a worker.

Job: run ``certs.acme_service.run_service`` for the current config in its own process, so
that ACME's network calls, waits and crypto never touch the master's loop or a worker's
request path (issue 10 item 2). The master starts it when a config has ``tls = "acme"``
sites, restarts it when it dies (with a growing delay) and replaces it when a reload
changes what it must do. It reports each certificate's state (next renewal, last error) as
JSON lines on a pipe, which the master keeps for ``status``.

Rules:
- The child keeps the master's privileges (it writes the storage: the account key and
  certificates are 0600), holds no listening socket, and exits when the master does (the
  lifeline pipe, as workers).
- Certificates reach the workers through the storage: the master's ``CertWatcher`` sees a
  new one within seconds and swaps it in; the child never talks to workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sniport.logs import diag

MAX_LINE = 64 * 1024
BACKOFF_MIN, BACKOFF_MAX = 2.0, 300.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


class ServiceProcess:
    """The master's handle on one ACME service child."""

    def __init__(self, plan: Any, close_in_child: Callable[[], None], lifeline_fd: int) -> None:
        self.plan = plan  # runtime.AcmePlan
        self.pid = 0
        self.read_fd = -1
        self.states: dict[str, dict[str, Any]] = {}  # site -> its CertState as a dict
        self._buffer = b""
        self._close_in_child = close_in_child
        self._lifeline = lifeline_fd
        self.delay = BACKOFF_MIN
        self.restart_at = 0.0

    def start(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        # A stop signal between the fork and the child's own handlers would go to the
        # master's handler (a queue nobody reads in the child) and be lost: blocked across
        # the fork, then the defaults (terminate) until the child's loop takes over.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            code = 1
            try:
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                os.close(read_fd)
                self._close_in_child()
                code = _child_main(self.plan, write_fd, self._lifeline)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.pid, self.read_fd = pid, read_fd
        diag.info("ACME service started (pid %d) for %d certificate(s)", pid,
                  len(self.plan.certs))

    def readable(self) -> None:
        """Read the child's reports (never blocks)."""
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                os.close(self.read_fd)
                self.read_fd = -1
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            if len(self._buffer) > MAX_LINE:
                self._buffer = b""
            for line in lines:
                with contextlib.suppress(ValueError, TypeError):
                    states = json.loads(line)
                    self.states = {s["site"]: s for s in states if isinstance(s, dict)}

    def exited(self) -> None:
        self.pid = 0
        if self.read_fd >= 0:
            self.readable()
            if self.read_fd >= 0:
                os.close(self.read_fd)
                self.read_fd = -1

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)


def _child_main(plan: Any, report_fd: int, lifeline_fd: int) -> int:
    import uvloop

    from sniport.certs.acme_service import run_service
    from sniport.certs.backends import open_storage

    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_IGN if sig != signal.SIGCHLD else signal.SIG_DFL)
    storage = open_storage(plan.storage)

    def report(states: list[Any]) -> None:
        line = json.dumps([asdict(s) for s in states], default=str).encode() + b"\n"
        with contextlib.suppress(OSError):
            os.write(report_fd, line)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(run_service(plan.settings, storage, list(plan.certs), report))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, task.cancel)
        os.set_blocking(lifeline_fd, False)

        def master_gone() -> None:
            with contextlib.suppress(BlockingIOError):
                if not os.read(lifeline_fd, 64):
                    loop.remove_reader(lifeline_fd)
                    task.cancel()

        loop.add_reader(lifeline_fd, master_gone)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(serve())
    return 0
