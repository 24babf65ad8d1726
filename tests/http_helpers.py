"""Machinery for the TLS-termination and HTTP end-to-end tests (tests/test_http_*.py).

Builds on helpers.py (certificates, a sniport process): a raw HTTP/1.1 client over a real
socket (TLS or plain) that sends exactly the bytes a test gives it and parses the responses
itself, so that pipelining, HEAD, 1xx, framing and closes are all visible; a TLS client
driven by hand (MemoryBIO) for handshakes that go wrong on purpose; curl and openssl runners;
readers for sniport's connection and access log lines and for its memory and descriptors.
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
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from helpers import ROOT, Pki, Sniport, start_sniport

TIMEOUT = 10.0  # seconds: the upper bound of every single wait in these tests
PYTHON = sys.executable


# --------------------------------------------------------------------------------------------
# Starting sniport with a command prefix (setpriv) or another environment


def launch(config_text: str, tmp: Path, *, prefix: Sequence[str] = (),
           name: str = "sniport.toml", env: Mapping[str, str] | None = None) -> Sniport:
    """helpers.start_sniport, with ``prefix`` before the command (e.g. setpriv)."""
    return start_sniport(config_text, tmp, name=name, prefix=prefix, env=env)


def no_dac_override_prefix() -> list[str]:
    """As root, a server started under this prefix keeps uid 0 but loses the capabilities
    that bypass file permissions, so that a mode-000 file is unreadable to it as it would be
    to any unprivileged server. Empty when not root (permissions apply anyway)."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "sniport", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


def tcp_port(s: Sniport, index: int = 0) -> int:
    """The port of the ``index``-th listening address (listen entries, then http_listen)."""
    return int(s.addresses[index].rsplit(":", 1)[1])


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


def client_ctx(pki: Pki, *, alpn: Sequence[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_conn(port: int, sni: str, ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> HttpConn:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return HttpConn(ctx.wrap_socket(raw, server_hostname=sni), timeout)


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


# --------------------------------------------------------------------------------------------
# A TLS client by hand, for handshakes that go wrong on purpose


class RawTls:
    """TLS over a raw socket through MemoryBIOs: ``hello()`` is the first flight, unsent."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def wait_closed(sock: socket.socket, timeout: float) -> bytes:
    """Read until the peer closes (EOF or reset) or ``timeout``; raise on the timeout."""
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


# --------------------------------------------------------------------------------------------
# Real clients


def curl(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
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
# Certificates


def pem_fingerprint(pem: str | bytes) -> str:
    """SHA-256 of the first certificate in a PEM text, as hex."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    assert m, "no certificate in the PEM text"
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def peer_der(conn: HttpConn) -> bytes:
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


# --------------------------------------------------------------------------------------------
# sniport's logs and process


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_kv(rest: str) -> dict[str, str]:
    """``k=v k="quoted v"`` -> {k: v} (quoted values are JSON strings)."""
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(rest)}


def conn_lines(s: Sniport) -> list[dict[str, str]]:
    out = []
    for line in s.log().splitlines():
        m = re.match(r"\S+Z conn (.*)", line)
        if m:
            out.append(parse_kv(m.group(1)))
    return out


def wait_conn(s: Sniport, timeout: float = TIMEOUT, **match: str) -> dict[str, str]:
    """The first connection line whose fields equal ``match``."""
    deadline = time.monotonic() + timeout
    while True:
        for rec in conn_lines(s):
            if all(rec.get(k) == v for k, v in match.items()):
                return rec
        if time.monotonic() > deadline:
            raise TimeoutError(f"no conn line with {match}; log tail:\n{s.log()[-4000:]}")
        time.sleep(0.02)


def client_label(conn: HttpConn | socket.socket) -> str:
    sock = conn.sock if isinstance(conn, HttpConn) else conn
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


ACCESS = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" '
    r'sni=(?P<sni>\S+) host=(?P<host>\S+) ttfb=(?P<ttfb>\S+) total=(?P<total>\S+)'
    r'(?: note=(?P<note>"(?:[^"\\]|\\.)*"))?$'
)


def access_lines(s: Sniport) -> list[re.Match[str]]:
    return [m for line in s.log().splitlines() if (m := ACCESS.match(line))]


def wait_access(s: Sniport, request: str, timeout: float = TIMEOUT) -> re.Match[str]:
    """The first combined-format line whose request line is ``request``."""
    deadline = time.monotonic() + timeout
    while True:
        for m in access_lines(s):
            if m.group("request") == request:
                return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"no access line for {request!r}; log tail:\n{s.log()[-4000:]}")
        time.sleep(0.02)


def process_family(pid: int) -> list[int]:
    """``pid`` and its descendants (workers, should sniport fork any)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of sniport: the process and its children, from /proc."""
    total = 0
    for p in process_family(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_family(pid))


def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Files:
    """A document root being built: ``add(relpath, data)`` with a fixed mtime."""

    root: Path
    mtime: int = 1_700_000_000
    written: dict[str, bytes] = field(default_factory=dict)

    def add(self, rel: str, data: bytes | str, *, mtime: int | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        stamp = self.mtime if mtime is None else mtime
        os.utime(path, (stamp, stamp))
        self.written[rel] = data.encode() if isinstance(data, str) else data
        return path


def issue(pki: Pki, directory: Path, *names: str, rsa: bool = False) -> tuple[Path, Path]:
    """A leaf for ``names`` signed by the test CA, written under ``directory`` (not the
    shared pki dir, which other modules write the same names into): (chain, key)."""
    leaf = pki.ca.issue_cert(*names, key_type=trustme.KeyType.RSA if rsa else
                             trustme.KeyType.ECDSA)
    stem = re.sub(r"[^a-z0-9.-]", "_", names[0].lower()) + ("-rsa" if rsa else "")
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return chain, key
