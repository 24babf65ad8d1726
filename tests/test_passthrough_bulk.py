"""Volume: 100 MiB each way through the passthrough with the right sha256; 500 concurrent
passthrough connections all served."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import ssl
from collections.abc import Iterator

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import RawTls, client_label
from support.configs import passthrough_config
from support.data import pattern_sha256
from support.logs import wait_conn, wait_conn_count
from support.pki import Pki
from support.proc import raise_nofile
from support.process import Sniport, SniportWith
from support.waiting import TIMEOUT

BULK = 100 * 1024 * 1024


@pytest.fixture
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


@pytest.fixture
def sniport(backend: TlsBackend, sniport_with: SniportWith) -> Sniport:
    return sniport_with(passthrough_config([backend.address]))


def test_100_mib_download_sha256(sniport: Sniport, pki: Pki, backend: TlsBackend) -> None:
    c = RawTls.connect(("127.0.0.1", sniport.port), pki.client_context(), "vpn.example.com")
    client = client_label(c.sock)
    c.send_raw(c.hello())
    c.handshake()
    c.write(b"SEND %d" % BULK)
    digest = hashlib.sha256()
    n = 0
    while chunk := c.read(1 << 20):
        digest.update(chunk)
        n += len(chunk)
    assert n == BULK
    assert digest.hexdigest() == pattern_sha256(BULK)
    c.close_clean()
    rec = wait_conn(sniport, client=client)
    # Every byte on the client's wire was counted by sniport, each way.
    assert (rec["up"], rec["down"], rec["end"]) == (str(c.sent), str(c.received), "eof")
    assert c.received > BULK


def test_100_mib_upload_echoed_sha256(sniport: Sniport, pki: Pki, backend: TlsBackend) -> None:
    """The client sends 100 MiB while it reads the echo: both directions at once, each side
    flow-controlled by the other (a relay without backpressure would still pass; one that
    stalls a direction while the other is full would hang here)."""
    c = RawTls.connect(("127.0.0.1", sniport.port), pki.client_context(), "vpn.example.com")
    client = client_label(c.sock)
    c.send_raw(c.hello())
    c.handshake()
    block = os.urandom(1 << 20)
    blocks = BULK // len(block)
    sent_digest = hashlib.sha256()
    got_digest = hashlib.sha256()
    sock = c.sock
    sock.setblocking(False)
    wire_out = b""
    written = 0
    got = 0
    while got < BULK:
        if not wire_out and written < blocks:
            c.obj.write(block)
            sent_digest.update(block)
            written += 1
            wire_out = c.outgoing.read()
        readable, writable, _ = select.select([sock], [sock] if wire_out else [], [], TIMEOUT)
        assert readable or writable, f"stalled: sent {written} MiB, got {got} bytes back"
        if writable:
            try:
                n = sock.send(wire_out)
            except BlockingIOError:
                n = 0
            c.sent += n
            wire_out = wire_out[n:]
        if readable:
            data = sock.recv(1 << 20)
            assert data, f"closed after {got} bytes"
            c.received += len(data)
            c.incoming.write(data)
            while True:
                try:
                    plain = c.obj.read(1 << 20)
                except ssl.SSLWantReadError:
                    break
                got_digest.update(plain)
                got += len(plain)
        if c.outgoing.pending:
            wire_out += c.outgoing.read()
    assert got == BULK
    assert got_digest.hexdigest() == sent_digest.hexdigest()
    sock.setblocking(True)
    sock.settimeout(TIMEOUT)
    c.close_clean()
    rec = wait_conn(sniport, client=client)
    assert (rec["up"], rec["down"], rec["end"]) == (str(c.sent), str(c.received), "eof")
    assert c.sent > BULK and c.received > BULK


def test_500_concurrent_connections(sniport: Sniport, pki: Pki, backend: TlsBackend) -> None:
    """500 clients hold a finished handshake at the same time, then each asks and is answered."""
    count = 500
    raise_nofile(4 * count + 256)  # client and backend ends live in this process
    ctx = pki.client_context()

    async def main() -> list[bytes]:
        barrier = asyncio.Barrier(count)

        async def one() -> bytes:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", sniport.port, ssl=ctx, server_hostname="vpn.example.com",
                ssl_handshake_timeout=30)
            await barrier.wait()  # every handshake is done: 500 relays are open at once
            writer.write(b"WHO")
            answer = await reader.read()  # to the upstream's close
            writer.close()
            await writer.wait_closed()
            return answer

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 40)

    answers = asyncio.run(main())
    assert answers == [b"vpn.example.com"] * count
    assert backend.connections == count
    lines = wait_conn_count(sniport, count, timeout=20, route="passthrough:lan")
    assert len(lines) == count
    assert {r["end"] for r in lines} == {"eof"}
    assert {r["upstream"] for r in lines} == {backend.address}
