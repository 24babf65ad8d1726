"""Machinery for the operations end-to-end tests (tests/test_ops_*.py).

Builds on helpers.py (certificates, TLS backends): a sniport master run as a real process in
its own session, whose stderr a thread reads line by line so that nothing it writes can block
it and every log line can be waited for; an ``Ops`` runner that kills every process it
started, workers and upgraded masters included, when a test ends (passed or not); a small
HTTP/1.1-over-TLS client (TCP or unix socket) that knows whether its connection was reused;
passthrough clients; a bounded multi-threaded load that counts every request and failure;
readers for /proc (parent, uid, state, open files) and for the JSON access log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from helpers import Pki, TlsBackend, start_tls_backend

TIMEOUT = 10.0  # seconds: the upper bound of every single wait in these tests
PYTHON = sys.executable
SNIPORT_BIN = str(Path(PYTHON).parent / "sniport")  # the installed console script
SITE_HOST = "site.test"
PT_HOST = "pt.test"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def free_port() -> int:
    """A TCP port that was free a moment ago, for configs that must reuse the same port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_unix_path(path: Path) -> str:
    text = str(path)
    assert len(text.encode()) <= UNIX_PATH_MAX, f"unix socket path too long: {text}"
    return text


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Configs


def config_text(*, state_dir: Path, listen: Sequence[str], cert: tuple[Path, Path],
                body: str = "v1", workers: int = 1, drain_timeout: str = "2s",
                access_log: str | Path = "off", backend_port: int | None = None,
                server_extra: str = "", extra: str = "") -> str:
    """A config with one terminated site (``site.test``, ``respond`` with ``body``) and,
    with ``backend_port``, one passthrough block (``pt.test``) to 127.0.0.1:backend_port."""
    lines = [
        "[server]",
        f"listen = {json.dumps(list(listen))}",
        f"workers = {workers}",
        f"drain_timeout = {json.dumps(drain_timeout)}",
        f"state_dir = {json.dumps(str(state_dir))}",
        f"access_log = {json.dumps(str(access_log))}",
        'log_format = "json"',
        server_extra,
        "",
    ]
    if backend_port is not None:
        lines += [
            "[[passthrough]]",
            'name = "pt"',
            f'hosts = ["{PT_HOST}"]',
            f'upstreams = ["127.0.0.1:{backend_port}"]',
            "",
        ]
    lines += [
        "[[site]]",
        'name = "site"',
        f'hosts = ["{SITE_HOST}"]',
        f"tls = {{ cert = {json.dumps(str(cert[0]))}, key = {json.dumps(str(cert[1]))} }}",
        "  [[site.route]]",
        '  path = "/"',
        f"  respond = {{ status = 200, body = {json.dumps(body)} }}",
        "",
        extra,
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Processes


class LogReader:
    """Reads a process's stderr on a thread, line by line, until EOF."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lines: list[str] = []
        self._partial = b""
        self._cond = threading.Condition()
        self.eof = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    if self._partial:
                        self._lines.append(self._partial.decode(errors="replace"))
                    self.eof = True
                    self._cond.notify_all()
                    return
                data = self._partial + chunk
                *complete, self._partial = data.split(b"\n")
                self._lines.extend(c.decode(errors="replace") for c in complete)
                self._cond.notify_all()

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines() if rx.search(line))

    def wait(self, pattern: str, timeout: float = TIMEOUT, start: int = 0
             ) -> tuple[int, re.Match[str]]:
        """The first line at index >= ``start`` matching ``pattern``: (index, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._lines):
                    m = rx.search(self._lines[i])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    break
                self._cond.wait(min(left, 0.2))
        raise TimeoutError(f"no log line matching {pattern!r} within {timeout:g}s "
                           f"(eof={self.eof}); log:\n{self.text()}")

    def wait_eof(self, timeout: float = TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"stderr still open after {timeout:g}s")


@dataclass
class Master:
    """A ``sniport run`` process (the master) started by ``Ops``."""

    proc: subprocess.Popen[bytes]
    config: Path
    state_dir: Path
    log: LogReader
    addresses: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "sniport.pid"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "sniport.status.json"

    @property
    def port(self) -> int:
        for a in self.addresses:
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        raise LookupError(f"no TCP listener in {self.addresses}")

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.status_file.read_text()))

    def workers(self) -> list[int]:
        return [int(p) for p in self.status()["workers"]]

    def wait_generation(self, generation: int, timeout: float = TIMEOUT) -> list[int]:
        """Until the status file shows ``generation`` (it is written just after the
        "reloaded" line); its workers."""
        def shown() -> bool:
            try:
                return bool(self.status()["generation"] == generation)
            except (OSError, ValueError, KeyError):
                return False

        wait_until(shown, timeout, f"generation {generation} in {self.status_file}")
        return self.workers()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_log(self, pattern: str, timeout: float = TIMEOUT, start: int = 0
                 ) -> tuple[int, re.Match[str]]:
        return self.log.wait(pattern, timeout, start)

    def mark(self) -> int:
        """The index of the next log line, to wait for lines after this point."""
        return len(self.log.lines())

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"master {self.pid} still running after {timeout:g}s; log:\n"
                               f"{self.log.text()}") from None

    def reload(self, *, via_cli: bool) -> None:
        if via_cli:
            r = run_cli("reload", "-c", str(self.config))
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith(f"reload signalled to master {self.pid}"), r.stdout
        else:
            self.signal(signal.SIGHUP)

    def stop_cli(self, timeout: float = TIMEOUT) -> tuple[int, subprocess.CompletedProcess[str]]:
        """``sniport stop -c FILE`` while this test reaps the master (the CLI waits for the
        pid to disappear, and a child of ours stays a zombie until we wait for it)."""
        cli = subprocess.Popen([SNIPORT_BIN, "stop", "-c", str(self.config),
                                "--timeout", str(timeout)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            code = self.wait_exit(timeout)
            out, err = cli.communicate(timeout=timeout)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        return code, subprocess.CompletedProcess(cli.args, cli.returncode, out, err)


MARKER_VAR = "SNIPORT_OPS_TEST"  # in the environment of every process a test starts


class Ops:
    """Starts sniport processes for one test and kills all of them at the end, passed or
    not: each runs in its own session, and carries a marker in its environment that its
    workers and any master it execs inherit, so that the end of the test finds them all
    (and nothing else: pids are never killed by number alone on this shared machine)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.marker = f"{MARKER_VAR}={uuid.uuid4().hex}".encode()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()  # worker and master pids seen, for the tests' records
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Ops:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def marked(self) -> list[int]:
        """Live processes started by this test (or forked/exec'd by them)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if self.marker in environ.split(b"\0"):
                out.append(int(entry.name))
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:  # not reaped: its pid (and group id) are still ours
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for _ in range(3):
            left = [p for p in self.marked() if alive(p)]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        full = dict(os.environ if env is None else env)
        key, _, value = self.marker.decode().partition("=")
        full[key] = value
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd=self.tmp, start_new_session=True,
                                env=full)
        self.procs.append(proc)
        return proc

    def write_config(self, text: str, name: str = "sniport.toml") -> Path:
        path = self.tmp / name
        atomic_write(path, text)
        return path

    def start(self, config: Path, *, env: Mapping[str, str] | None = None,
              prefix: Sequence[str] = (), serving: bool = True,
              timeout: float = TIMEOUT) -> Master:
        """``python -m sniport run -c config``; with ``serving``, wait for the serving line."""
        state = self.state_dir_of(config)
        proc = self.spawn([*prefix, PYTHON, "-m", "sniport", "run", "-c", str(config)], env=env)
        assert proc.stderr is not None
        master = Master(proc, config, state, LogReader(proc.stderr.fileno()))
        if serving:
            _, m = master.wait_log(r"serving \S+ on ([^\n]+)", timeout)
            master.addresses = [a.strip() for a in m.group(1).split(",")]
            # The pid and status files are written just after the serving line.
            wait_until(lambda: _names(master.status_file, master.pid), timeout,
                       f"{master.status_file} naming the master {master.pid}")
            self.pids.update(master.workers())
        return master

    @staticmethod
    def state_dir_of(config: Path) -> Path:
        m = re.search(r'(?m)^state_dir = "([^"]*)"', config.read_text())
        assert m, "every ops config sets state_dir"
        return Path(m.group(1))

    def track_workers(self, master: Master) -> list[int]:
        pids = master.workers()
        self.pids.update(pids)
        return pids


def _names(status_file: Path, pid: int) -> bool:
    try:
        return bool(json.loads(status_file.read_text()).get("pid") == pid)
    except (OSError, ValueError):
        return False


def run_cli(*args: str, timeout: float = TIMEOUT, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SNIPORT_BIN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


# /proc readers -------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, Z...), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie waiting for a parent to reap it."""
    return proc_state(pid) not in (None, "Z", "X")


def wait_gone(pids: Sequence[int], timeout: float = TIMEOUT) -> float:
    """Wait until none of ``pids`` runs; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout:g}s: "
                               f"{[p for p in pids if alive(p)]}")
        time.sleep(0.02)
    return time.monotonic() - start


def status_field(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.split()
    raise KeyError(name)


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid."""
    return [int(v) for v in status_field(pid, "Uid")]


def gids(pid: int) -> list[int]:
    return [int(v) for v in status_field(pid, "Gid")]


def ppid(pid: int) -> int:
    return int(status_field(pid, "PPid")[0])


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def open_paths(pid: int) -> list[str]:
    """What the descriptors of ``pid`` point at (files show their current path)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.append(os.readlink(fd))
    return out


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition"
               ) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# Clients


class StaleConnection(Exception):
    """A reused keep-alive connection was closed before any byte of the response came: the
    race every HTTP/1.1 client must handle by retrying (RFC 9112 section 9.3.1.1)."""


class ServerClosed(Exception):
    """The connection ended before a whole response arrived."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def connect(ctx: ssl.SSLContext, *, port: int | None = None, unix: str | None = None,
            server_name: str = SITE_HOST, timeout: float = TIMEOUT) -> ssl.SSLSocket:
    """A TLS connection through sniport over TCP (127.0.0.1:port) or a unix socket."""
    if unix is not None:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(timeout)
        try:
            raw.connect(unix)
        except OSError:
            raw.close()
            raise
    else:
        assert port is not None
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


class HttpsClient:
    """HTTP/1.1 over one TLS connection at a time; reconnects when the server closes."""

    def __init__(self, ctx: ssl.SSLContext, *, port: int | None = None,
                 unix: str | None = None, host: str = SITE_HOST,
                 timeout: float = TIMEOUT) -> None:
        self.ctx, self.port, self.unix, self.host, self.timeout = ctx, port, unix, host, timeout
        self.sock: ssl.SSLSocket | None = None
        self.used = 0  # requests answered on the current connection
        self.connections = 0
        self._buf = bytearray()
        self._got = 0  # bytes received for the request in progress
        self.local = ""  # the client address of the current connection, as sniport logs it

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.used = 0
        self._buf.clear()

    def request(self, path: str = "/", *, close: bool = False) -> Response:
        if self.sock is None:
            self.sock = connect(self.ctx, port=self.port, unix=self.unix, timeout=self.timeout)
            self.connections += 1
            name = self.sock.getsockname()
            self.local = f"127.0.0.1:{name[1]}" if isinstance(name, tuple) else "unix"
        reused = self.used > 0
        head = (f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n").encode()
        self._got = 0
        try:
            self.sock.sendall(head)
            resp = self._read()
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ServerClosed,
                ssl.SSLZeroReturnError) as exc:
            got = self._got
            self.close()
            if reused and got == 0:
                raise StaleConnection(str(exc) or type(exc).__name__) from None
            raise ServerClosed(f"{type(exc).__name__}: {exc} after {got} bytes "
                               f"(client {self.local}, request {self.used + 1} on it)"
                               ) from None
        self.used += 1
        if close or resp.headers.get("connection", "").lower() == "close":
            self.close()
        return resp

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ServerClosed(f"EOF with {len(self._buf)} bytes unparsed")
        self._got += len(chunk)
        self._buf += chunk

    def _read(self) -> Response:
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        end = self._buf.index(b"\r\n\r\n")
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buf) < length:
            try:
                self._fill()
            except ServerClosed:
                raise ServerClosed(f"body cut: {len(self._buf)} of {length} bytes") from None
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return Response(status, headers, body)


class HeldHandshake:
    """A TLS client driven by hand (MemoryBIO): ``start()`` sends the ClientHello and reads
    the server's flight, holding back the client's last flight (its Finished), so that the
    server is in the middle of the handshake until ``request()`` sends it with a request."""

    def __init__(self, ctx: ssl.SSLContext, port: int, server_name: str = SITE_HOST) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.local = f"127.0.0.1:{self.raw.getsockname()[1]}"
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.held = b""
        self._hello_rest = b""

    def start(self, *, partial_hello: bool = False) -> None:
        """Send the ClientHello and read the server's flight; with ``partial_hello``, send
        only the hello's first 10 bytes (``finish_hello()`` does the rest)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self.outgoing.read()
        if partial_hello:
            self.raw.sendall(hello[:10])
            self._hello_rest = hello[10:]
            return
        self.raw.sendall(hello)
        self._server_flight()

    def finish_hello(self) -> None:
        self.raw.sendall(self._hello_rest)
        self._server_flight()

    def _server_flight(self) -> None:
        while True:
            data = self.raw.recv(65536)
            if not data:
                raise ServerClosed("closed during the handshake")
            self.incoming.write(data)
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        self.held = self.outgoing.read()  # the client's Finished, not sent yet
        assert self.held, "nothing held back: the handshake did not wait for the client"

    def send(self, head: bytes) -> None:
        """Send the held flight (if any) and ``head``, a request."""
        self.tls.write(head)
        self.raw.sendall(self.held + self.outgoing.read())
        self.held = b""

    def response(self, linger: float = 0.5) -> tuple[bytes, bool]:
        """The bytes of one response (head and Content-Length body; b"" if the server
        closed first), and whether the server closed the connection within ``linger``
        seconds after it."""
        out = b""
        closed = False
        deadline = time.monotonic() + TIMEOUT
        while not closed:
            complete = b"\r\n\r\n" in out
            if complete:
                head, _, body = out.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                complete = m is not None and len(body) >= int(m.group(1))
            wait = linger if complete else deadline - time.monotonic()
            if wait <= 0:
                break
            self.raw.settimeout(wait)
            try:
                data = self.raw.recv(65536)
            except TimeoutError:
                if complete:
                    break
                raise
            except ConnectionResetError:
                data = b""
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()
                closed = True
            try:
                while True:
                    chunk = self.tls.read(65536)
                    if not chunk:
                        closed = True
                        break
                    out += chunk
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                closed = True
        self.raw.settimeout(TIMEOUT)
        return out, closed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.raw.close()


def get_body(ctx: ssl.SSLContext, *, port: int | None = None, unix: str | None = None,
             path: str = "/") -> bytes:
    """One request on a new connection; the body of a 200 answer (else AssertionError)."""
    client = HttpsClient(ctx, port=port, unix=unix)
    try:
        resp = client.request(path, close=True)
    finally:
        client.close()
    assert resp.status == 200, resp
    return resp.body


def pt_who(ctx: ssl.SSLContext, port: int, timeout: float = TIMEOUT) -> str:
    """A passthrough connection to pt.test: the backend answers WHO with its name."""
    with connect(ctx, port=port, server_name=PT_HOST, timeout=timeout) as tls:
        tls.sendall(b"WHO")
        out = b""
        while True:
            chunk = tls.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.decode()


class Stream:
    """A long-lived passthrough connection to the echo backend."""

    def __init__(self, ctx: ssl.SSLContext, port: int, timeout: float = TIMEOUT) -> None:
        self.tls = connect(ctx, port=port, server_name=PT_HOST, timeout=timeout)
        self.local_port = int(self.tls.getsockname()[1])
        self.echoes = 0

    def echo(self, data: bytes) -> bytes:
        self.tls.sendall(data)
        out = b""
        while len(out) < len(data):
            chunk = self.tls.recv(65536)
            if not chunk:
                raise ServerClosed(f"stream closed after {len(out)} of {len(data)} bytes")
            out += chunk
        self.echoes += 1
        return out

    def wait_closed(self, timeout: float) -> float:
        """Seconds until the server side ends the stream (EOF, reset or TLS close)."""
        start = time.monotonic()
        self.tls.settimeout(timeout)
        try:
            while self.tls.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            pass
        except TimeoutError:
            raise TimeoutError(f"stream still open after {timeout:g}s") from None
        return time.monotonic() - start

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()


def echo_backend(pki: Pki, ops: Ops) -> TlsBackend:
    """The passthrough target (helpers.start_tls_backend), closed at the end of the test."""
    backend = start_tls_backend(pki, PT_HOST)
    ops.closers.append(backend.close)
    return backend


# --------------------------------------------------------------------------------------------
# Access log (log_format = "json")


def access_lines(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if kind is None or entry.get("kind") == kind:
            out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# A bounded load from several threads


@dataclass
class LoadStats:
    requests: Counter[str] = field(default_factory=Counter)  # kind -> answered
    connections: Counter[str] = field(default_factory=Counter)  # kind -> opened
    stale_retries: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())


class Load:
    """Threads sending requests until ``stop()`` or ``cap`` requests each: keep-alive and
    one-request connections to the terminated site, passthrough connections of one exchange
    (WHO) and of several echoes. Every answer is checked; anything else is a failure."""

    KINDS = ("keepalive", "keepalive", "close", "close", "who", "who", "echo")
    PAUSE = 0.002  # seconds between two requests of a keep-alive thread: it idles, as browsers do

    def __init__(self, ctx: ssl.SSLContext, port: int, *, backend_name: str,
                 valid_body: Callable[[bytes], bool], cap: int = 5000) -> None:
        self.ctx, self.port, self.backend_name = ctx, port, backend_name
        self.valid_body = valid_body
        self.cap = cap
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind, i), daemon=True)
                         for i, kind in enumerate(self.KINDS)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = TIMEOUT) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            self._fail(f"load threads still running after {timeout:g}s: {stuck}")

    def _fail(self, what: str) -> None:
        with self.stats.lock:
            self.stats.failures.append(what)

    def _ok(self, kind: str, body: bytes | None = None) -> None:
        with self.stats.lock:
            self.stats.requests[kind] += 1
            if body is not None:
                self.stats.versions[body.decode(errors="replace")] += 1

    def _opened(self, kind: str) -> None:
        with self.stats.lock:
            self.stats.connections[kind] += 1

    def _run(self, kind: str, index: int) -> None:
        done = 0
        client = HttpsClient(self.ctx, port=self.port)
        stream: Stream | None = None
        try:
            while not self._stop.is_set() and done < self.cap:
                try:
                    if kind in ("keepalive", "close"):
                        self._terminated(client, kind)
                    elif kind == "who":
                        self._opened(kind)
                        name = pt_who(self.ctx, self.port)
                        if name != self.backend_name:
                            self._fail(f"who: answer {name!r}")
                        else:
                            self._ok(kind)
                    else:
                        if stream is None:
                            stream = Stream(self.ctx, self.port)
                            self._opened(kind)
                        data = f"echo {index} {done} ".encode() * 8
                        back = stream.echo(data)
                        if back != data:
                            self._fail(f"echo: {back[:60]!r} for {data[:60]!r}")
                        else:
                            self._ok(kind)
                        if stream.echoes >= 10:
                            stream.close()
                            stream = None
                    if kind == "keepalive":
                        time.sleep(self.PAUSE)
                except Exception as exc:
                    self._fail(f"{kind}#{index} request {done}: {type(exc).__name__}: {exc}")
                    client.close()
                    if stream is not None:
                        stream.close()
                        stream = None
                done += 1
        finally:
            client.close()
            if stream is not None:
                stream.close()

    def _terminated(self, client: HttpsClient, kind: str) -> None:
        before = client.connections
        if kind == "keepalive" and client.used >= 25:
            client.close()
        try:
            resp = client.request("/", close=kind == "close")
        except StaleConnection:
            with self.stats.lock:
                self.stats.stale_retries += 1
            resp = client.request("/", close=kind == "close")  # on a new connection
        if client.connections != before:
            self._opened(kind)
        if resp.status != 200 or not self.valid_body(resp.body):
            self._fail(f"{kind}: {resp.status} {resp.body[:80]!r}")
        else:
            self._ok(kind, resp.body)


def wait_requests(load: Load, more: int, timeout: float) -> None:
    """Until every kind of request of the load has been answered ``more`` more times."""
    with load.stats.lock:
        target = {k: load.stats.requests[k] + more for k in set(load.KINDS)}

    def progressed() -> bool:
        with load.stats.lock:
            return all(load.stats.requests[k] >= n for k, n in target.items())

    wait_until(progressed, timeout, f"{more} more answers of each kind (at "
               f"{dict(load.stats.requests)}, failures {load.stats.failures[:3]})")


@contextlib.contextmanager
def running_load(load: Load) -> Iterator[Load]:
    load.start()
    try:
        yield load
    finally:
        load.stop()


def report(name: str, requests: int) -> None:
    """Every operations test says how many requests it sent (issue 5 asks for it)."""
    print(f"\n[ops] {name}: {requests} requests")
