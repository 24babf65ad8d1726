"""The master process: binds the sockets, builds the TLS contexts, forks the workers, and
handles signals, reloads, upgrades and stops.

Job: keep the service up. The master does no request work; it owns every listening socket
for its whole life, so that a reload or a worker restart never refuses a connection.

Rules (DESIGN.md "Operations contract"):
- Config, TLS contexts and route tables are built here, before the fork: forked workers
  share the session-ticket keys (the stdlib ssl module cannot set them), so a resumed
  session works on whichever worker a client reaches. A reload builds new ones.
- Signals are queued and handled one at a time in the main loop, never lost: SIGHUP reload,
  SIGTERM/SIGQUIT graceful stop (a second one makes it fast), SIGINT fast stop, SIGUSR1
  reopen logs, SIGUSR2 upgrade (exec a new master that inherits the listening sockets).
- A reload is validated with the same code as ``check``; if anything fails (config, a key,
  a port, a worker that dies before it is ready), the old workers keep serving untouched.
- A worker that dies is logged with its cause and replaced, with a growing backoff.
- Each worker has a control socket to the master (``handover.py``): a draining worker
  offers its quiet passthrough relays, and the master hands each to a worker of the current
  generation when the current config routes it the same way, so that reloads do not cut
  them; the master only passes descriptors along and never blocks on a worker.
- Unix socket files are removed at exit only if their inode is still the one bound here,
  and never when the sockets were handed to a new master.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sniport import __version__, compiled, handover
from sniport.addresses import Address, TcpAddress, UnixAddress
from sniport.certs import service_proc
from sniport.certs.backends import open_storage
from sniport.certs.service_proc import ServiceProcess
from sniport.certs.slots import source_key
from sniport.certs.watch import CertWatcher, Update
from sniport.config import ConfigError, Listen
from sniport.http import h2conn
from sniport.iplimits import IpTable, size_for
from sniport.logs import diag
from sniport.metrics import Key, SharedMetrics, render
from sniport.metrics_http import MetricsEndpoint
from sniport.net.binding import (
    BindError,
    BoundListener,
    bind_one,
    defers_accept,
    tune_listener,
)
from sniport.runtime import Runtime
from sniport.systemd import activated_sockets, notify

# Shared metrics: slots for the workers alive at once (two generations while a reload drains,
# and respawns), cells for the largest config (untouched pages of the mapping cost nothing).
METRIC_SLOTS = 64
METRIC_CELLS = 1 << 17
RENDER_EVERY = 1.0  # seconds a rendered /metrics is reused
MASTER_STORAGE_TIMEOUT = 0.5  # seconds for one look at a shared (Redis) ACME storage
READY_TIMEOUT = 15.0  # seconds new workers have to report ready before a reload is given up
STOP_GRACE = 5.0  # beyond drain_timeout, before a worker that does not exit is killed
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
STABLE_AFTER = 30.0  # a worker that lived this long resets its slot's backoff
INHERIT_ENV = "SNIPORT_INHERITED_FDS"  # "fd=address,..." from the master that exec'd us
PARENT_ENV = "SNIPORT_UPGRADE_FROM"  # the pid of that master, told to stop once we serve


class StartError(Exception):
    """The master cannot start: the message says why (cli.py prints it)."""


class SpawnError(Exception):
    """A worker could not be forked (EAGAIN, ENOMEM): the message says why."""


@dataclass
class WorkerProc:
    pid: int
    generation: int
    slot: int
    ready_fd: int
    started: float
    control: socket.socket  # the master's end of the worker's control socket
    ready: bool = False
    mslot: int | None = None  # its slot in the shared metrics (None: not counted)
    ipslot: int | None = None  # its slot in the per-address limits table (iplimits.py)


@dataclass
class Generation:
    number: int
    runtime: Runtime
    keys: list[str]  # the listener addresses it serves
    loaded_at: float
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    backoff: dict[int, float] = field(default_factory=dict)  # slot -> next delay
    respawn_at: dict[int, float] = field(default_factory=dict)  # slot -> when
    ready_deadline: float = 0.0
    draining: bool = False
    # Each passthrough block's upstream labels, for the relays offered to this generation.
    upstream_labels: dict[str, list[str]] = field(default_factory=dict)


def worker_count(setting: int | str) -> int:
    if isinstance(setting, int):
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def listener_key(address: Address) -> str:
    return str(address)


def _entry_key(entry: Listen, where: str) -> str:
    address = entry.address
    if isinstance(address, TcpAddress) and address.port == 0:
        return f"{address}#{where}"
    return listener_key(address)


@dataclass
class ReloadOutcome:
    """What the last reload did, for ``sniport reload`` (which waits for it) and ``status``.
    ``started`` is CLOCK_MONOTONIC (the same clock in every process of the machine) at the
    moment the reload began reading the config: a reload requested at time T is answered by
    the first outcome with ``started >= T``."""

    started: float
    at: float  # wall clock, for people
    ok: bool
    result: str  # one line: "generation 3 serving" or why it failed
    problems: list[str] = field(default_factory=list)


class Master:
    def __init__(self, prepare: Any, config_label: str, argv: list[str]) -> None:
        self._prepare = prepare  # () -> Runtime (files opened), raises ConfigError
        self.config_label = config_label
        self._argv = argv  # to exec ourselves for an upgrade
        self.listeners: dict[str, BoundListener] = {}
        self.generations: list[Generation] = []
        self.current: Generation | None = None
        self.pending: Generation | None = None  # a reload waiting for its workers
        self._next_gen = 1
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._life_r, self._life_w = os.pipe2(os.O_CLOEXEC)
        self.stopping = ""  # "", "graceful" or "fast"
        self._stop_deadline = 0.0
        self._upgrade_child = 0
        self._handed_over = False
        self._parent_master = int(os.environ.pop(PARENT_ENV, "0") or 0)
        self.pid_file: Path | None = None
        self.status_file: Path | None = None
        self.exit_code = 0
        self._reload_again = False
        self._upgraded_keys: set[str] = set()
        self.last_reload: ReloadOutcome | None = None
        self._adopt_turn = 0
        self._reload_started = 0.0  # monotonic start of the reload under way
        self.watcher: CertWatcher | None = None  # the current generation's certificates
        # Counters in shared memory, mapped before the first fork (metrics.py); the
        # endpoint that serves their totals, when metrics_listen is set.
        self.metrics: SharedMetrics | None = None  # made in start(), before the first fork
        # The per-address limits every worker shares (iplimits.py): also mapped before the
        # first fork, sized once, kept across reloads (a reload may turn the limits on).
        self.iptable: IpTable | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._metrics_pending: tuple[MetricsEndpoint | None, Address | None] | None = None
        self._rendered = (0.0, b"")  # (when, what): scrapes within a second share one
        self._metrics_at: Address | None = None
        self._reloads = {"ok": 0, "failed": 0}
        self.acme: ServiceProcess | None = None
        self._cert_backlog: list[tuple[int, str, int]] = []  # (pid, source, fd) not yet sent

    # -- start ----------------------------------------------------------------------------

    def start(self) -> Runtime:
        runtime: Runtime = self._prepare()
        server = runtime.loaded.config.server
        from sniport.logs import setup_diagnostics

        setup_diagnostics(server.log_level)
        for warning in runtime.warnings:
            diag.warning("%s", warning)
        # Slots for every worker alive at once: a reload's two generations, and respawns.
        self.metrics = SharedMetrics(max(METRIC_SLOTS, 4 * worker_count(server.workers) + 8),
                                     METRIC_CELLS)
        workers = worker_count(server.workers)
        self.iptable = IpTable(*size_for(workers, server.max_connections))
        per_connection = self.iptable.buckets / max(1, workers * server.max_connections)
        if (server.max_connections_per_ip or server.max_connection_rate_per_ip) \
                and per_connection < 4:
            diag.warning("per-address limits: %.2g table buckets per connection (%d workers "
                         "x max_connections %d): with every connection from a different "
                         "address an innocent address may be refused more often than the "
                         "1/(4 n^2) of 4 buckets (README, Known limits)", per_connection,
                         workers, server.max_connections)
        inherited = self._inherited_sockets()
        try:
            self._bind(runtime, inherited)
            self._bind_metrics(runtime)
            self._swap_metrics()
        except BindError as exc:
            for b in self.listeners.values():
                b.close()
            runtime.close()
            raise StartError(str(exc)) from None
        for sock in inherited.values():
            sock.close()  # passed to us but not in the config
        self._paths(runtime)
        return runtime

    def _inherited_sockets(self) -> dict[str, Any]:
        import socket

        found: dict[str, Any] = {}
        for sock, name in activated_sockets():
            found[_sock_key(sock)] = sock
            diag.info("systemd passed %s%s", _sock_key(sock), f" ({name})" if name else "")
        spec = os.environ.pop(INHERIT_ENV, "")
        for item in filter(None, spec.split(",")):
            fd_text, _, key = item.partition("=")
            sock = socket.socket(fileno=int(fd_text))
            os.set_inheritable(sock.fileno(), False)
            found[key] = sock
            self._upgraded_keys.add(key)  # its socket file is ours now, to remove at exit
        return found

    def _wanted(self, runtime: Runtime) -> list[tuple[str, Listen]]:
        server = runtime.loaded.config.server
        # Port 0 (tests, "any free port") may be listed several times: one socket each, so
        # such an entry is keyed by where it stands, not by its address.
        return [(_entry_key(e, f"{kind}[{i}]"), e)
                for kind, entries in (("listen", server.listen),
                                      ("http_listen", server.http_listen))
                for i, e in enumerate(entries)]

    def _bind(self, runtime: Runtime, inherited: dict[str, Any]) -> list[str]:
        """Bind what the config lists and is not bound yet; return the new keys.
        On failure, nothing new stays bound."""
        new: list[str] = []
        errors: list[str] = []
        for key, entry in self._wanted(runtime):
            if key in self.listeners:
                continue
            sock = inherited.pop(key, None)
            if sock is not None:
                sock.setblocking(False)
                inode = None
                if key in self._upgraded_keys and isinstance(entry.address, UnixAddress) \
                        and not entry.address.abstract:
                    with contextlib.suppress(OSError):
                        st = os.lstat(entry.address.path)
                        inode = (st.st_dev, st.st_ino)
                # systemd's sockets keep inode None: their files are systemd's business.
                self.listeners[key] = BoundListener(entry.address, sock, inode)
                new.append(key)
                continue
            try:
                self.listeners[key] = bind_one(entry)
                new.append(key)
            except BindError as exc:
                errors.append(str(exc))
        if errors:
            for key in new:
                self.listeners.pop(key).close()
            raise BindError("\n".join(errors))
        self._tune(runtime)
        return new

    def _tune(self, runtime: Runtime) -> None:
        """The listening sockets' options as ``runtime``'s workers expect them (deferred
        accept: their timers count it in)."""
        defer = defers_accept(runtime.loaded.config.server.client_hello_timeout,
                              runtime.table.silent_after)
        for key, _ in self._wanted(runtime):
            if key in self.listeners:
                tune_listener(self.listeners[key].sock, defer)

    def _paths(self, runtime: Runtime) -> None:
        from sniport.runtime import state_dir

        server = runtime.loaded.config.server
        state = state_dir(runtime.loaded)
        pid_file = server.pid_file.replace("{state_dir}", str(state)) if server.pid_file else ""
        self.pid_file = Path(pid_file) if pid_file else None
        self.status_file = (self.pid_file.with_suffix(".status.json")
                            if self.pid_file else None)

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        runtime = self.start()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGINT,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            try:
                self.pending = self._new_generation(runtime)
            except SpawnError as exc:
                raise StartError(str(exc)) from None
            return self._loop()
        finally:
            self._cleanup()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled in order by the main loop, never dropped

    def _loop(self) -> int:
        while True:
            while self._signals:
                self._handle_signal(self._signals.popleft())
            self._reap()
            self._check_pending()
            self._respawn_due()
            if self.stopping and not self._any_workers():
                return self.exit_code
            if self.stopping and time.monotonic() >= self._stop_deadline:
                self._kill_all(signal.SIGKILL)
            self._certificates()
            timeout = self._next_timeout()
            workers = self._all_workers()
            controls = {w.control.fileno(): w for w in workers if w.control.fileno() >= 0}
            fds = [self._wake_r, *controls] + [w.ready_fd for w in workers
                                               if not w.ready and w.ready_fd >= 0]
            acme_fd = self.acme.read_fd if self.acme is not None else -1
            if acme_fd >= 0:
                fds.append(acme_fd)
            endpoint = self.metrics_endpoint
            scrape = set(endpoint.fds()) if endpoint is not None else set()
            writable_fds = endpoint.fds_writable() if endpoint is not None else []
            try:
                readable, writable, _ = select.select([*fds, *scrape], writable_fds, [],
                                                      timeout)
            except InterruptedError:
                continue
            if endpoint is not None:
                for fd in writable:
                    endpoint.on_writable(fd)
                for fd in readable:
                    if fd in scrape:
                        endpoint.on_readable(fd)
                endpoint.expire(time.monotonic())
                readable = [fd for fd in readable if fd not in scrape]
            for fd in readable:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif fd == acme_fd and self.acme is not None:
                    self.acme.readable()
                    self._write_status()
                elif fd in controls:
                    self._on_control(controls[fd])
                else:
                    self._worker_ready(fd)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        times = [now + 1.0]
        if self.pending is not None:
            times.append(self.pending.ready_deadline)
        for gen in self.generations:
            times.extend(gen.respawn_at.values())
        if self.stopping:
            times.append(self._stop_deadline)
        if self.acme is not None and not self.acme.pid and not self.stopping:
            times.append(self.acme.restart_at)
        if self.metrics_endpoint is not None:
            deadline = self.metrics_endpoint.next_deadline()
            if deadline is not None:
                times.append(deadline)
        return max(0.0, min(times) - now)

    # -- signals --------------------------------------------------------------------------

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap runs on every turn of the loop
        if signum == signal.SIGHUP:
            self.reload()
        elif signum in (signal.SIGTERM, signal.SIGQUIT):
            if self._upgrade_child and not self.stopping:
                # The master we exec'd serves and tells us to go: its sockets, files and
                # pid file are its own now.
                self._handed_over = True
            self.stop(fast=self.stopping == "graceful")
        elif signum == signal.SIGINT:
            self.stop(fast=True)
        elif signum == signal.SIGUSR1:
            for gen in self.generations:
                log = gen.runtime.access_log
                if log is not None:
                    log.reopen()
                    server = gen.runtime.loaded.config.server
                    # Workers that dropped privileges reopen the file the master just
                    # made: it must be theirs (nginx does the same).
                    log.give_to(server.user, server.group)
            self._signal_workers(signal.SIGUSR1)
            diag.info("log files reopened")
        elif signum == signal.SIGUSR2:
            self.upgrade()

    # -- workers --------------------------------------------------------------------------

    def _new_generation(self, runtime: Runtime) -> Generation:
        keys = [key for key, _ in self._wanted(runtime)]
        gen = Generation(self._next_gen, runtime, keys, time.time(), upstream_labels={
            name: rt.upstream_labels for name, rt in runtime.passthrough.items()})
        self._next_gen += 1
        gen.ready_deadline = time.monotonic() + READY_TIMEOUT
        self.generations.append(gen)
        count = worker_count(runtime.loaded.config.server.workers)
        try:
            for slot in range(count):
                self._spawn(gen, slot)
        except SpawnError:
            # All or nothing: the workers that did start go, and so does the generation.
            for w in gen.workers.values():
                _kill(w.pid, signal.SIGKILL)
                if w.ready_fd >= 0:
                    os.close(w.ready_fd)
                    w.ready_fd = -1
            gen.draining = True
            if not gen.workers:
                self._forget(gen)
            raise
        return gen

    def _forget(self, gen: Generation) -> None:
        """A generation without workers left: its files close, its listeners may too."""
        self.generations.remove(gen)
        gen.runtime.close()
        self._close_unused()

    def _spawn(self, gen: Generation, slot: int) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            raise SpawnError(f"cannot start a worker: {exc.strerror}") from None
        server = gen.runtime.loaded.config.server
        listen_keys = {_entry_key(e, f"listen[{i}]") for i, e in enumerate(server.listen)}
        bound = [self.listeners[k] for k in gen.keys if k in listen_keys]
        http_bound = [self.listeners[k] for k in gen.keys if k not in listen_keys]
        access_log = gen.runtime.access_log
        assert access_log is not None
        layout = gen.runtime.layout
        mslot = None
        assert self.metrics is not None
        if gen.runtime.loaded.config.server.metrics_listen is not None:
            if self.metrics.fits(layout):
                mslot = self.metrics.acquire_slot()
            if mslot is None:
                diag.warning("metrics: no room for worker slot %d of generation %d (the "
                             "config names too many series, or too many workers at once); "
                             "its work is not counted", slot, gen.number)
        ipslot, iptable = None, self.iptable
        assert iptable is not None
        if server.max_connections_per_ip or server.max_connection_rate_per_ip is not None:
            ipslot = iptable.acquire_slot()
            if ipslot is None:
                diag.warning("per-address limits: no room for worker slot %d of generation "
                             "%d (too many workers at once); it counts its own clients only",
                             slot, gen.number)
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            control.close()
            theirs.close()
            if mslot is not None:
                self.metrics.retire_slot(mslot, layout)
            if ipslot is not None:
                iptable.retire_slot(ipslot)
            raise SpawnError(f"cannot start a worker: {exc.strerror}") from None
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                control.close()
                self._close_in_child(keep={id(b) for b in bound + http_bound})
                from sniport.worker import worker_main

                wm = self.metrics.worker_metrics(mslot, layout) \
                    if mslot is not None and self.metrics is not None else None
                code = worker_main(gen.runtime, bound, http_bound, access_log,
                                   self._life_r, ready_w, theirs, wm, (iptable, ipslot))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(ready_w)
        theirs.close()
        control.setblocking(False)
        gen.workers[pid] = WorkerProc(pid, gen.number, slot, ready_r, time.monotonic(), control,
                                      mslot=mslot, ipslot=ipslot)
        self._write_status()

    def _close_in_child(self, keep: set[int]) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w, self._life_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        for w in self._all_workers():
            with contextlib.suppress(OSError):
                os.close(w.ready_fd)
            w.control.close()
        for b in self.listeners.values():
            if id(b) not in keep:
                b.sock.close()  # not this worker's: closing our copy touches no file
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()  # the child's copies: the master's stay open
        if self._metrics_pending is not None and self._metrics_pending[0] is not None:
            self._metrics_pending[0].close()
        if self.acme is not None and self.acme.read_fd >= 0:
            os.close(self.acme.read_fd)
        for _, _, fd in self._cert_backlog:
            os.close(fd)

    def _worker_ready(self, fd: int) -> None:
        for w in self._all_workers():
            if w.ready_fd == fd:
                with contextlib.suppress(OSError):
                    data = os.read(fd, 64)
                    if data.startswith(b"ready"):
                        w.ready = True
                os.close(fd)
                w.ready_fd = -1  # ready, or closed without a word: its exit is reaped below
                return

    def _check_pending(self) -> None:
        gen = self.pending
        if gen is None:
            return
        workers = list(gen.workers.values())
        if workers and all(w.ready for w in workers):
            self._promote(gen)
        elif time.monotonic() >= gen.ready_deadline:
            self._abandon(gen, f"workers not ready within {READY_TIMEOUT:g}s")

    def _promote(self, gen: Generation) -> None:
        """The new generation serves: the previous ones drain."""
        self.pending = None
        old = [g for g in self.generations if g is not gen and not g.draining]
        self.current = gen
        for g in old:
            g.draining = True
            g.respawn_at.clear()
            for w in g.workers.values():
                _kill(w.pid, signal.SIGTERM)
        server = gen.runtime.loaded.config.server
        addresses = ", ".join(str(self.listeners[k].address) for k in gen.keys)
        self._close_unused()
        self._watch(gen)
        self._swap_metrics()
        if not old:
            self._write_pid()
        self._write_status()  # the files first: whoever reads the log line finds them fresh
        if old:
            diag.info("reloaded %s (generation %d); %d old worker(s) draining",
                      gen.runtime.loaded.source, gen.number,
                      sum(len(g.workers) for g in old))
        else:
            diag.info("sniport %s (%d worker(s)) serving %s on %s", __version__,
                      worker_count(server.workers), gen.runtime.loaded.source, addresses)
            diag.info("Python code: %s", compiled.describe())
            if gen.runtime.loaded.config.site:
                diag.info("HTTP/2 engine: %s", h2conn.ENGINE_NAME)
            if self._parent_master:
                # An upgrade: we serve, so the master that exec'd us drains and exits.
                diag.info("upgrade: telling the old master %d to stop", self._parent_master)
                _kill(self._parent_master, signal.SIGTERM)
                self._parent_master = 0
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving generation {gen.number}")
        if old:
            self._reload_done(True, f"generation {gen.number} serving")
        self._reload_if_asked()

    def _reload_if_asked(self) -> None:
        if self._reload_again and not self.stopping:
            self._reload_again = False
            self.reload()

    def _abandon(self, gen: Generation, reason: str) -> None:
        self.pending = None
        self._drop_pending_metrics()
        for w in gen.workers.values():
            _kill(w.pid, signal.SIGKILL)
        gen.draining = True
        gen.respawn_at.clear()
        if self.current is None:
            diag.error("cannot start: %s", reason)
            self.exit_code = 1
            self.stop(fast=True)
            return
        self._tune(self.current.runtime)
        diag.error("reload failed: %s; still serving generation %d", reason,
                   self.current.number)
        notify("READY=1")
        self._reload_done(False, f"{reason}; still serving generation {self.current.number}")
        self._reload_if_asked()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.acme is not None and pid == self.acme.pid:
                self._acme_exited(status)
                continue
            if pid == self._upgrade_child:
                self._upgrade_child = 0
                if not self._handed_over:
                    diag.error("upgrade failed: the new master exited (%s); still serving",
                               _exit_cause(status))
                    self._set_inheritable(False)
                continue
            self._worker_exited(pid, status)

    def _worker_exited(self, pid: int, status: int) -> None:
        for gen in self.generations:
            w = gen.workers.pop(pid, None)
            if w is None:
                continue
            w.control.close()
            if w.ready_fd >= 0:
                os.close(w.ready_fd)
            if w.mslot is not None and self.metrics is not None:
                # Reaped: nobody writes it any more. Its counters join the totals (never
                # lost, never counted twice) and the slot is free for another worker.
                self.metrics.retire_slot(w.mslot, gen.runtime.layout)
            if w.ipslot is not None and self.iptable is not None:
                # Reaped, however it ended (SIGKILL included): the connections it counted
                # under the per-address limits are given back.
                self.iptable.retire_slot(w.ipslot)
            cause = _exit_cause(status)
            if gen.draining or self.stopping:
                diag.debug("worker %d (generation %d) exited: %s", pid, gen.number, cause)
            elif gen is self.pending and not w.ready:
                self._abandon(gen, f"worker {pid} exited before it was ready ({cause})")
            else:
                lived = time.monotonic() - w.started
                delay = BACKOFF_MIN if lived >= STABLE_AFTER else gen.backoff.get(w.slot,
                                                                                   BACKOFF_MIN)
                gen.backoff[w.slot] = min(delay * 2, BACKOFF_MAX)
                gen.respawn_at[w.slot] = time.monotonic() + delay
                diag.error("worker %d died (%s) after %.1fs; restarting in %.1fs", pid, cause,
                           lived, delay)
            if gen.draining and not gen.workers:
                self._forget(gen)
            self._write_status()
            return

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for gen in self.generations:
            for slot, when in list(gen.respawn_at.items()):
                if now >= when and not gen.draining and not self.stopping:
                    del gen.respawn_at[slot]
                    try:
                        self._spawn(gen, slot)
                    except SpawnError as exc:
                        delay = gen.backoff.get(slot, BACKOFF_MIN)
                        gen.backoff[slot] = min(delay * 2, BACKOFF_MAX)
                        gen.respawn_at[slot] = now + delay
                        diag.error("%s; trying again in %.1fs", exc, delay)

    def _all_workers(self) -> list[WorkerProc]:
        return [w for g in self.generations for w in g.workers.values()]

    def _any_workers(self) -> bool:
        return any(g.workers for g in self.generations) or bool(self.acme and self.acme.pid)

    def _signal_workers(self, sig: int) -> None:
        for w in self._all_workers():
            _kill(w.pid, sig)

    def _kill_all(self, sig: int) -> None:
        for w in self._all_workers():
            _kill(w.pid, sig)
        if self.acme is not None and self.acme.pid:
            _kill(self.acme.pid, sig)

    # -- relays moving to the current generation (handover.py) ---------------------------

    def _on_control(self, w: WorkerProc) -> None:
        for _ in range(256):  # a bounded batch per turn: other workers and signals too
            got = handover.receive(w.control)
            if got is None:
                return
            data, fds = got
            try:
                if not data:
                    return  # EOF: the worker is exiting; its exit is reaped
                self._handle_offer(w, data, fds)
            except Exception:  # a bug here must cost one connection's move, nothing more
                diag.exception("control message from worker %d", w.pid)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # passed on (duplicated) or refused: ours go

    def _handle_offer(self, w: WorkerProc, data: bytes, fds: list[int]) -> None:
        try:
            op, ident, relayed = handover.decode(data)
        except (ValueError, TypeError) as exc:
            diag.error("control message from worker %d refused: %s", w.pid, exc)
            return
        if op != "offer" or relayed is None:
            return
        target = self._adopter(w)
        taken = False
        gen = self.current
        if (target is not None and gen is not None and len(fds) == handover.DESCRIPTORS
                and handover.routes_the_same(gen.runtime.table, gen.upstream_labels, relayed)):
            taken = handover.send(target.control, handover.encode("adopt", ident, relayed), fds)
        handover.send(w.control, handover.encode("taken" if taken else "keep", ident))

    def _adopter(self, sender: WorkerProc) -> WorkerProc | None:
        """A ready worker of the current generation, not the sender's, round robin."""
        gen = self.current
        if gen is None or self.stopping or sender.generation == gen.number:
            return None
        ready = sorted((w for w in gen.workers.values() if w.ready), key=lambda w: w.slot)
        if not ready:
            return None
        self._adopt_turn = (self._adopt_turn + 1) % len(ready)
        return ready[self._adopt_turn]

    # -- certificates (certs/): swapped without a reload ----------------------------------

    def _watch(self, gen: Generation) -> None:
        """Watch the serving generation's certificate sources; run its ACME service."""
        runtime = gen.runtime
        plan = runtime.acme
        # A short timeout: the master's loop must not wait long on a slow Redis (the looks
        # back off while it fails: certs/watch.py).
        storage = open_storage(plan.storage, timeout=MASTER_STORAGE_TIMEOUT) \
            if plan is not None else None
        self.watcher = CertWatcher(runtime.slots,
                                   [(w.source, w.cert, w.key) for w in runtime.file_watches],
                                   storage)
        for slot in runtime.slots:
            if slot.temporary:
                stand_in = "a temporary self-signed certificate" if slot.stand_in == \
                    "self-signed" else slot.stand_in
                diag.warning("no ACME certificate for %s yet: serving %s until it is "
                             "obtained", ", ".join(slot.hosts), stand_in)
        if self.acme is not None and self.acme.plan != plan:
            if self.acme.pid:
                self.acme.stop()  # reaped in _acme_exited, which starts the new one
            else:
                self.acme = None  # waiting to be restarted: the new plan replaces it
        if self.acme is None and plan is not None:
            self._start_acme(plan)

    def _start_acme(self, plan: object, delay: float = service_proc.BACKOFF_MIN) -> None:
        proc = ServiceProcess(plan, lambda: self._close_in_child(keep=set()), self._life_r)
        proc.delay = delay
        self.acme = proc
        try:
            proc.start()
        except OSError as exc:
            diag.error("cannot start the ACME service: %s; trying again in %.0fs",
                       exc.strerror, proc.delay)
            proc.restart_at = time.monotonic() + proc.delay

    def _acme_exited(self, status: int) -> None:
        proc = self.acme
        assert proc is not None
        pid = proc.pid
        proc.exited()
        plan = self.current.runtime.acme if self.current is not None else None
        if self.stopping or plan is None:
            self.acme = None
            return
        if plan != proc.plan:
            self._start_acme(plan)  # replaced for a reload: at once
            return
        delay = proc.delay
        diag.error("ACME service %d died (%s); restarting in %.0fs", pid,
                   _exit_cause(status), delay)
        proc.delay = min(delay * 2, service_proc.BACKOFF_MAX)
        proc.restart_at = time.monotonic() + delay

    # -- metrics (metrics.py): the totals of every worker, served at metrics_listen -------

    def _bind_metrics(self, runtime: Runtime) -> None:
        """Bind the /metrics listener the config names, if it differs from the one serving
        (BindError, and nothing changed, if it cannot be); ``_swap_metrics`` puts it in
        place once the new generation serves, ``_drop_pending_metrics`` if it never does."""
        self._drop_pending_metrics()
        wanted = runtime.loaded.config.server.metrics_listen
        if wanted == self._metrics_at and (wanted is None) == (self.metrics_endpoint is None):
            return
        endpoint = None
        if wanted is not None:
            bound = bind_one(Listen.model_validate({"address": str(wanted)}))
            bound.sock.setblocking(False)
            endpoint = MetricsEndpoint(bound.sock, self._render_metrics)
        self._metrics_pending = (endpoint, wanted)

    def _swap_metrics(self) -> None:
        if self._metrics_pending is None:
            return
        (endpoint, wanted), self._metrics_pending = self._metrics_pending, None
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self.metrics_endpoint, self._metrics_at = endpoint, wanted
        if endpoint is not None:
            diag.info("metrics at http://%s/metrics", _sock_key(endpoint.sock))

    def _drop_pending_metrics(self) -> None:
        if self._metrics_pending is not None:
            endpoint = self._metrics_pending[0]
            if endpoint is not None:
                endpoint.close()
            self._metrics_pending = None

    def _render_metrics(self) -> bytes:
        """The totals, rendered at most once a second (a scraper that asks in a loop, or
        a config with very many series, costs the master one render a second)."""
        now = time.monotonic()
        if now - self._rendered[0] < RENDER_EVERY and self._rendered[1]:
            return self._rendered[1]
        assert self.metrics is not None
        active = [(w.mslot, gen.runtime.layout) for gen in self.generations
                  for w in gen.workers.values() if w.mslot is not None]
        text = render(self.metrics.collect(active, self._master_values()))
        self._rendered = (time.monotonic(), text)
        return text

    def _master_values(self) -> dict[Key, float]:
        values: dict[Key, float] = {}
        for result, count in self._reloads.items():
            values[("sniport_config_reloads_total", (result,))] = float(count)
        gen = self.current
        if gen is not None:
            for site in gen.runtime.sites.values():
                info = site.slot.info
                if info is not None:
                    values[("sniport_certificate_not_after_seconds", (site.site.name,))] = \
                        info.not_after.timestamp()
        return values

    def _carry_certificates(self, runtime: Runtime) -> None:
        """An ACME site the new config could only give a stand-in (its storage out of
        reach: Redis down) keeps the certificate the running generation serves for the same
        names, so that a reload never trades a real certificate for a self-signed one."""
        if self.current is None:
            return
        serving = {(s.source, s.http2): s for s in self.current.runtime.slots
                   if not s.temporary}
        for slot in runtime.slots:
            prev = serving.get((slot.source, slot.http2))
            if slot.temporary and slot.kind == "acme" and prev is not None:
                slot.context, slot.info, slot.version = prev.context, prev.info, prev.version
                slot.temporary, slot.stand_in = False, ""

    def _certificates(self) -> None:
        """Each turn of the loop: a due ACME restart, certificate sources looked at (every
        few seconds), updates not yet delivered to a worker tried again."""
        proc = self.acme
        if proc is not None and not proc.pid and not self.stopping \
                and time.monotonic() >= proc.restart_at:
            self._start_acme(proc.plan, proc.delay)
        if self.watcher is not None and self.current is not None and not self.stopping:
            for update in self.watcher.poll():
                self._apply_certificate(self.current, update)
        backlog, self._cert_backlog = self._cert_backlog, []
        live = {w.pid: w for w in self._all_workers()}
        stuck: set[int] = set()  # in order: nothing for a worker passes an older update
        for pid, key, fd in backlog:
            w = live.get(pid)
            if w is not None and (pid in stuck or not handover.send(
                    w.control, handover.encode_cert(key), [fd])):
                stuck.add(pid)
                self._cert_backlog.append((pid, key, fd))
                continue
            os.close(fd)

    def _apply_certificate(self, gen: Generation, update: Update) -> None:
        """The master's slots first (a worker forked from now on starts with it), then
        every worker of the generation; older generations are draining and keep theirs."""
        try:
            for slot in gen.runtime.slots:
                if slot.source == update.source:
                    slot.swap(update.fd, update.info, update.version)
            key = source_key(update.source)
            message = handover.encode_cert(key)
            waiting = {pid for pid, _, _ in self._cert_backlog}
            for w in gen.workers.values():
                if w.pid in waiting:
                    # Behind the updates it has not received yet, and instead of an older
                    # one of the same certificate.
                    self._drop_backlog(w.pid, key)
                    self._cert_backlog.append((w.pid, key, os.dup(update.fd)))
                elif not handover.send(w.control, message, [update.fd]):
                    self._cert_backlog.append((w.pid, key, os.dup(update.fd)))
        except Exception as exc:  # a bug must cost this update, never the master
            diag.exception("certificate %s not swapped in: %s", update.label, exc)
        finally:
            os.close(update.fd)
        self._write_status()

    def _drop_backlog(self, pid: int, key: str) -> None:
        kept = []
        for entry in self._cert_backlog:
            if entry[0] == pid and entry[1] == key:
                os.close(entry[2])
            else:
                kept.append(entry)
        self._cert_backlog = kept

    def _certificate_status(self, gen: Generation) -> list[dict[str, Any]]:
        states = self.acme.states if self.acme is not None else {}
        out = []
        seen = set()
        for site in gen.runtime.sites.values():
            slot = site.slot
            if slot.source in seen:
                continue
            seen.add(slot.source)
            info = slot.info
            state = states.get(site.site.name, {}) if slot.kind == "acme" else {}
            out.append({
                "site": site.site.name,
                "hosts": slot.hosts,
                "source": f"{slot.stand_in} (until ACME obtains one)" if slot.temporary
                else slot.kind,
                "names": info.names if info else [],
                "issuer": info.issuer if info else "",
                "not_after": info.not_after.timestamp() if info else None,
                "next_renewal": state.get("next_renewal"),
                "last_error": state.get("last_error") or "",
            })
        return out

    # -- reload ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Everything the new config needs is built, opened and bound before anything that
        serves is touched (``self._prepare`` runs the same code as ``check``); any failure
        leaves the running generation as it was and is recorded for ``sniport reload``."""
        if self.stopping:
            return
        if self.pending is not None:
            # A reload is under way: this one runs once it has ended (queued, not lost).
            self._reload_again = True
            return
        notify("RELOADING=1")
        self._reload_started = time.monotonic()
        diag.info("reloading %s", self.config_label)
        serving = f"still serving generation {self.current.number}" if self.current else ""
        try:
            runtime: Runtime = self._prepare()
        except ConfigError as exc:
            for problem in exc.problems:
                diag.error("reload: %s", problem)
            diag.error("reload failed (%d problem(s)); still serving the previous config",
                       len(exc.problems))
            notify("READY=1")
            self._reload_done(False, f"{len(exc.problems)} problem(s) in the config; {serving}",
                              [str(p) for p in exc.problems])
            return
        except Exception as exc:  # a bug must not take the running service down
            diag.exception("reload failed: %s; still serving the previous config", exc)
            notify("READY=1")
            self._reload_done(False, f"unexpected {type(exc).__name__}: {exc}; {serving}")
            return
        for warning in runtime.warnings:
            diag.warning("%s", warning)
        self._carry_certificates(runtime)
        try:
            self._bind_metrics(runtime)
            self._bind(runtime, {})
            self.pending = self._new_generation(runtime)
        except (BindError, SpawnError) as exc:
            self._drop_pending_metrics()
            if not any(g.runtime is runtime for g in self.generations):
                runtime.close()
            self._close_unused()
            if self.current is not None:
                self._tune(self.current.runtime)  # as the generation still serving wants
            diag.error("reload failed: %s; still serving the previous config", exc)
            notify("READY=1")
            self._reload_done(False, f"{exc}; {serving}")
            return

    def _reload_done(self, ok: bool, result: str, problems: list[str] | None = None) -> None:
        self._reloads["ok" if ok else "failed"] += 1
        self.last_reload = ReloadOutcome(self._reload_started, time.time(), ok, result,
                                         problems or [])
        self._write_status()

    def _close_unused(self) -> None:
        used = {k for g in self.generations for k in g.keys}
        if self.pending is not None:
            used.update(self.pending.keys)
        for key in list(self.listeners):
            if key not in used:
                diag.info("listener %s closed (no longer in the config)", key)
                self.listeners.pop(key).close()

    # -- stop -----------------------------------------------------------------------------

    def stop(self, fast: bool) -> None:
        mode = "fast" if fast else "graceful"
        if self.stopping == mode or self.stopping == "fast":
            return
        self.stopping = mode
        notify("STOPPING=1")
        drain = self.current.runtime.loaded.config.server.drain_timeout if self.current else 0
        if fast:
            diag.info("fast stop")
            self._stop_deadline = time.monotonic() + STOP_GRACE
            self._kill_all(signal.SIGINT)
        else:
            diag.info("graceful stop: draining for up to %gs", drain)
            self._stop_deadline = time.monotonic() + drain + STOP_GRACE
            self._kill_all(signal.SIGTERM)
        for gen in self.generations:
            gen.respawn_at.clear()
        if self.acme is not None:
            self.acme.stop()
        self._write_status()

    def _cleanup(self) -> None:
        self._kill_all(signal.SIGKILL)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.acme is not None and self.acme.pid:
            _kill(self.acme.pid, signal.SIGKILL)
        for _, _, fd in self._cert_backlog:
            os.close(fd)
        for key, b in list(self.listeners.items()):
            if self._handed_over:
                b.sock.close()  # the new master serves on them: the files stay
            else:
                b.close()
            del self.listeners[key]
        if self.pid_file is not None and not self._handed_over:
            for path in (self.pid_file, self.status_file):
                if path is not None and _owned_pid_file(path):
                    with contextlib.suppress(OSError):
                        path.unlink()
        for gen in self.generations:
            gen.runtime.close()
        diag.info("stopped")

    # -- upgrade --------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Exec a new master (the installed sniport, possibly a newer one) that inherits the
        listening sockets; we drain and exit when it tells us it serves."""
        if self._upgrade_child or self.stopping:
            return
        self._set_inheritable(True)
        spec = ",".join(f"{b.sock.fileno()}={key}" for key, b in self.listeners.items())
        env = dict(os.environ, **{INHERIT_ENV: spec, PARENT_ENV: str(os.getpid())})
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.execve(sys.executable, [sys.executable, "-m", "sniport", *self._argv], env)
            finally:
                os._exit(127)
        self._upgrade_child = pid
        diag.info("upgrade: new master %d started", pid)

    def _set_inheritable(self, value: bool) -> None:
        for b in self.listeners.values():
            os.set_inheritable(b.sock.fileno(), value)

    # -- pid and status files ---------------------------------------------------------------

    def _write_pid(self) -> None:
        if self.pid_file is None:
            return
        try:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.pid_file, f"{os.getpid()}\n")
        except OSError as exc:
            diag.warning("pid file %s: %s", self.pid_file, exc.strerror)

    def _write_status(self) -> None:
        if (self.status_file is None or self._handed_over
                or (self.current is None and self.pending is None)):
            return  # after a hand-over, the status file is the new master's
        gen = self.current or self.pending
        assert gen is not None
        status = {
            "pid": os.getpid(),
            "version": __version__,
            "config": gen.runtime.loaded.source,
            "loaded_at": gen.loaded_at,
            "generation": gen.number,
            "workers": sorted(gen.workers),
            "draining_workers": sorted(w.pid for g in self.generations if g.draining
                                       for w in g.workers.values()),
            "listeners": [str(self.listeners[k].address) for k in gen.keys
                          if k in self.listeners],
            "stopping": self.stopping,
            "last_reload": asdict(self.last_reload) if self.last_reload else None,
            "certificates": self._certificate_status(gen),
        }
        with contextlib.suppress(OSError):
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.status_file, json.dumps(status, indent=1) + "\n")


# -- helpers ------------------------------------------------------------------------------


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exit_cause(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status)
    return "exit 0" if code == 0 else f"exit code {code}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _owned_pid_file(path: Path) -> bool:
    """The pid file (or status file) names this process, not a successor."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if path.suffix == ".json":
        try:
            return bool(json.loads(text).get("pid") == os.getpid())
        except ValueError:
            return False
    return text.strip() == str(os.getpid())


def _sock_key(sock: Any) -> str:
    import socket

    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            return f"unix:@{name[1:].decode(errors='replace')}" if name[:1] == b"\0" else \
                f"unix:{name.decode()}"
        return f"unix:{name}" if name else "unix:"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_pid(pid_file: Path) -> int:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise StartError(f"no running sniport found: cannot read {pid_file}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise StartError(f"no running sniport: {pid_file} names pid {pid}, which is gone") \
            from None
    except PermissionError:
        pass
    return pid


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False

