"""Per-address limits across workers, with real processes and sockets (iplimits.py):
``max_connections_per_ip`` counted over both workers of a ``workers = 2`` server, a
SIGKILLed worker's places given back, and ``max_connection_rate_per_ip`` limiting a flood
from 127.0.0.1 while 127.0.0.2 is served."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import RawTls, make_hello
from support.configs import passthrough_config
from support.logs import conn_lines, wait_conn, wait_conn_count
from support.pki import Pki
from support.proc import children
from support.process import Sniport, SniportWith
from support.waiting import TIMEOUT, wait_until

NAME = "vpn.example.com"


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, NAME)
    yield b
    b.close()


def start(sniport_with: SniportWith, backend: TlsBackend, server: str) -> tuple[Sniport, list[int]]:
    s = sniport_with(passthrough_config([backend.address], server="workers = 2\n" + server))
    workers: list[int] = []

    def two() -> bool:
        workers[:] = children(s.pid)
        return len(workers) == 2

    wait_until(two, TIMEOUT, "two workers")
    return s, workers


def open_relay(port: int, pki: Pki, source: str = "127.0.0.1") -> RawTls:
    c = RawTls.connect(("127.0.0.1", port), pki.client_context(check_hostname=False), NAME,
                       source=source)
    c.send_raw(c.hello())
    c.handshake()
    return c


def served(port: int, pki: Pki, source: str) -> bool:
    """A hello sent: True if the backend answered through sniport, False if sniport closed
    the connection at accept (nothing read, so the close is a reset or an EOF)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                    source_address=(source, 0))
    try:
        sock.sendall(make_hello(pki.client_context(), NAME))
        return bool(sock.recv(5))
    except ConnectionResetError:
        return False
    finally:
        sock.close()


def _proc_net_inode(local_port: int, remote: tuple[str, int]) -> str:
    """The inode of sniport's end of a client connection (/proc/net/tcp)."""
    a, b, c, d = (int(x) for x in remote[0].split("."))
    want_remote = f"{d:02X}{c:02X}{b:02X}{a:02X}:{remote[1]:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{local_port:04X}") and fields[2] == want_remote:
            return fields[9]
    raise LookupError(f"no socket for {remote}")


def owner(c: RawTls, workers: list[int]) -> int:
    """The worker that holds this client's connection."""
    server_port = c.sock.getpeername()[1]
    inode = _proc_net_inode(server_port, c.sock.getsockname())
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise LookupError(f"no worker holds {c.label}")


def spread(port: int, pki: Pki, workers: list[int], n: int) -> list[tuple[RawTls, int]]:
    """``n`` relays from 127.0.0.1 held open, at least one on each worker (a connection that
    lands where it is not needed is closed and made again)."""
    held: list[tuple[RawTls, int]] = []
    for _ in range(100):
        c = open_relay(port, pki)
        pid = owner(c, workers)
        others = {w for _, w in held}
        if len(held) == n - 1 and others == {pid}:
            c.close_clean()  # the last one must go to the other worker
            time.sleep(0.01)
            continue
        held.append((c, pid))
        if len(held) == n:
            return held
    raise AssertionError("the connections never reached both workers")


def test_max_connections_per_ip_counts_across_workers(backend: TlsBackend, pki: Pki,
                                                      sniport_with: SniportWith) -> None:
    s, workers = start(sniport_with, backend, "max_connections_per_ip = 3\n")
    held = spread(s.port, pki, workers, 3)
    assert {pid for _, pid in held} == set(workers)
    # Counted per worker, neither worker would be at 3: the fourth is refused all the same.
    for _ in range(4):  # whichever worker it reaches
        assert not served(s.port, pki, "127.0.0.1")
    wait_conn_count(s, 4, end="per_ip_limit")
    assert served(s.port, pki, "127.0.0.2")  # another address is not limited
    held[0][0].close_clean()
    wait_conn(s, client=held[0][0].label)
    again = open_relay(s.port, pki)
    for c in [again, *(c for c, _ in held[1:])]:
        assert c.ask_who() == NAME.encode()


def test_a_killed_workers_places_are_given_back(backend: TlsBackend, pki: Pki,
                                                sniport_with: SniportWith) -> None:
    s, workers = start(sniport_with, backend, "max_connections_per_ip = 3\n")
    held = spread(s.port, pki, workers, 3)
    assert not served(s.port, pki, "127.0.0.1")
    victim = held[-1][1]
    lost = [c for c, pid in held if pid == victim]
    mark = s.mark()
    os.kill(victim, signal.SIGKILL)  # no chance to count its connections' ends
    s.wait_log(rf"worker {victim} died \(killed by SIGKILL\)", start=mark)
    # Its relays died with it; their places are free again, the others' are not.
    fresh = [open_relay(s.port, pki) for _ in lost]
    assert not served(s.port, pki, "127.0.0.1")
    for c in [*fresh, *(c for c, pid in held if pid != victim)]:
        assert c.ask_who() == NAME.encode()


def test_rate_per_ip_limits_a_flood_and_spares_other_addresses(
        backend: TlsBackend, pki: Pki, sniport_with: SniportWith) -> None:
    s, _ = start(sniport_with, backend, 'max_connection_rate_per_ip = "4/10s"\n')
    # Windows are time.monotonic() // 10s in every process: start the flood well inside
    # one, where the sliding estimate is exact (no previous window to weigh).
    if time.monotonic() % 10 > 7:
        time.sleep(10.05 - time.monotonic() % 10)
    flood = []
    other = []
    for i in range(24):
        flood.append(served(s.port, pki, "127.0.0.1"))
        if i % 6 == 5:
            other.append(served(s.port, pki, "127.0.0.2"))
    assert flood == [True] * 4 + [False] * 20, flood
    assert other == [True] * 4
    refused = wait_conn_count(s, 20, end="per_ip_rate")
    assert all(r["client"].startswith("127.0.0.1:") for r in refused)
    assert all(r["sni"] == "-" for r in refused)  # closed before any byte was read
    assert not [r for r in conn_lines(s) if r["client"].startswith("127.0.0.2:")
                and r["end"].startswith("per_ip")]


def test_relays_handed_over_at_a_reload_keep_their_places(backend: TlsBackend, pki: Pki,
                                                          sniport_with: SniportWith) -> None:
    s, old = start(sniport_with, backend, 'max_connections_per_ip = 2\ndrain_timeout = "5s"\n')
    held = [open_relay(s.port, pki) for _ in range(2)]
    mark = s.mark()
    s.signal(signal.SIGHUP)  # the same config: the relays move to the new workers
    s.wait_log(r"reloaded", start=mark)
    wait_until(lambda: not set(old) & set(children(s.pid)), TIMEOUT, "the old workers gone")
    assert not served(s.port, pki, "127.0.0.1")  # counted where they are now
    assert held[0].ask_who() == NAME.encode()  # it works, then it ends: a place is free
    wait_conn(s, client=held[0].label)
    again = open_relay(s.port, pki)
    assert not served(s.port, pki, "127.0.0.1")
    for c in (held[1], again):
        assert c.ask_who() == NAME.encode()
