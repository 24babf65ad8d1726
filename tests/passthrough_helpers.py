"""Machinery for the passthrough end-to-end tests (tests/test_passthrough_*.py).

Builds on helpers.py: TLS backends whose certificate carries a CN (so that ``openssl s_client``
prints a subject naming the host) and whose PEM the tests compare with what a client saw;
plain TCP upstreams (echo, sink, recorder); a TLS client driven by hand over a raw socket
(``ssl.SSLObject`` + ``MemoryBIO``) that can send its ClientHello in any shape and counts every
byte on the wire; and a parser for sniport's connection log lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import resource
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from helpers import Pki, Sniport, TlsBackend, start_tls_backend

TIMEOUT = 10.0  # seconds: the upper bound of every single wait in these tests
PATTERN_BLOCK = bytes(range(256)) * 256  # what the backend's "SEND n" streams, repeated


# --------------------------------------------------------------------------------------------
# TLS backends with a subject CN and a known certificate


@dataclass
class Backend:
    """A helpers.TlsBackend whose leaf has ``CN=name``; ``pem``/``der`` are that leaf."""

    tls: TlsBackend
    name: str
    pem: str
    der: bytes
    subject: list[tuple[str, str]]  # (short name, value) in the certificate's order

    def subject_openssl(self) -> str:
        """As ``openssl s_client`` prints it: ``subject=O = x, OU = y, CN = z``."""
        return "subject=" + ", ".join(f"{k} = {v}" for k, v in self.subject)

    def subject_curl(self) -> str:
        """As ``curl -v`` prints it: ``*  subject: O=x; OU=y; CN=z``."""
        return "*  subject: " + "; ".join(f"{k}={v}" for k, v in self.subject)

    @property
    def port(self) -> int:
        return self.tls.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.tls.port}"

    def close(self) -> None:
        self.tls.close()


def start_backend(pki: Pki, name: str, *, expect_proxy: str = "off",
                  unix_path: str | None = None) -> Backend:
    tls = start_tls_backend(pki, name, expect_proxy=expect_proxy, unix_path=unix_path)
    leaf = pki.ca.issue_cert(name, common_name=name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    tls.ctx = ctx  # read per connection by helpers._serve_tls_client; none has come yet
    pem = leaf.cert_chain_pems[0].bytes().decode()
    cert = x509.load_pem_x509_certificate(pem.encode())
    short = {NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "OU"}
    subject = [(short[a.oid], str(a.value)) for a in cert.subject]
    assert ("CN", name) in subject
    return Backend(tls, name, pem, ssl.PEM_cert_to_DER_cert(pem), subject)


def client_context(pki: Pki, *, check_hostname: bool = True,
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    """Verifies the chain against the test CA always; the host name only if asked."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.check_hostname = check_hostname
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# --------------------------------------------------------------------------------------------
# Plain TCP upstreams


@dataclass
class TcpServer:
    sock: socket.socket
    port: int
    received: list[bytes] = field(default_factory=list)  # per connection, for recorders
    done: threading.Event = field(default_factory=threading.Event)
    _conns: list[socket.socket] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()


