"""A connection's state that a call changes under its caller: the caller reads it again and
acts on what it is now.

Three places where that happens, each a corner no end-to-end test reaches reliably: a relay
that ends in its very first pump while the worker drains (a new relay, and one handed over
by a draining worker), and a handler that takes an Upgrade request's connection over at
once, inside the read that brought the request. Interpreted, a stale read here would be a
wrong decision; compiled (mypyc checks at run time the types mypy inferred, and mypy keeps
an attribute's narrowed type across calls) it was a TypeError out of an event callback.
So these run against the compiled build, as the rest of the suite does.

The relays run on real socket pairs with a real poller; the engine is driven as its
transport drives it (``data_received``), as in test_engine_split_points.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import uvloop
from support.transport import RecordingTransport

from sniport.config import Passthrough
from sniport.handover import Relayed
from sniport.http.engine import Exchange, HttpConnection, Limits
from sniport.net.conn import ConnRecord
from sniport.net.passthrough import PassthroughConnection, PassthroughRuntime
from sniport.net.poller import Poller
from sniport.net.relay import PipePool


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


class _DrainingWorker:
    """What a PassthroughConnection needs of its worker (net/conn.py Owner), draining: a
    reload has begun, so every relay is to be offered to the next generation."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.poller = Poller(loop)
        self.pipes = PipePool()
        self.client_hello_timeout = 5.0
        self.detects = False
        self.silent_after = 0.0
        self.defers_accept = False
        self.draining = True
        self.finished: list[str] = []

    def finish(self, conn: ConnRecord, reason: str) -> None:
        self.finished.append(reason)


def _pairs() -> tuple[socket.socket, socket.socket, socket.socket]:
    """Our client side (with bytes waiting to be relayed) and our upstream side, whose peer
    is gone: the relay's first write upstream fails, and the relay ends in its first pump.
    Returns (client side, upstream side, the client's peer, kept open)."""
    ours, client = socket.socketpair()
    up, gone = socket.socketpair()
    ours.setblocking(False)
    up.setblocking(False)
    client.sendall(b"\x16\x03\x01 bytes for the upstream")
    gone.close()
    return ours, up, client


def _runtime() -> PassthroughRuntime:
    block = Passthrough.model_validate({"name": "lan", "hosts": ["lan.test"],
                                        "upstreams": ["127.0.0.1:9"]})
    return PassthroughRuntime(block, ())


def test_a_new_relay_that_ends_in_its_first_pump_while_draining_is_not_offered(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = _DrainingWorker(loop)
    ours, up, client = _pairs()
    try:
        conn = PassthroughConnection(worker, ours, ConnRecord(None, "", "test", 0.0),
                                     _runtime(), "lan.test")
        conn._up = up
        conn.drain()  # the worker drains: offer the relay once it is relaying
        conn._start_relay()
        assert conn.relay is None
        assert len(worker.finished) == 1, worker.finished
    finally:
        client.close()


def test_a_handed_over_relay_that_ends_in_its_first_pump_while_draining_is_not_offered(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = _DrainingWorker(loop)
    ours, up, client = _pairs()
    relayed = Relayed(block="lan", non_tls=False, sni="lan.test", alpn=[], hello=0,
                      route="lan.test", upstream="127.0.0.1:9", peer=["127.0.0.1", 1],
                      ip="127.0.0.1", listener="test", up=10, down=10, age=1.0,
                      up_eof=False, down_eof=False)
    try:
        PassthroughConnection.carry_on(worker, ours, up, ConnRecord(None, "", "test", 0.0),
                                       _runtime(), relayed)
        assert len(worker.finished) == 1, worker.finished
    finally:
        client.close()


class _TakesOverAtOnce:
    """Answers an Upgrade request with 101 and takes the connection over in the same call."""

    def __init__(self) -> None:
        self.tunnelled = bytearray()

    def handle(self, ex: Exchange) -> None:
        ex.start(101, [("Connection", "Upgrade"), ("Upgrade", "websocket")], None)
        self.tunnelled += ex.upgrade(self.tunnelled.extend)


def test_a_connection_taken_over_within_the_read_keeps_reading(
        loop: asyncio.AbstractEventLoop) -> None:
    app = _TakesOverAtOnce()
    log = SimpleNamespace(enabled=False, request=lambda *args: None)
    conn = HttpConnection(loop, app, Limits(5.0, 5.0), log, sni=None, client="",
                          scheme="http", on_close=lambda *args: None)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\nfirst")
    assert bytes(transport.out).startswith(b"HTTP/1.1 101 ")
    # Taken over already: reading is not paused to wait for an upstream's 101.
    assert not transport.paused
    conn.data_received(b" second")
    assert bytes(app.tunnelled) == b"first second"
