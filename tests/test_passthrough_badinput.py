"""Bad input ends that one connection, with the reason in its log line, and nobody else
notices: a good client is served at the same time, promptly."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import RawTls, alpn_padded_context, client_label, make_hello, wait_closed
from support.configs import passthrough_config, toml_lines
from support.logs import wait_conn, wait_conn_count
from support.pki import Pki
from support.proc import cpu_seconds
from support.process import Sniport, SniportWith, start_sniport
from support.waiting import TIMEOUT

HELLO_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


def config(backend: TlsBackend, tmp: Path) -> str:
    return passthrough_config(
        [backend.address], listen=["127.0.0.1:0", f"unix:{tmp}/in.sock"],
        server=toml_lines(client_hello_timeout=f"{int(HELLO_TIMEOUT * 1000)}ms"),
        extra='[default]\nto = "reject"\nnon_tls = "close"\n')


@pytest.fixture(scope="module")
def shared(backend: TlsBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    """One sniport for the tests that only look at their own connection's line."""
    tmp = tmp_path_factory.mktemp("bad")
    with start_sniport(config(backend, tmp), tmp) as s:
        yield s
        assert s.proc.poll() is None, "sniport died"


@pytest.fixture
def sniport(backend: TlsBackend, tmp_path: Path, sniport_with: SniportWith) -> Iterator[Sniport]:
    """A fresh sniport for the tests that time things or measure its CPU."""
    s = sniport_with(config(backend, tmp_path))
    yield s
    assert s.proc.poll() is None, "sniport died"


def served(s: Sniport, pki: Pki, backend: TlsBackend, within: float = 1.0) -> None:
    """A good client gets its answer, quickly."""
    start = time.monotonic()
    c = RawTls.connect(("127.0.0.1", s.port), pki.client_context(), "vpn.example.com")
    c.send_raw(c.hello())
    c.handshake()
    assert c.peer_der() == backend.der
    assert c.ask_who() == b"vpn.example.com"
    took = time.monotonic() - start
    assert took < within, f"a good client took {took:.3f}s"


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


HELLO = make_hello(ssl.create_default_context(), "vpn.example.com")
RANDOM = random.Random(2026).randbytes(4096)
ALERT = b"\x15\x03\x03\x00\x02\x02\x28"

MALFORMED = {
    # record layer
    "record-version": (b"\x16\x02\x00\x00\x10" + bytes(16), "record version 2.0 is not TLS"),
    "empty-record": (b"\x16\x03\x01\x00\x00", "empty handshake record"),
    "huge-record": (b"\x16\x03\x01\x48\x01" + bytes(64), "record of 18433 bytes exceeds 2^14"),
    # a first record with only the handshake header, then an alert record
    "alert-mid-hello": (HELLO[:3] + b"\x00\x04" + HELLO[5:9] + ALERT,
                        "record type 21 before the ClientHello was complete"),
    # handshake layer
    "server-hello-type": (with_byte(HELLO, 5, 2),
                          "first handshake message has type 2, not ClientHello"),
    "long-session-id": (with_byte(HELLO, 43, 33), "session_id longer than 32 bytes"),
    "random-after-header": (b"\x16\x03\x01\x02\x00" + bytes([0x7F]) + RANDOM[:511],
                            "first handshake message has type 127, not ClientHello"),
}


def send_and_wait_close(s: Sniport, data: bytes) -> str:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
    client = client_label(sock)
    # Closed before all was sent is fine: the log line says why.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    assert wait_closed(sock) == b""
    sock.close()
    return client