def start_tcp_server(handler: Callable[[TcpServer, socket.socket], None]) -> TcpServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = TcpServer(sock, sock.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        try:
            conn.settimeout(TIMEOUT)
            handler(server, conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            server._conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return server


def recv_to_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def echo_handler(server: TcpServer, conn: socket.socket) -> None:
    """Echo until the client's FIN, then pass the FIN back."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def sink_reply_handler(reply_size: int) -> Callable[[TcpServer, socket.socket], None]:
    """Read to EOF, then answer ``<bytes> <sha256>\\n`` and ``reply_size`` pattern bytes.

    It can only answer after the client's FIN crossed the relay: a relay that drops the
    half-close leaves it waiting, and the client never gets the reply.
    """

    def handler(server: TcpServer, conn: socket.socket) -> None:
        data = recv_to_eof(conn)
        server.received.append(data)
        conn.sendall(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())
        conn.sendall(pattern(reply_size))
        conn.shutdown(socket.SHUT_WR)
        server.done.set()

    return handler


def greeter_handler(greeting_size: int) -> Callable[[TcpServer, socket.socket], None]:
    """Send ``greeting_size`` pattern bytes and FIN first, then record what comes until EOF."""

    def handler(server: TcpServer, conn: socket.socket) -> None:
        conn.sendall(pattern(greeting_size))
        conn.shutdown(socket.SHUT_WR)
        server.received.append(recv_to_eof(conn))
        server.done.set()

    return handler


def recorder_handler(server: TcpServer, conn: socket.socket) -> None:
    server.received.append(recv_to_eof(conn))
    server.done.set()


def pattern(n: int) -> bytes:
    reps = -(-n // len(PATTERN_BLOCK))
    return (PATTERN_BLOCK * reps)[:n]


def pattern_sha256(n: int) -> str:
    """sha256 of what the backend's ``SEND n`` streams, without holding n bytes."""
    h = hashlib.sha256()
    while n > 0:
        chunk = PATTERN_BLOCK[: min(n, len(PATTERN_BLOCK))]
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, never listened, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a new SYN is dropped, so connect never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        # listen(0) queues one connection; fill it, and make sure the next one really hangs.
        for _ in range(2):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        _, writable, _ = select.select([], [fillers[1]], [], 0.3)
        assert not writable, "the kernel accepted past a full backlog: no blackhole here"
        yield port
    finally:
        for f in fillers:
            f.close()
        listener.close()


# --------------------------------------------------------------------------------------------
# A TLS client over a raw socket, with its ClientHello in the test's hands


class RawTls:
    """TLS by hand: ``hello()`` gives the first flight unsent; the test sends it as it likes
    (``send_raw``), then ``handshake()`` goes on over the same socket. Counts wire bytes."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_name: str | None) -> None:
        self.sock = sock
        sock.settimeout(TIMEOUT)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.sent = 0
        self.received = 0
        self.eof = False
        # How sniport's log names this client: "ip:port", "[ip6]:port", or "unix".
        self.label = client_label(sock) if sock.family != socket.AF_UNIX else "unix"

    @classmethod
    def connect(cls, address: str | tuple[str, int], ctx: ssl.SSLContext,
                server_name: str | None, *, source: str | None = None) -> RawTls:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=TIMEOUT,
                                            source_address=(source, 0) if source else None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, ctx, server_name)

    def hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.send_raw(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            self.eof = True
            self.incoming.write_eof()
            raise EOFError("the connection closed")
        self.received += len(data)
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def write(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def read(self, n: int = 1 << 16) -> bytes:
        """Application bytes; b"" at close_notify or at the end of the stream."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                if self.eof:
                    return b""
                try:
                    self._fill()
                except EOFError:
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def read_to_eof(self) -> bytes:
        out = bytearray()
        while chunk := self.read():
            out += chunk
        return bytes(out)

    def read_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.read(n - len(out))
            if not chunk:
                raise EOFError(f"got {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def close_clean(self) -> None:
        """close_notify, FIN, then read the raw stream to its end (every byte is counted)."""
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)
        while not self.eof:
            try:
                self._fill()
            except EOFError:
                break
        self.sock.close()

    def peer_der(self) -> bytes:
        der = self.obj.getpeercert(binary_form=True)
        assert der is not None
        return der

    def close(self) -> None:
        self.sock.close()


def make_hello(ctx: ssl.SSLContext, server_name: str | None) -> bytes:
    """A ClientHello as Python's ssl writes it, for tests on raw bytes."""
    outgoing = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def raise_if_not_one_record(data: bytes) -> None:
    if data and len(data) != 5 + int.from_bytes(data[3:5], "big"):
        raise ValueError("not exactly one TLS record")


def resplit(hello: bytes, *cuts: int) -> bytes:
    """One handshake record re-split into several records at ``cuts`` (offsets into the
    handshake message), each with the original record header's type and version."""
    raise_if_not_one_record(hello)
    head, body = hello[:3], hello[5:]
    edges = [0, *cuts, len(body)]
    assert edges == sorted(set(edges)), "cuts must be increasing and inside the message"
    return b"".join(head + struct.pack("!H", b - a) + body[a:b]
                    for a, b in itertools.pairwise(edges))


def closed_by_peer(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Wait for the peer to close; return what came before (EOF or a reset both count)."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def readable_within(sock: socket.socket, timeout: float) -> bool:
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


# --------------------------------------------------------------------------------------------
# The connection log


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
CONN_FIELDS = ["client", "listener", "sni", "alpn", "hello", "route", "upstream", "up", "down",
               "duration", "end"]


def parse_conn_line(line: str) -> dict[str, str]:
    """``... conn k=v k="quoted v"`` -> {k: v} (quoted values are JSON strings)."""
    _, _, rest = line.partition(" conn ")
    out: dict[str, str] = {}
    for key, value in _FIELD.findall(rest):
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def conn_lines(s: Sniport) -> list[dict[str, str]]:
    return [parse_conn_line(line) for line in s.log().splitlines()
            if re.match(r"\S+Z conn ", line)]


def json_conn_lines(s: Sniport) -> list[dict[str, object]]:
    out = []
    for line in s.log().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("kind") == "conn":
                out.append(rec)
    return out


def mark(s: Sniport) -> int:
    """How many connection lines are logged so far: pass as ``after`` to see only newer."""
    return len(conn_lines(s))


def wait_conn(s: Sniport, timeout: float = TIMEOUT, after: int = 0,
              **match: str) -> dict[str, str]:
    """The first connection line (from the ``after``-th on) whose fields equal ``match``,
    e.g. ``client="127.0.0.1:5"``."""
    deadline = time.monotonic() + timeout
    while True:
        for rec in conn_lines(s)[after:]:
            if all(rec.get(k) == v for k, v in match.items()):
                return rec
        if time.monotonic() > deadline:
            raise TimeoutError(f"no conn line with {match}; log:\n{s.log()}")
        time.sleep(0.02)


def wait_conn_count(s: Sniport, n: int, timeout: float = TIMEOUT, after: int = 0,
                    **match: str) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in conn_lines(s)[after:]
                 if all(r.get(k) == v for k, v in match.items())]
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} of {n} conn lines with {match}; log tail:\n"
                               f"{s.log()[-3000:]}")
        time.sleep(0.05)


def client_label(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and every live descendant (sniport's master forks its
    workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            fields = _stat(p)
            total += int(fields[11]) + int(fields[12])
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


# --------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sniport", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def alpn_padded_context(pki: Pki, hello_size: int) -> ssl.SSLContext:
    """A client context whose ClientHello is exactly ``hello_size`` record bytes, grown with
    ALPN protocol names (a real, valid hello that a TLS server accepts)."""

    def context(names: list[str]) -> ssl.SSLContext:
        ctx = client_context(pki)
        ctx.set_alpn_protocols(names)
        return ctx

    def size(names: list[str]) -> int:
        return len(make_hello(context(names), "vpn.example.com"))

    names = ["p" * 255]
    while size([*names, "p" * 255]) <= hello_size - 2:
        names.append("p" * 255)
    left = hello_size - size(names)
    if left == 1:  # a name costs at least 2 bytes (length + 1 character): borrow one
        names[-1] = "p" * 254
        left = 2
    if left:
        names.append("q" * (left - 1))
    assert size(names) == hello_size, (size(names), hello_size)
    return context(names)
