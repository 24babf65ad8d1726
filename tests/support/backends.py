"""What sniport talks to: real upstreams on 127.0.0.1 (port 0) or unix sockets, each on
threads of the test process.

- ``TlsBackend``: the passthrough target. A TLS server whose leaf has ``CN=name`` (unless
  told otherwise); it answers ``WHO`` with its name, streams ``SEND n`` pattern bytes,
  serves HTTP/1.0 GETs (curl works), echoes anything else; it can expect a PROXY header.
- ``TcpServer``: a plain TCP upstream with a handler (echo, sink, greeter, recorder).
- ``App``: an HTTP/1.1 application for the reverse proxy, recording exactly what reached it
  (see its docstring for what it answers).
- ``WsEcho``: a WebSocket echo application.
- ``free_port`` (nothing listens: refused) and ``Blackhole`` (connecting hangs).

``stopping(servers)`` stops them at the end of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from support.clients import recv_exactly, recv_to_eof
from support.configs import PT_HOST
from support.data import pattern, pattern_bytes
from support.pki import Pki
from support.process import Ops
from support.waiting import TIMEOUT


class _Stops(Protocol):
    def stop(self) -> None: ...


class _Closes(Protocol):
    def close(self) -> None: ...


@contextlib.contextmanager
def stopping(servers: Iterable[_Stops | _Closes]) -> Iterator[None]:
    """At the end of the block, stop (or close) each of ``servers``, in order."""
    try:
        yield
    finally:
        for server in servers:
            if hasattr(server, "stop"):
                server.stop()
            else:
                server.close()


# --------------------------------------------------------------------------------------------
# Ports with nothing behind them


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, never listened, closed):
    connecting to it is refused; a config that must reuse one port can listen there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Blackhole:
    """A TCP port where connecting hangs: a listener with a full accept queue (backlog 0 and
    one connection waiting, never accepted), so the kernel drops further SYNs."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port: int = self.sock.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
            raise AssertionError("the blackhole accepted a connection")
        except TimeoutError:
            pass
        finally:
            probe.close()

    def close(self) -> None:
        self.filler.close()
        self.sock.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# A TLS backend: the passthrough target


@dataclass
class TlsBackend:
    """A TLS server; ``pem``/``der`` are its leaf, ``subject`` that leaf's subject as
    (short name, value) pairs in the certificate's order."""

    name: str
    port: int
    sock: socket.socket
    ctx: ssl.SSLContext
    pem: str
    der: bytes
    subject: list[tuple[str, str]]
    connections: int = 0
    proxy_headers: list[bytes] = field(default_factory=list)
    expect_proxy: str = "off"
    host: str = "127.0.0.1"
    _stop: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def subject_openssl(self) -> str:
        """As ``openssl s_client`` prints it: ``subject=O = x, OU = y, CN = z``."""
        return "subject=" + ", ".join(f"{k} = {v}" for k, v in self.subject)

    def subject_curl(self) -> str:
        """As ``curl -v`` prints it: ``*  subject: O=x; OU=y; CN=z``."""
        return "*  subject: " + "; ".join(f"{k}={v}" for k, v in self.subject)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _read_proxy_header(raw: socket.socket, version: str) -> bytes:
    if version == "v1":
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = raw.recv(1)
            if not chunk:
                break
            data += chunk
        return data
    head = recv_exactly(raw, 16)
    length = int.from_bytes(head[14:16], "big")
    return head + recv_exactly(raw, length)


def _serve_tls_client(backend: TlsBackend, raw: socket.socket) -> None:
    try:
        raw.settimeout(30)
        if backend.expect_proxy != "off":
            backend.proxy_headers.append(_read_proxy_header(raw, backend.expect_proxy))
        with backend.ctx.wrap_socket(raw, server_side=True) as tls:
            first = tls.recv(65536)
            if first.startswith(b"GET "):
                while b"\r\n\r\n" not in first:
                    more = tls.recv(65536)
                    if not more:
                        break
                    first += more
                path = first.split(b" ", 2)[1].decode()
                body = _http_body(backend, path)
                tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                            b"\r\n" % len(body) + body)
                return
            if first.startswith(b"WHO"):
                tls.sendall(backend.name.encode())
                return
            if first.startswith(b"SEND "):
                # "SEND n": stream n bytes of the pattern (download test).
                for piece in pattern(int(first.split()[1])):
                    tls.sendall(piece)
                return
            # Echo everything until the client closes its side, then close ours.
            data = first
            while data:
                tls.sendall(data)
                data = tls.recv(65536)
            with contextlib.suppress(OSError):
                tls.unwrap()
    except (OSError, ssl.SSLError, EOFError):
        pass
    finally:
        with contextlib.suppress(OSError):
            raw.close()


