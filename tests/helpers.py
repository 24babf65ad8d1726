"""Shared test machinery: certificates, real TLS backends, a sniport process.

Everything here talks over real sockets on 127.0.0.1 with ports the kernel picks (port 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trustme

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


# --------------------------------------------------------------------------------------------
# Certificates


@dataclass
class Pki:
    ca: trustme.CA
    dir: Path

    def cert(self, *names: str) -> tuple[Path, Path]:
        """A leaf for ``names`` signed by the test CA: (chain PEM path, key PEM path)."""
        leaf = self.ca.issue_cert(*names)
        stem = re.sub(r"[^a-z0-9.-]", "_", names[0].lower())
        chain, key = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return chain, key

    @property
    def ca_file(self) -> Path:
        path = self.dir / "ca.pem"
        if not path.exists():
            path.write_bytes(self.ca.cert_pem.bytes())
        return path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


# --------------------------------------------------------------------------------------------
# A real TLS backend: the passthrough target. It answers "WHO" with its name, echoes
# otherwise, and serves simple HTTP/1.0 GETs so that curl and wrk-like clients work.


@dataclass
class TlsBackend:
    name: str
    port: int
    sock: socket.socket
    ctx: ssl.SSLContext
    connections: int = 0
    proxy_headers: list[bytes] = field(default_factory=list)
    expect_proxy: str = "off"
    _stop: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)

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
    head = _recv_exact(raw, 16)
    length = int.from_bytes(head[14:16], "big")
    return head + _recv_exact(raw, length)


def _recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("short read")
        out += chunk
    return out


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
                # "SEND n": stream n bytes of a fixed pattern (download test).
                n = int(first.split()[1])
                block = bytes(range(256)) * 256
                while n > 0:
                    chunk = block[: min(n, len(block))]
                    tls.sendall(chunk)
                    n -= len(chunk)
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


def start_tls_backend(pki: Pki, name: str, *, expect_proxy: str = "off",
                      unix_path: str | None = None) -> TlsBackend:
    chain, key = pki.cert(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    if unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_path)
        port = 0
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sock.listen(1024)
    backend = TlsBackend(name, port, sock, ctx, expect_proxy=expect_proxy)

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


# --------------------------------------------------------------------------------------------
# A sniport process


@dataclass
class Sniport:
    proc: subprocess.Popen[bytes]
    config: Path
    addresses: list[str]
    _log: bytearray = field(default_factory=bytearray)

    @property
    def port(self) -> int:
        """The port of the first TCP listener."""
        for a in self.addresses:
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        raise LookupError("no TCP listener")

    def log(self) -> str:
        self._drain(0)
        return self._log.decode(errors="replace")

    def _drain(self, timeout: float) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            self._log += chunk
            timeout = 0

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self._log.decode(errors="replace"))
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no log line matching {pattern!r}; log:\n{self.log()}")
            self._drain(min(left, 0.2))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain(0)
        return self.proc.returncode


def start_sniport(config_text: str, tmp: Path, *, name: str = "sniport.toml",
                  args: tuple[str, ...] = (), prefix: Sequence[str] = (),
                  env: Mapping[str, str] | None = None) -> Sniport:
    """Run ``python -m sniport run`` on ``config_text`` and wait for its "serving" line;
    ``prefix`` goes before the command (e.g. setpriv), ``env`` replaces the environment."""
    config = tmp / name
    config.write_text(config_text)
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "sniport", "run", "-c", str(config), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp,
        env=dict(env) if env is not None else None,
    )
    s = Sniport(proc, config, [])
    try:
        m = s.wait_log(r"serving \S+ on ([^\n]+)")
    except TimeoutError:
        s.stop()
        raise
    s.addresses = [a.strip() for a in m.group(1).split(",")]
    return s


# --------------------------------------------------------------------------------------------
# Clients


def tls_client(port: int, server_name: str | None, ctx: ssl.SSLContext,
               timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=server_name)


def peer_common_names(tls: ssl.SSLSocket) -> list[str]:
    cert = tls.getpeercert()
    assert cert is not None
    return [v for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(s: Sniport) -> Iterator[Sniport]:
    try:
        yield s
    finally:
        s.stop()
