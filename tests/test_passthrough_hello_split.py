"""A ClientHello that arrives in pieces is still routed, and reaches the upstream intact.

The client side is a raw socket: Python's ssl writes the hello into a MemoryBIO, the test
sends those bytes in whatever shape it wants, then the same SSLObject finishes the handshake
over the raw socket. The upstream completing the handshake proves that no byte was lost or
doubled (the handshake transcript covers every byte of the hello); the recorder upstream
compares the bytes themselves.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from support.backends import (
    TcpServer,
    TlsBackend,
    recorder_handler,
    start_tcp_server,
    start_tls_backend,
)
from support.clients import RawTls, client_label, resplit
from support.configs import passthrough_block, passthrough_config
from support.data import DATA_DIR
from support.logs import wait_conn
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import wait_until


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[TcpServer]:
    server = start_tcp_server(recorder_handler)
    yield server
    server.close()


@pytest.fixture(scope="module")
def sniport(backend: TlsBackend, recorder: TcpServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    tmp_path = tmp_path_factory.mktemp("split")
    config = passthrough_config(
        [backend.address], listen=["127.0.0.1:0", f"unix:{tmp_path}/in.sock"],
        extra=passthrough_block("rec", ["example.test"], [recorder.address])
        + '[default]\nto = "passthrough:rec"\n')
    with start_sniport(config, tmp_path) as s:
        yield s
        assert s.proc.poll() is None, "sniport died"


def finish_and_ask(c: RawTls, backend: TlsBackend) -> None:
    """The upstream completes the handshake with what sniport relayed, and answers."""
    c.handshake()
    assert c.peer_der() == backend.der
    assert c.ask_who() == b"vpn.example.com"


@pytest.mark.parametrize("listener", ["tcp", "unix"])
def test_hello_written_in_tiny_pieces(sniport: Sniport, pki: Pki, backend: TlsBackend,
                                  listener: str) -> None:
    address: str | tuple[str, int] = (
        ("127.0.0.1", sniport.port) if listener == "tcp" else sniport.addresses[1][5:])
    c = RawTls.connect(address, pki.client_context(), "vpn.example.com")
    client = client_label(c.sock) if listener == "tcp" else "unix"
    hello = c.hello()
    assert len(hello) > 500
    # Over a unix socket every queued write is charged ~3 KiB of the sender's SO_SNDBUF and
    # nothing is consumed while sniport peeks, so after ~70 writes the client itself blocks
    # (a kernel property, not sniport's): there, 16-byte writes (33 of them).
    step = 1 if listener == "tcp" else 16
    for i in range(0, len(hello), step):
        c.send_raw(hello[i : i + step])
        time.sleep(0.001)
    finish_and_ask(c, backend)
    listener_label = (f"127.0.0.1:{sniport.port}" if listener == "tcp"
                      else sniport.addresses[1])
    rec = wait_conn(sniport, listener=listener_label, sni="vpn.example.com")
    assert (rec["client"], rec["hello"], rec["route"], rec["upstream"], rec["end"]) == (
        client, str(len(hello)), "passthrough:lan", backend.address, "eof")


@pytest.mark.parametrize("cuts", [
    (1,),  # the handshake header itself split over two records
    (3,),
    (4,),  # the first record holds only the handshake header
    (200,),
    (-1,),  # the last byte alone in a second record
    (2, 90, 300),  # four records
])
@pytest.mark.parametrize("pause", [0.0, 0.2])
def test_hello_split_over_records(sniport: Sniport, pki: Pki, backend: TlsBackend,
                                  cuts: tuple[int, ...], pause: float) -> None:
    c = RawTls.connect(("127.0.0.1", sniport.port), pki.client_context(), "vpn.example.com")
    client = client_label(c.sock)
    hello = c.hello()
    message = len(hello) - 5
    offsets = tuple(x % message for x in cuts)
    records = resplit(hello, *offsets)
    assert len(records) == len(hello) + 5 * len(offsets)
    if pause:
        # Each record in its own segment, the next one only after a pause: sniport must wait
        # for the whole *message*, not for the first record.
        start = 0
        for k, a in enumerate(offsets):
            end = 5 * (k + 1) + a  # where record k ends
            c.send_raw(records[start:end])
            start = end
            time.sleep(pause)
        c.send_raw(records[start:])
    else:
        c.send_raw(records)
    finish_and_ask(c, backend)
    rec = wait_conn(sniport, client=client)
    assert (rec["sni"], rec["hello"], rec["route"], rec["end"]) == (
        "vpn.example.com", str(len(records)), "passthrough:lan", "eof")


# The real hellos in tests/data/clienthellos (see its README): SNI and ALPN as captured.
REAL_HELLOS = {
    "chromium-156.bin": ("example.test", "h2,http/1.1"),
    "curl-7.88.1.bin": ("example.test", "h2,http/1.1"),
    "gnutls-3.7.9.bin": ("example.test", "-"),
    "node-20-tls.bin": ("example.test", "h2,http/1.1"),
    "openssl-3.0.19-s_client-nosni.bin": ("-", "-"),
    "openssl-3.0.19-s_client.bin": ("example.test", "-"),
    "python-3.11-ssl.bin": ("example.test", "h2,http/1.1"),
}


@pytest.mark.parametrize("name", sorted(REAL_HELLOS))
def test_real_hello_in_segments_reaches_upstream_byte_for_byte(sniport: Sniport,
                                                               recorder: TcpServer,
                                                               name: str) -> None:
    hello = (DATA_DIR / "clienthellos" / name).read_bytes()
    tail = b"\x14\x03\x03\x00\x01\x01" + f"after the hello of {name}".encode()
    sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = client_label(sock)
    # Segments of 1, 4 and then 100 bytes, a little apart; the tail rides with the last one.
    pieces = [hello[:1], hello[1:5]] + [hello[i : i + 100] for i in range(5, len(hello), 100)]
    for piece in pieces[:-1]:
        sock.sendall(piece)
        time.sleep(0.002)
    sock.sendall(pieces[-1] + tail)
    sock.shutdown(socket.SHUT_WR)
    expected = hello + tail
    wait_until(lambda: expected in recorder.received, timeout=10,
               what=f"the recorder to receive the {name} bytes")
    sock.close()
    rec = wait_conn(sniport, client=client)
    sni, alpn = REAL_HELLOS[name]
    assert (rec["sni"], rec["alpn"], rec["hello"], rec["route"], rec["up"], rec["end"]) == (
        sni, alpn, str(len(hello)), "passthrough:rec", str(len(expected)), "eof")