@pytest.mark.parametrize(("data", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_hello_closes_that_connection(shared: Sniport, pki: Pki, backend: TlsBackend,
                                                data: bytes, reason: str) -> None:
    client = send_and_wait_close(shared, data)
    served(shared, pki, backend)
    rec = wait_conn(shared, client=client)
    assert (rec["route"], rec["upstream"], rec["end"]) == ("-", "-", f"malformed_hello: {reason}")


def test_random_bytes_are_not_tls(shared: Sniport, pki: Pki, backend: TlsBackend) -> None:
    assert RANDOM[0] != 0x16
    client = send_and_wait_close(shared, RANDOM)
    served(shared, pki, backend)
    rec = wait_conn(shared, client=client)
    assert (rec["sni"], rec["route"], rec["end"]) == ("-", "reject", "rejected_non_tls")


@pytest.mark.parametrize("size", [16385, 20000])
def test_oversized_hello_is_refused(shared: Sniport, pki: Pki, backend: TlsBackend,
                                    size: int) -> None:
    hello = make_hello(alpn_padded_context(pki, size), "vpn.example.com")
    assert len(hello) == size
    client = send_and_wait_close(shared, hello)
    served(shared, pki, backend)
    rec = wait_conn(shared, client=client)
    assert rec["end"] == "malformed_hello: ClientHello larger than 16384 bytes"


@pytest.mark.parametrize("size", [12000, 16384])
def test_large_hello_within_the_cap_is_routed(shared: Sniport, pki: Pki, backend: TlsBackend,
                                              size: int) -> None:
    c = RawTls.connect(("127.0.0.1", shared.port), alpn_padded_context(pki, size),
                       "vpn.example.com")
    client = client_label(c.sock)
    hello = c.hello()
    assert len(hello) == size
    c.send_raw(hello)
    c.handshake()
    assert c.peer_der() == backend.der
    assert c.ask_who() == b"vpn.example.com"
    rec = wait_conn(shared, client=client)
    assert (rec["hello"], rec["route"], rec["end"]) == (str(size), "passthrough:lan", "eof")


@pytest.mark.parametrize("listener", ["tcp", "unix"])
@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_truncated_hello_then_close_ends_at_once(sniport: Sniport, pki: Pki, backend: TlsBackend,
                                                 how: str, listener: str) -> None:
    """The client gives up mid-hello: sniport sees the end of stream and closes now, with
    ``eof_in_hello``, rather than waiting for client_hello_timeout."""
    if listener == "tcp":
        sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
        match = {"client": client_label(sock)}
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(sniport.addresses[1][len("unix:") :])
        match = {"listener": sniport.addresses[1]}
    sock.sendall(HELLO[:100])
    time.sleep(0.05)
    if how == "close":
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
    served(sniport, pki, backend)
    rec = wait_conn(sniport, **match)
    if how == "shutdown":
        sock.close()
    assert rec["end"] == "eof_in_hello"
    assert float(rec["duration"]) < HELLO_TIMEOUT - 0.2


def test_truncated_hello_then_close_costs_no_cpu(sniport: Sniport) -> None:
    """A half hello followed by FIN must not make the worker spin (the FIN keeps the socket
    readable while the peeked bytes stay unconsumed)."""
    pid = sniport.proc.pid
    socks = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
        sock.sendall(HELLO[:100])
        socks.append(sock)
    time.sleep(0.05)
    before = cpu_seconds(pid)
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
    time.sleep(HELLO_TIMEOUT - 0.1)
    used = cpu_seconds(pid) - before
    for sock in socks:
        sock.close()
    assert used < 0.1, f"sniport used {used:.2f}s of CPU in {HELLO_TIMEOUT - 0.1:.1f}s"


def test_partial_hello_held_open_costs_no_cpu_then_times_out(sniport: Sniport) -> None:
    pid = sniport.proc.pid
    socks = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
        sock.sendall(HELLO[:100])
        socks.append(sock)
    time.sleep(0.05)
    before = cpu_seconds(pid)
    time.sleep(HELLO_TIMEOUT - 0.15)
    used = cpu_seconds(pid) - before
    assert used < 0.1, f"sniport used {used:.2f}s of CPU while 5 hellos were incomplete"
    clients = [client_label(s) for s in socks]
    for sock in socks:
        assert wait_closed(sock) == b""
        sock.close()
    for client in clients:
        rec = wait_conn(sniport, client=client)
        assert rec["end"] == "client_hello_timeout"
        assert HELLO_TIMEOUT <= float(rec["duration"]) < HELLO_TIMEOUT + 0.5


def test_silent_clients_do_not_delay_a_good_one(sniport: Sniport, pki: Pki,
                                                backend: TlsBackend) -> None:
    silent = [socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
              for _ in range(20)]
    silent_clients = {client_label(s) for s in silent}
    start = time.monotonic()
    served(sniport, pki, backend, within=0.4)  # less than client_hello_timeout
    # The good one finished long before the silent ones are given up on.
    assert time.monotonic() - start < HELLO_TIMEOUT
    lines = wait_conn_count(sniport, 20, end="client_hello_timeout")
    assert {r["client"] for r in lines} == silent_clients
    for r in lines:
        assert (r["sni"], r["hello"], r["route"], r["up"], r["down"]) == ("-", "0", "-", "0", "0")
        assert HELLO_TIMEOUT <= float(r["duration"]) < HELLO_TIMEOUT + 0.5
    for sock in silent:
        assert wait_closed(sock, timeout=2) == b""
        sock.close()
    log = sniport.log()
    good = log.index("route=passthrough:lan")
    assert all(log.index(f"client={c} ") > good for c in silent_clients)


def test_mixed_bad_clients_and_good_ones_at_once(sniport: Sniport, pki: Pki,
                                                 backend: TlsBackend) -> None:
    """Every kind of bad client open at the same time; good clients keep being served."""
    bad: list[socket.socket] = []
    payloads = [b"", HELLO[:1], HELLO[:100], RANDOM, with_byte(HELLO, 5, 2), HELLO[:9]]
    for data in payloads * 3:
        sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
        if data:
            sock.sendall(data)
        bad.append(sock)
    for _ in range(5):
        served(sniport, pki, backend)
    for sock in bad:
        wait_closed(sock, timeout=2)
        sock.close()
    assert sniport.proc.poll() is None
    served(sniport, pki, backend)