def _http_body(backend: TlsBackend, path: str) -> bytes:
    if path.startswith("/bytes/"):
        return b"x" * int(path.split("/")[2])
    return f"hello from {backend.name} path={path}\n".encode()


_SHORT_NAMES = {NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O",
                NameOID.ORGANIZATIONAL_UNIT_NAME: "OU"}


def start_tls_backend(pki: Pki, name: str, *, common_name: bool = True,
                      expect_proxy: str = "off", unix_path: str | None = None,
                      host: str = "127.0.0.1", port: int = 0) -> TlsBackend:
    """A TLS backend for ``name`` (its leaf signed by the test CA, with ``CN=name`` unless
    ``common_name`` is false) on ``host:port`` (127.0.0.1:0), or on ``unix_path``;
    ``expect_proxy`` ("v1", "v2") makes it read a PROXY header before the handshake."""
    leaf = pki.ca.issue_cert(name, common_name=name if common_name else None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    pem = leaf.cert_chain_pems[0].bytes().decode()
    cert = x509.load_pem_x509_certificate(pem.encode())
    subject = [(_SHORT_NAMES[a.oid], str(a.value)) for a in cert.subject]
    assert ("CN", name) in subject or not common_name
    if unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_path)
        port = 0
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
    sock.listen(1024)
    backend = TlsBackend(name, port, sock, ctx, pem, ssl.PEM_cert_to_DER_cert(pem), subject,
                         expect_proxy=expect_proxy, host=host)

    def accept_loop() -> None:
        while not backend._stop:
            try:
                raw, _ = sock.accept()
            except OSError:
                return
            backend.connections += 1
            t = threading.Thread(target=_serve_tls_client, args=(backend, raw), daemon=True)
            t.start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return backend


def echo_backend(pki: Pki, ops: Ops, name: str = PT_HOST) -> TlsBackend:
    """The operations tests' passthrough target, closed at the end of the test."""
    backend = start_tls_backend(pki, name)
    ops.closers.append(backend.close)
    return backend


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
    """A TCP server on 127.0.0.1:0 running ``handler(server, conn)`` per connection."""
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
        conn.sendall(pattern_bytes(reply_size))
        conn.shutdown(socket.SHUT_WR)
        server.done.set()

    return handler


def greeter_handler(greeting_size: int) -> Callable[[TcpServer, socket.socket], None]:
    """Send ``greeting_size`` pattern bytes and FIN first, then record what comes until EOF."""

    def handler(server: TcpServer, conn: socket.socket) -> None:
        conn.sendall(pattern_bytes(greeting_size))
        conn.shutdown(socket.SHUT_WR)
        server.received.append(recv_to_eof(conn))
        server.done.set()

    return handler


def recorder_handler(server: TcpServer, conn: socket.socket) -> None:
    server.received.append(recv_to_eof(conn))
    server.done.set()


# --------------------------------------------------------------------------------------------
# An HTTP/1.1 application for the reverse proxy


@dataclass
class Rec:
    """One request as the upstream application parsed it."""

    app: str
    conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # names as sent, in order
    body_len: int = 0
    body_sha: str = hashlib.sha256(b"").hexdigest()
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""  # the first 64 KiB

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def get(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]

    def one(self, name: str) -> str:
        values = self.get(name)
        assert len(values) == 1, f"{name}: expected one value, got {values} in {self.headers}"
        return values[0]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def as_json(self) -> dict[str, Any]:
        return {
            "app": self.app, "conn": self.conn, "method": self.method, "target": self.target,
            "path": self.path, "query": self.query, "version": self.version,
            "headers": [list(h) for h in self.headers], "body_len": self.body_len,
            "body_sha256": self.body_sha, "chunked": self.chunked,
            "trailers": [list(t) for t in self.trailers],
        }


class _Closed(Exception):
    pass


