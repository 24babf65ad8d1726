"""Half-close crosses the relay, in both directions.

The upstreams are plain TCP: the client routes by a real ClientHello (its bytes lead the
stream) and then speaks raw bytes, so the test sees every byte and every FIN.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Pki, Sniport, start_sniport
from passthrough_helpers import (
    TIMEOUT,
    TcpServer,
    client_context,
    client_label,
    greeter_handler,
    make_hello,
    pattern,
    recv_to_eof,
    sink_reply_handler,
    start_tcp_server,
    wait_conn,
)

REPLY = 2 * 1024 * 1024
GREETING = 1024 * 1024


@pytest.fixture
def sink() -> Iterator[TcpServer]:
    server = start_tcp_server(sink_reply_handler(REPLY))
    yield server
    server.close()


@pytest.fixture
def greeter() -> Iterator[TcpServer]:
    server = start_tcp_server(greeter_handler(GREETING))
    yield server
    server.close()


@pytest.fixture
def sniport(sink: TcpServer, greeter: TcpServer, tmp_path: Path) -> Iterator[Sniport]:
    config = f"""
[server]
listen = ["127.0.0.1:0"]

[[passthrough]]
name = "sink"
hosts = ["sink.example.com"]
upstreams = ["{sink.address}"]

[[passthrough]]
name = "greet"
hosts = ["greet.example.com"]
upstreams = ["{greeter.address}"]
"""
    s = start_sniport(config, tmp_path)
    yield s
    s.stop()


def test_client_fin_crosses_and_whole_response_arrives(sniport: Sniport, sink: TcpServer,
                                                       pki: Pki) -> None:
    hello = make_hello(client_context(pki), "sink.example.com")
    request = hello + os.urandom(1024 * 1024)
    sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)  # the upstream answers only once it sees this FIN
    response = recv_to_eof(sock)
    sock.close()
    head, _, body = response.partition(b"\n")
    assert head.decode() == f"{len(request)} {hashlib.sha256(request).hexdigest()}"
    assert body == pattern(REPLY)
    rec = wait_conn(sniport, client=client)
    assert (rec["sni"], rec["route"], rec["up"], rec["down"], rec["end"]) == (
        "sink.example.com", "passthrough:sink", str(len(request)), str(len(response)), "eof")


def test_upstream_fin_crosses_and_client_can_still_send(sniport: Sniport,
                                                        greeter: TcpServer, pki: Pki) -> None:
    hello = make_hello(client_context(pki), "greet.example.com")
    sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(hello)
    # The upstream sends its greeting and shuts down its side: the client sees the end...
    assert recv_to_eof(sock) == pattern(GREETING)
    # ...and its own direction is still open: what it sends now still reaches the upstream.
    after = os.urandom(256 * 1024)
    sock.sendall(after)
    sock.shutdown(socket.SHUT_WR)
    assert greeter.done.wait(TIMEOUT)
    assert greeter.received == [hello + after]
    sock.close()
    rec = wait_conn(sniport, client=client)
    assert (rec["route"], rec["up"], rec["down"], rec["end"]) == (
        "passthrough:greet", str(len(hello) + len(after)), str(GREETING), "eof")
