"""What talks to sniport: clients over real sockets, and real client programs.

- ``HttpConn``: one HTTP/1.1 connection (TLS or plain) that sends exactly the bytes a test
  gives it and parses the responses itself (``Response``), so that pipelining, HEAD, 1xx,
  framing and closes are all visible; ``tls_conn``, ``plain_conn``, ``fetch``.
- ``RawTls``: TLS driven by hand (``ssl.SSLObject`` + ``MemoryBIO``) over a raw socket: the
  ClientHello in the test's hands, every wire byte counted; ``make_hello``, ``resplit``.
- ``HeldHandshake``: a handshake held before the client's last flight.
- ``curl``, ``curl_site``, ``s_client``: the real programs.
- ``HttpsClient``, ``Stream``, ``get_body``, ``pt_who`` and ``Load``: the operations tests'
  clients and their bounded multi-threaded load, which counts every request and failure.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import re
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from support.configs import PT_HOST, SITE_HOST
from support.pki import Pki
from support.waiting import TIMEOUT, wait_until

# --------------------------------------------------------------------------------------------
# Reading a socket


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("short read")
        out += chunk
    return out


def recv_to_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def wait_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Read until the peer closes (EOF or reset); what came before. TimeoutError if it is
    still open after ``timeout``."""
    sock.settimeout(timeout)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while chunk := sock.recv(1 << 16):
            out += chunk
            if time.monotonic() > deadline:
                raise TimeoutError("still open")
    except ConnectionResetError:
        pass
    return bytes(out)


def readable_within(sock: socket.socket, timeout: float) -> bool:
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


def client_label(conn: HttpConn | socket.socket) -> str:
    """How sniport's log names this client: ``ip:port`` or ``[ip6]:port``."""
    sock = conn.sock if isinstance(conn, HttpConn) else conn
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_tls(ctx: ssl.SSLContext, server_name: str | None, *, port: int | None = None,
                unix: str | None = None, timeout: float = TIMEOUT,
                nodelay: bool = False) -> ssl.SSLSocket:
    """A TLS connection to sniport over TCP (127.0.0.1:port) or a unix socket, handshake
    done; ``nodelay`` turns Nagle off (TCP)."""
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
        if nodelay:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


# --------------------------------------------------------------------------------------------
# Responses and a raw HTTP/1.1 client


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


def parse_head(raw: bytes) -> Response:
    """A response head (status line, fields, the blank line) -> Response without a body."""
    lines = raw.rstrip(b"\r\n").split(b"\r\n")
    version, status, *rest = lines[0].decode("latin-1").split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    return Response(int(status), rest[0] if rest else "", version, headers, raw_head=raw)


class PeerClosed(Exception):
    """The server closed (or reset) the connection before a whole response arrived."""


class HttpConn:
    """One client connection: ``send`` exact bytes, ``response()`` parses the next answer."""

    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self.buf = bytearray()
        self.eof = False
        self.received = 0  # bytes read from the socket so far

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        if self.eof:
            raise PeerClosed(f"closed; {len(self.buf)} bytes unparsed: {bytes(self.buf[:200])!r}")
        try:
            chunk = self.sock.recv(1 << 18)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise PeerClosed(f"closed; {len(self.buf)} bytes unparsed: {bytes(self.buf[:200])!r}")
        self.received += len(chunk)
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            self._fill()

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def head(self) -> Response:
        """The next response head (a 1xx included), without its body."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        raw = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        return parse_head(raw)

    def response(self, *, method: str = "GET", skip_1xx: bool = True) -> Response:
        """The next response, body included, framed as RFC 9112 section 6.3 says."""
        while True:
            resp = self.head()
            if not (skip_1xx and 100 <= resp.status < 200):
                break
        if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            return resp
        te = resp.header("Transfer-Encoding")
        if te is not None and "chunked" in te.lower():
            body = bytearray()
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                body += self._exactly(size)
                assert self._line() == b"", "a chunk must end with CRLF"
            resp.body = bytes(body)
        elif resp.header("Content-Length") is not None:
            resp.body = self._exactly(int(resp.header("Content-Length") or 0))
        else:
            resp.body = self.read_to_close()
        return resp

    def read_to_close(self) -> bytes:
        with contextlib.suppress(PeerClosed):
            while True:
                self._fill()
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def closed_within(self, timeout: float) -> bool:
        """True when the server closes (EOF, close_notify or reset) within ``timeout`` and
        sends nothing else first; False when the connection is still open then."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    return False
            try:
                self._fill()
            except PeerClosed:
                assert not self.buf, f"unexpected bytes before the close: {bytes(self.buf)!r}"
                return True
            except (TimeoutError, ssl.SSLWantReadError):
                continue

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> HttpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_bytes(target: str, host: str | None, *, method: str = "GET",
                  headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                  version: str = "HTTP/1.1") -> bytes:
    """A request exactly as given: the target is not normalised or encoded."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def tls_conn(port: int, sni: str, ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> HttpConn:
    return HttpConn(connect_tls(ctx, sni, port=port, timeout=timeout, nodelay=True), timeout)


def plain_conn(port: int, timeout: float = TIMEOUT, host: str = "127.0.0.1") -> HttpConn:
    raw = socket.create_connection((host, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return HttpConn(raw, timeout)


def fetch(port: int, sni: str, ctx: ssl.SSLContext, target: str, *, host: str | None = None,
          method: str = "GET", headers: Sequence[tuple[str, str]] = (),
          body: bytes = b"") -> Response:
    """One request on a new TLS connection; Host defaults to the SNI."""
    with tls_conn(port, sni, ctx) as c:
        c.send(request_bytes(target, sni if host is None else host, method=method,
                             headers=headers, body=body))
        return c.response(method=method)


def http_client(port: int, ctx: ssl.SSLContext, host: str, timeout: float = TIMEOUT
                ) -> http.client.HTTPSConnection:
    """http.client to ``host`` on 127.0.0.1:port (connected already: no name lookup)."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sock = ctx.wrap_socket(raw, server_hostname=host)
    return conn