class _Reader:
    """Buffered reads from one upstream-side socket, counting bytes for the App."""

    def __init__(self, app: App, sock: socket.socket) -> None:
        self.app = app
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise _Closed()
        with self.app.lock:
            self.app.bytes_in += len(chunk)
        self.buf += chunk

    def head(self) -> bytes | None:
        """The next request head, or None on a clean close between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > 65536:
                raise ValueError("head too large")
            try:
                self.fill()
            except _Closed:
                if self.buf:
                    raise
                return None

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            self.fill()

    def exactly(self, n: int, sink: Any) -> None:
        while n > 0:
            if not self.buf:
                self.fill()
            k = min(n, len(self.buf))
            sink(bytes(self.buf[:k]))
            del self.buf[:k]
            n -= k


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or name != name.strip():
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    return method, target, version, headers


class App:
    """A real HTTP/1.1 application, a threaded server on 127.0.0.1 (port 0), on a unix socket
    or behind TLS, parsing requests by hand so that it can record exactly what reached it:
    every connection it accepted, every byte, every request head, method, target, headers in
    their order, the body's length and sha256, chunking and trailers.

    What it answers is chosen by the request path: a path containing ``/_/`` is a command
    (``/anything/_/download/1048576/chunked``), anything else is echoed back as JSON.
    Commands:

      download/N/cl|chunked|close   N bytes of ``pattern()``, framed by length, chunks or
                                    the close
      slow/SECONDS                  wait, then echo
      hang                          never answer (until the proxy closes, or the app stops)
      interim                       100 Continue and 103 Early Hints, then echo
      die/N/cl|chunked              announce 2N bytes (or chunks), send N, then close abruptly
      stall/N                       announce 2N bytes, send N, then wait (read timeouts)
      bad/status|chunk|chunk-late|clte|extra   malformed responses (see ``_bad``)
      trailers                      a chunked response with a trailer field
      status/CODE                   that status without a body (204, 304)

    ``/healthz`` answers ``health`` (flip it between 200 and 500). A request header
    ``X-Reply-Header: Name: value`` (repeatable) makes the echo response carry it.

    ``mode``: "normal"; "close_on_accept" (accept, count, reset at once); "close_after_head"
    (read a request head, then close without answering: a crash while handling it);
    "drop_reused" (close without answering the second request of a connection, as an
    application whose keep-alive timeout just ran out would).
    """

    def __init__(self, name: str, *, unix_path: Path | None = None,
                 tls: ssl.SSLContext | None = None, mode: str = "normal",
                 strict: bool = False) -> None:
        self.name = name
        self.mode = mode
        self.strict = strict  # check each head with llhttp first, as uvicorn or Node would
        self.tls = tls
        self.lock = threading.Lock()
        self.connections = 0  # TCP (or unix) connections accepted
        self.open = 0  # connections not yet closed
        self.closed_conns: set[int] = set()  # ids of connections that ended
        self.heads = 0  # request heads parsed, bodies complete or not
        self.raw_heads: list[bytes] = []  # those heads, as received
        self.bytes_in = 0
        self.requests: list[Rec] = []
        self.snis: list[str | None] = []
        self.health = 200
        self.stopped = threading.Event()
        self._socks: set[socket.socket] = set()
        self.unix_path = unix_path
        if unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(unix_path))
            self.port = 0
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        if tls is not None:
            tls.sni_callback = self._sni
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # -- addresses, for configs -----------------------------------------------------------

    @property
    def url(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        """How sniport names this upstream in its log."""
        return self.url

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop listening (the port refuses from now on) and cut every open connection."""
        self.stopped.set()
        # shutdown() stops the listening at once and wakes the accept() of the other
        # thread; a close() alone would leave the kernel accepting until accept() returns.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(TIMEOUT)
        with contextlib.suppress(OSError):
            self.sock.close()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def _sni(self, obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        with self.lock:
            self.snis.append(name)

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                cid = self.connections
                if self.mode == "close_on_accept":
                    self.closed_conns.add(cid)
                    _reset(conn)  # at once, from this thread: the shortest possible life
                    continue
                self.open += 1
                self._socks.add(conn)
            threading.Thread(target=self._serve, args=(conn, cid), daemon=True).start()

    # -- one connection -------------------------------------------------------------------

    def _serve(self, raw: socket.socket, cid: int) -> None:
        sock: socket.socket = raw
        try:
            raw.settimeout(30)
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True)
            reader = _Reader(self, sock)
            served = 0
            while not self.stopped.is_set():
                head = reader.head()
                if head is None:
                    return
                with self.lock:
                    self.heads += 1
                    self.raw_heads.append(head)
                served += 1
                if self.mode == "drop_reused" and served == 2:
                    return
                if self.mode == "close_after_head":
                    return
                if self.strict:
                    problem = _llhttp_problem(head)
                    if problem:
                        body = f"llhttp: {problem}".encode()
                        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n"
                                     b"Connection: close\r\n\r\n" % len(body) + body)
                        return
                rec = self._read_request(reader, head, cid)
                with self.lock:
                    self.requests.append(rec)
                if not self._respond(sock, rec):
                    return
        except (OSError, ValueError, _Closed, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with self.lock:
                self.open -= 1
                self.closed_conns.add(cid)
                self._socks.discard(raw)

    def _read_request(self, reader: _Reader, head: bytes, cid: int) -> Rec:
        method, target, version, headers = _parse_head(head)
        rec = Rec(self.name, cid, method, target, version, headers)
        h = hashlib.sha256()
        kept = bytearray()
        # "?pause_at=N" (uploads): stop reading for a second once N body bytes are in, as a
        # busy application would; the proxy has to hold the client meanwhile.
        m = re.search(r"(?:^|&)pause_at=(\d+)", rec.query)
        pause_at = int(m.group(1)) if m else -1

        def sink(data: bytes) -> None:
            nonlocal pause_at
            h.update(data)
            rec.body_len += len(data)
            if len(kept) < 65536:
                kept.extend(data[:65536 - len(kept)])
            if 0 <= pause_at <= rec.body_len:
                pause_at = -1
                time.sleep(1.0)

        te = [v.lower() for k, v in headers if k.lower() == "transfer-encoding"]
        cl = [v for k, v in headers if k.lower() == "content-length"]
        if te:
            if te != ["chunked"]:
                raise ValueError(f"unexpected transfer-encoding {te}")
            rec.chunked = True
            while True:
                size = int(reader.line().split(b";")[0], 16)
                if size == 0:
                    break
                reader.exactly(size, sink)
                if reader.line() != b"":
                    raise ValueError("chunk without CRLF")
            while line := reader.line():
                name, _, value = line.decode("latin-1").partition(":")
                rec.trailers.append((name, value.strip()))
        elif cl:
            reader.exactly(int(cl[0]), sink)
        rec.body_sha = h.hexdigest()
        rec.body = bytes(kept)
        return rec

    def _respond(self, sock: socket.socket, rec: Rec) -> bool:
        """Answer ``rec``; False when the connection is to be closed afterwards."""
        if rec.path == "/healthz":
            status = self.health
            body = b"ok" if status == 200 else b"bad"
            sock.sendall(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n"
                         % (status, b"OK" if status == 200 else b"Error", len(body)) + body)
            return True
        _, marker, command = rec.path.partition("/_/")
        if not marker:
            return self._echo(sock, rec)
        cmd = command.split("/")
        kind = cmd[0]
        if kind == "download":
            return self._download(sock, int(cmd[1]), cmd[2])
        if kind == "slow":
            time.sleep(float(cmd[1]))
            return self._echo(sock, rec)
        if kind == "hang":
            # No answer, ever; the connection ends when the proxy closes it (or at stop).
            deadline = time.monotonic() + 60
            while not self.stopped.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready and not sock.recv(65536):
                    break
            return False
        if kind == "interim":
            # Interim responses before the final one (RFC 9110 section 15.2).
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            return self._echo(sock, rec)
        if kind == "die":
            n = int(cmd[1])
            if cmd[2] == "cl":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * n))
                for piece in pattern(n):
                    sock.sendall(piece)
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % n + bytes(next(pattern(n))) + b"\r\n")
            time.sleep(0.2)  # let the proxy forward what was sent before the close
            _reset(sock)
            return False
        if kind == "stall":
            n = int(cmd[1])
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * n)
                         + bytes(next(pattern(n))))
            self.stopped.wait(30)
            return False
        if kind == "bad":
            return self._bad(sock, cmd[1])
        if kind == "trailers":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Trailer: X-Checksum\r\n\r\n"
                         b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n")
            return True
        if kind == "status":
            code = int(cmd[1])
            extra = b'ETag: "v1"\r\n' if code == 304 else b""
            sock.sendall(b"HTTP/1.1 %d Status\r\nX-App: %s\r\n%s\r\n"
                         % (code, self.name.encode(), extra))
            return True
        raise ValueError(f"unknown command {command!r}")

    def _echo(self, sock: socket.socket, rec: Rec) -> bool:
        body = json.dumps(rec.as_json()).encode()
        extra = b"".join(v.encode("latin-1") + b"\r\n" for v in rec.get("X-Reply-Header"))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nX-App: %s\r\nX-Conn: %d\r\n%s\r\n"
                     % (len(body), self.name.encode(), rec.conn, extra)
                     + (b"" if rec.method == "HEAD" else body))
        return not any(v.lower() == "close" for v in rec.get("Connection"))

    def _download(self, sock: socket.socket, n: int, framing: str) -> bool:
        if framing == "cl":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % n)
            for piece in pattern(n):
                sock.sendall(piece)
            return True
        if framing == "chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            # pattern(n) cut into chunks of varied sizes (1 byte to nearly 1 MiB).
            sizes = (1, 1000, 65536, 7, (1 << 20) - 3)
            i = 0
            buf = bytearray()
            stream = pattern(n)
            left = n
            while left:
                size = min(left, sizes[i % len(sizes)])
                i += 1
                while len(buf) < size:
                    buf += next(stream)
                sock.sendall(b"%x\r\n" % size + bytes(buf[:size]) + b"\r\n")
                del buf[:size]
                left -= size
            sock.sendall(b"0\r\n\r\n")
            return True
        assert framing == "close"
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for piece in pattern(n):
            sock.sendall(piece)
        return False

    def _bad(self, sock: socket.socket, what: str) -> bool:
        """Malformed responses. The connection stays open afterwards (as far as the app is
        concerned): closing it is the proxy's job."""
        if what == "status":
            sock.sendall(b"HTTP/1.1 2x0 Fine\r\nContent-Length: 2\r\n\r\nok")
        elif what == "chunk":
            # The head and the bad chunk size in one write: the proxy sees both at once.
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"zz\r\nhello\r\n0\r\n\r\n")
        elif what == "chunk-late":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n")
            time.sleep(0.3)
            sock.sendall(b"zz\r\nhello\r\n0\r\n\r\n")
        elif what == "clte":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        elif what == "extra":
            # A complete response, then a second one nobody asked for, in one write.
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        else:
            raise ValueError(what)
        return True

    # -- what a test asks -----------------------------------------------------------------

    def snapshot(self) -> tuple[int, int, int, int]:
        """(connections, heads, complete requests, bytes received)."""
        with self.lock:
            return self.connections, self.heads, len(self.requests), self.bytes_in

    def last(self) -> Rec:
        with self.lock:
            return self.requests[-1]


