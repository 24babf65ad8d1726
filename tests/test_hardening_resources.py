"""Issue 14, items 6 to 13: what a client (or an upstream) can make a worker spend, and
timeouts that count what they say.

- Item 6: clients that never read a large static file hold little worker memory each
  (responses are written 32 KiB at a time, only while the transport holds less than that).
- Item 7: an upstream whose response head never ends is a 502 at 64 KiB, not a worker that
  grows until the proxy timeout.
- Item 8: at a low RLIMIT_NOFILE, relays that stall with full pipes do not run the worker
  out of descriptors into an exception loop (100% CPU, a flood of tracebacks).
- Item 9: durations of 0 either refused by ``check`` or meaning "off" (no keep-alive, no
  idle limit), and a near-zero keep-alive timeout that does not spin the worker.
- Item 10: ``header_timeout`` runs only while the client owes bytes: thousands of pipelined
  requests through the proxy are all answered, however long that takes.
- Item 11: a silent client is held for ``client_hello_timeout`` counted from its arrival,
  not twice that (TCP_DEFER_ACCEPT's wait counted too).
- Item 12: routes that read no body (static, respond, redirect) refuse one over 1 MiB
  (413 and close) without reading it to the end; a proxy route and ``max_body_size = "0"``
  still take any size.
- Item 13: sockets that waited in the accept backlog while the worker was at
  ``max_connections`` do not get a fresh ``client_hello_timeout`` each.

Everything runs on real sockets and real TLS against ``python -m sniport``; one worker, so
that /proc figures (memory, CPU seconds) are those of the process that does the work.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.backends import App, TcpServer, WsEcho, echo_of, start_tcp_server, stopping
from support.clients import (
    HttpConn,
    PeerClosed,
    RawTls,
    Response,
    client_label,
    make_hello,
    request_bytes,
    tls_conn,
)
from support.configs import (
    passthrough_block,
    proxy_route,
    route,
    server_table,
    site_block,
    toml_lines,
)
from support.data import pattern, pattern_sha256
from support.logs import ACCESS, wait_conn
from support.pki import Pki
from support.proc import RssSampler, alive, children, cpu_seconds, raise_nofile, rss
from support.process import Sniport, SniportWith, run_cli, start_sniport
from support.waiting import TIMEOUT, wait_until

HOST = "hardening.test"
PT_HOST = "relay.hardening.test"
KIB = 1024
MIB = 1024 * 1024
BIG_FILE = 24 * MIB  # far over what socket buffers take: the rest waits in the file


def one_worker(s: Sniport) -> int:
    """The pid of the only worker of ``s`` (the configs here say ``workers = 1``)."""
    found: list[int] = []

    def forked() -> bool:
        found[:] = children(s.pid)
        return len(found) == 1

    wait_until(forked, TIMEOUT, lambda: f"one worker of {s.pid} (children: {found})")
    return found[0]


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds (user + system) ``pid`` spends during the next ``seconds``."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def reset_close(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the client vanishes, whatever it left unread."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def access_records(s: Sniport, request: str) -> list[str]:
    """sniport's request lines (combined format, ``upstream=`` and ``note=`` allowed) for the
    request line ``request``."""
    out = []
    for line in s.log().splitlines():
        m = ACCESS.match(line) or _ACCESS_UPSTREAM.match(line)
        if m and m.group("request") == request:
            out.append(line)
    return out


# ACCESS with the proxy's ``upstream=`` between ``total=`` and ``note=``.
_ACCESS_UPSTREAM = re.compile(
    r'^\S+ - - \[[^\]]+\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'.* upstream=\S+(?: note=(?P<note>"(?:[^"\\]|\\.)*"))?$'
)


# --------------------------------------------------------------------------------------------
# An upstream whose response head never ends (item 7)


@dataclass
class EndlessHead:
    """A plain TCP upstream that reads a request head, answers ``HTTP/1.1 200 OK`` and a
    header ``X:`` whose value never ends, until the proxy closes the connection."""

    server: TcpServer
    sent: list[int] = field(default_factory=list)  # per connection, bytes sent in all
    ended: list[float] = field(default_factory=list)  # when the proxy cut each connection

    @property
    def url(self) -> str:
        return f"http://{self.server.address}"

    def close(self) -> None:
        self.server.close()


def start_endless_head() -> EndlessHead:
    holder: list[EndlessHead] = []

    def handler(server: TcpServer, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        sent = 0
        piece = b"a" * 65536
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX: ")
            while sent < 1 << 30:  # a bound for the test's sake: 1 GiB of one header
                conn.sendall(piece)
                sent += len(piece)
        except OSError:
            holder[0].ended.append(time.monotonic())
        finally:
            holder[0].sent.append(sent)

    endless = EndlessHead(start_tcp_server(handler))
    holder.append(endless)
    return endless


# --------------------------------------------------------------------------------------------
# The terminated site most tests share: one worker, header_timeout 1 s


@dataclass
class Site:
    s: Sniport
    pki: Pki
    worker: int
    app: App
    endless: EndlessHead

    @property
    def port(self) -> int:
        return self.s.port

    def conn(self, timeout: float = TIMEOUT) -> HttpConn:
        return tls_conn(self.s.port, HOST, self.pki.client_context(), timeout)


@pytest.fixture(scope="module")
def site(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("hardening")
    www = tmp / "www"
    www.mkdir()
    with open(www / "big.bin", "wb") as f:
        f.truncate(BIG_FILE)  # sparse: costs no disk, reads as zeros
    (www / "small.txt").write_bytes(b"small\n")
    app = App("hardening")
    endless = start_endless_head()
    routes = (route("/files/", static={"root": www})
              + route("/open/", max_body_size="0", static={"root": www})
              + route("/respond", respond={"status": 200, "body": "responded"})
              + proxy_route("/app/", [app.url])
              + proxy_route("/bighead/", [endless.url], timeout="4s", max_fails=0))
    server = toml_lines(workers=1, header_timeout="1s", client_hello_timeout="3s",
                        state_dir=tmp / "state")
    config = (server_table(extra=server)
              + site_block("hardening", [HOST], pki.cert(HOST, directory=tmp / "certs"),
                           routes))
    with stopping([app, endless]), start_sniport(config, tmp) as s:
        yield Site(s, pki, one_worker(s), app, endless)


# --------------------------------------------------------------------------------------------
# Item 6: static sends respect backpressure


STALLED = 100  # clients that ask for BIG_FILE and never read


def test_stalled_readers_of_a_large_static_file_hold_little_memory(site: Site) -> None:
    """Issue 14 item 6. A hundred TLS clients ask for a 24 MiB static file and never read a
    byte of it. The worker may hold a little per client (its TLS state and one 32 KiB
    piece), not a few MiB of the file each: before the fix each such client held about
    2.8 MiB of worker memory (300 clients: 837 MiB), the file read and encrypted ahead of a
    reader that takes nothing."""
    raise_nofile(STALLED + 256)
    ctx = site.pki.client_context()
    target = "/files/big.bin"
    # Warm up: the file's metadata, the TLS context, a full read and an abandoned one.
    with site.conn() as c:
        c.send(request_bytes(target, HOST))
        r = c.response()
        assert (r.status, len(r.body)) == (200, BIG_FILE)
    before = rss(site.worker)
    clients: list[ssl.SSLSocket] = []
    try:
        for _ in range(STALLED):
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small receive window, set before connect so that the handshake offers it.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.settimeout(TIMEOUT)
            raw.connect(("127.0.0.1", site.port))
            tls = ctx.wrap_socket(raw, server_hostname=HOST)
            tls.sendall(request_bytes(target, HOST))
            clients.append(tls)
        # Every response is under way (its first bytes reached the client)...
        wait_until(lambda: all(select.select([c], [], [], 0)[0] for c in clients), TIMEOUT,
                   "the first bytes of every response")
        # ... and the worker has had time to fill whatever it is willing to fill.
        with RssSampler(site.worker, every=0.05) as sampler:
            time.sleep(2.0)
        grown = max(sampler.samples) - before
        per_client = grown / STALLED
        assert per_client < 600 * KIB, (
            f"{STALLED} clients that do not read a {BIG_FILE // MIB} MiB file: the worker "
            f"grew by {grown / MIB:.1f} MiB, {per_client / KIB:.0f} KiB per client")
    finally:
        for c in clients:
            reset_close(c)
    # What the worker wrote for each: socket buffers' worth, not the file read ahead.
    lines: list[str] = []

    def logged() -> bool:
        lines[:] = access_records(site.s, f"GET {target} HTTP/1.1")
        return len(lines) >= STALLED + 1

    wait_until(logged, TIMEOUT, lambda: f"{STALLED + 1} access lines for {target}, "
               f"found {len(lines)}")
    sizes = [int(m.group("bytes")) for line in lines if (m := ACCESS.match(line))]
    written = sorted(n for n in sizes if n != BIG_FILE)  # the warm-up read it all
    assert len(written) == STALLED, lines[:3]
    assert written[-1] < 8 * MIB, (
        f"bytes written per stalled client: median {written[STALLED // 2] / MIB:.2f} MiB, "
        f"most {written[-1] / MIB:.2f} MiB")
