"""A reset is noticed at once, whichever side sends it and whatever the relay is doing.

uvloop stops a reader whose socket reports an error without calling it (DESIGN.md,
"uvloop add_reader trap"): a relay built on add_reader would only notice a reset at its idle
timeout. These tests give the relay an hour of idle timeout and expect the end in seconds.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from support.backends import TcpServer, start_tcp_server
from support.clients import client_label, make_hello
from support.configs import passthrough_config
from support.logs import wait_conn
from support.pki import Pki
from support.process import SniportWith

LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def hold_then_reset(server: TcpServer, conn: socket.socket) -> None:
    """Read what comes, stay silent, reset the connection when the test says so."""
    conn.recv(65536)
    server.done.wait(10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    conn.close()


def silent(server: TcpServer, conn: socket.socket) -> None:
    """Read and never answer, until the test is over."""
    while conn.recv(65536):
        pass


@pytest.fixture
def upstream_reset() -> Iterator[TcpServer]:
    server = start_tcp_server(hold_then_reset)
    yield server
    server.done.set()
    server.close()


@pytest.fixture
def upstream_silent() -> Iterator[TcpServer]:
    server = start_tcp_server(silent)
    yield server
    server.close()


def config(upstream: TcpServer) -> str:
    return passthrough_config([upstream.address], server="workers = 1",
                              block='idle_timeout = "1h"')


def test_client_reset_while_upstream_is_silent_ends_at_once(
        pki: Pki, upstream_silent: TcpServer, sniport_with: SniportWith) -> None:
    s = sniport_with(config(upstream_silent))
    c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    label = client_label(c)
    c.sendall(make_hello(pki.client_context(), "vpn.example.com"))
    time.sleep(0.3)  # the relay is up and both sides idle
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    reset_at = time.monotonic()
    c.close()
    rec = wait_conn(s, timeout=5, client=label)
    assert rec["end"] == "client_reset"
    assert time.monotonic() - reset_at < 2.0


def test_upstream_reset_while_client_is_silent_ends_at_once(
        pki: Pki, upstream_reset: TcpServer, sniport_with: SniportWith) -> None:
    s = sniport_with(config(upstream_reset))
    c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    label = client_label(c)
    c.sendall(make_hello(pki.client_context(), "vpn.example.com"))
    time.sleep(0.3)
    reset_at = time.monotonic()
    upstream_reset.done.set()  # the upstream resets; the client says nothing
    c.settimeout(5)
    with _ends():
        assert c.recv(1) == b""  # sniport closed our side too
    rec = wait_conn(s, timeout=5, client=label)
    assert rec["end"] == "upstream_reset"
    assert time.monotonic() - reset_at < 2.0
    c.close()


class _ends:
    """The client side ends: EOF, or a reset passed on, both acceptable."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return kind is ConnectionResetError


def test_upstream_resetting_at_accept_ends_each_connection_with_a_reason(
        pki: Pki, sniport_with: SniportWith) -> None:
    # An upstream that resets every connection as soon as it is accepted: the relay sees the
    # error on its first read and ends with a reason, never hanging.
    def reset_at_accept(server: TcpServer, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        conn.close()

    up = start_tcp_server(reset_at_accept)
    s = sniport_with(config(up))
    try:
        labels = []
        for _ in range(5):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            labels.append(client_label(c))
            c.sendall(make_hello(pki.client_context(), "vpn.example.com"))
            c.settimeout(5)
            with _ends():
                c.recv(1)
            c.close()
        for label in labels:
            rec = wait_conn(s, timeout=5, client=label)
            assert rec["end"] in ("upstream_reset", "client_reset"), rec
    finally:
        s.stop()
        up.close()
