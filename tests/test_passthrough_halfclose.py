"""Half-close crosses the relay, in both directions.

The upstreams are plain TCP: the client routes by a real ClientHello (its bytes lead the
stream) and then speaks raw bytes, so the test sees every byte and every FIN.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import pytest
from support.backends import TcpServer, greeter_handler, sink_reply_handler, start_tcp_server
from support.clients import client_label, make_hello, recv_to_eof
from support.configs import passthrough_block, passthrough_config
from support.data import pattern_bytes
from support.logs import wait_conn
from support.pki import Pki
from support.process import Sniport, SniportWith
from support.waiting import TIMEOUT

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
def sniport(sink: TcpServer, greeter: TcpServer, sniport_with: SniportWith) -> Sniport:
    return sniport_with(passthrough_config(
        [sink.address], name="sink", hosts=["sink.example.com"],
        extra=passthrough_block("greet", ["greet.example.com"], [greeter.address])))


def test_client_fin_crosses_and_whole_response_arrives(sniport: Sniport, sink: TcpServer,
                                                       pki: Pki) -> None:
    hello = make_hello(pki.client_context(), "sink.example.com")
    request = hello + os.urandom(1024 * 1024)
    sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)  # the upstream answers only once it sees this FIN
    response = recv_to_eof(sock)
    sock.close()
    head, _, body = response.partition(b"\n")
    assert head.decode() == f"{len(request)} {hashlib.sha256(request).hexdigest()}"
    assert body == pattern_bytes(REPLY)
    rec = wait_conn(sniport, client=client)
    assert (rec["sni"], rec["route"], rec["up"], rec["down"], rec["end"]) == (
        "sink.example.com", "passthrough:sink", str(len(request)), str(len(response)), "eof")


def test_upstream_fin_crosses_and_client_can_still_send(sniport: Sniport,
                                                        greeter: TcpServer, pki: Pki) -> None:
    hello = make_hello(pki.client_context(), "greet.example.com")
    sock = socket.create_connection(("127.0.0.1", sniport.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(hello)
    # The upstream sends its greeting and shuts down its side: the client sees the end...
    assert recv_to_eof(sock) == pattern_bytes(GREETING)
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