# --------------------------------------------------------------------------------------------
# TLS by hand over a raw socket, with the ClientHello in the test's hands


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
        """Over TCP to ``(host, port)`` (from ``source`` if given) or to a unix path."""
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

    def ask_who(self) -> bytes:
        """Ask the TLS backend its name (``WHO``); its answer, read to the end; then close."""
        self.write(b"WHO")
        answer = self.read_to_eof()
        self.close()
        return answer

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


def alpn_padded_context(pki: Pki, hello_size: int) -> ssl.SSLContext:
    """A client context whose ClientHello is exactly ``hello_size`` record bytes, grown with
    ALPN protocol names (a real, valid hello that a TLS server accepts)."""

    def context(names: list[str]) -> ssl.SSLContext:
        return pki.client_context(alpn=names)

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


# --------------------------------------------------------------------------------------------
# Real clients


def curl(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """curl over HTTP/1.1 unless ``--http2`` is among ``args``: the tests written for HTTP/1.1
    (before sites offered h2 in ALPN) keep testing HTTP/1.1."""
    version = () if any(a.startswith("--http2") for a in args) else ("--http1.1",)
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *version, *args],
                          capture_output=True, timeout=timeout + 5)


def curl_site(pki: Pki, port: int, host: str, path: str, *extra: str,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """curl https://HOST:PORT/PATH against 127.0.0.1, verifying with the test CA."""
    return curl("--resolve", f"{host}:{port}:127.0.0.1", "--cacert", str(pki.ca_file),
                *extra, f"https://{host}:{port}{path}", timeout=timeout)


def split_curl_output(out: bytes) -> tuple[Response, bytes]:
    """``curl -D - -o -`` output (one response): (head, body)."""
    head, _, body = out.partition(b"\r\n\r\n")
    return parse_head(head + b"\r\n\r\n"), body


def s_client(port: int, *args: str, stdin: bytes = b"",
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                          input=stdin, capture_output=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# The operations tests' clients


class StaleConnection(Exception):
    """A reused keep-alive connection was closed before any byte of the response came: the
    race every HTTP/1.1 client must handle by retrying (RFC 9112 section 9.3.1.1)."""


class HttpsClient:
    """GETs over one TLS connection at a time (TCP or unix); reconnects when the server
    closes."""

    def __init__(self, ctx: ssl.SSLContext, *, port: int | None = None,
                 unix: str | None = None, host: str = SITE_HOST,
                 timeout: float = TIMEOUT) -> None:
        self.ctx, self.port, self.unix, self.host, self.timeout = ctx, port, unix, host, timeout
        self.conn: HttpConn | None = None
        self.used = 0  # requests answered on the current connection
        self.connections = 0
        self.local = ""  # the client address of the current connection, as sniport logs it

    @property
    def sock(self) -> socket.socket | None:
        """The current connection's socket, if one is open."""
        return None if self.conn is None else self.conn.sock

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.used = 0

    def request(self, path: str = "/", *, close: bool = False) -> Response:
        if self.conn is None:
            self.conn = HttpConn(connect_tls(self.ctx, self.host, port=self.port,
                                             unix=self.unix, timeout=self.timeout),
                                 self.timeout)
            self.connections += 1
            name = self.conn.sock.getsockname()
            self.local = f"127.0.0.1:{name[1]}" if isinstance(name, tuple) else "unix"
        conn = self.conn
        reused = self.used > 0
        before = conn.received
        try:
            conn.send(request_bytes(path, self.host,
                                    headers=[("Connection", "close")] if close else []))
            resp = conn.response()
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, PeerClosed,
                ssl.SSLZeroReturnError) as exc:
            got = conn.received - before
            self.close()
            if reused and got == 0:
                raise StaleConnection(str(exc) or type(exc).__name__) from None
            raise PeerClosed(f"{type(exc).__name__}: {exc} after {got} bytes "
                             f"(client {self.local}, request {self.used + 1} on it)"
                             ) from None
        self.used += 1
        if close or (resp.header("Connection") or "").lower() == "close":
            self.close()
        return resp


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
                raise PeerClosed("closed during the handshake")
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
    """A passthrough connection to PT_HOST: the backend answers WHO with its name."""
    with connect_tls(ctx, PT_HOST, port=port, timeout=timeout) as tls:
        tls.sendall(b"WHO")
        out = b""
        while True:
            chunk = tls.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.decode()


class Stream:
    """A long-lived passthrough connection to the echo backend (PT_HOST)."""

    def __init__(self, ctx: ssl.SSLContext, port: int, timeout: float = TIMEOUT) -> None:
        self.tls = connect_tls(ctx, PT_HOST, port=port, timeout=timeout)
        self.local_port = int(self.tls.getsockname()[1])
        self.echoes = 0

    def echo(self, data: bytes) -> bytes:
        self.tls.sendall(data)
        out = b""
        while len(out) < len(data):
            chunk = self.tls.recv(65536)
            if not chunk:
                raise PeerClosed(f"stream closed after {len(out)} of {len(data)} bytes")
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

    wait_until(progressed, timeout, lambda: f"{more} more answers of each kind (at "
               f"{dict(load.stats.requests)}, failures {load.stats.failures[:3]})")


@contextlib.contextmanager
def running_load(load: Load) -> Iterator[Load]:
    load.start()
    try:
        yield load
    finally:
        load.stop()