def _llhttp_problem(head: bytes) -> str:
    """What llhttp (httptools: uvicorn's parser; Node.js uses the same) says about a request
    head, or "" when it accepts it."""
    import httptools

    class _Sink:
        pass

    try:
        httptools.HttpRequestParser(_Sink()).feed_data(head)
    except httptools.HttpParserUpgrade:
        return ""
    except httptools.HttpParserError as exc:
        return str(exc)
    return ""


def _reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): an application that crashed."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()



# --------------------------------------------------------------------------------------------
# A WebSocket echo application (the websockets library's own server)


class WsEcho:
    """Greets each connection with "hello from upstream", then echoes every message; the
    message "close-please" makes it close (1000, "bye"). Records the handshake request's path
    and headers and, by path (tests use a path per connection), how each connection ended."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self.closed: dict[str, int | None] = {}  # request path -> close code, once ended
        self.lock = threading.Lock()
        self.server = serve(self._handler, "127.0.0.1", 0, max_size=None,
                            ping_interval=None)
        self.port: int = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        with self.lock:
            self.requests.append((ws.request.path, list(ws.request.headers.raw_items())))
        try:
            ws.send("hello from upstream")
            for message in ws:
                if message == "close-please":
                    ws.close(1000, "bye")
                    break
                ws.send(message)
        except ConnectionClosed:
            pass
        with self.lock:
            self.closed[ws.request.path] = ws.close_code

    def stop(self) -> None:
        self.server.shutdown()


# --------------------------------------------------------------------------------------------
# What the echo says


def echo_of(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    low = name.lower()
    return [v for k, v in echo["headers"] if k.lower() == low]

