"""Reverse proxy, WebSocket: a real client (the websockets library) over wss, verified with
the test CA, through sniport to a real WebSocket echo application (the websockets server).
Messages both ways, closes from either side, and the route's idle_timeout on a tunnel.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import WsEcho, stopping
from support.clients import HttpConn, request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import TIMEOUT, wait_until
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import ClientConnection, connect


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    ws: WsEcho

    def connect(self, path: str) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", self.s.port), timeout=TIMEOUT)
        return connect(f"wss://{HOST}:{self.s.port}{path}", sock=sock,
                       ssl=self.pki.client_context(), server_hostname=HOST, proxy=None,
                       open_timeout=TIMEOUT, close_timeout=TIMEOUT, ping_interval=None,
                       max_size=None)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_ws")
    ws = WsEcho()
    url = f"http://127.0.0.1:{ws.port}"
    routes = proxy_route("/ws/", [url]) + proxy_route("/idle/", [url], idle_timeout="1s")
    with stopping([ws]), start_sniport(proxy_site_config(pki, tmp, routes), tmp) as s:
        yield Setup(s, pki, ws)


def _headers(raw: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in raw if k.lower() == name.lower()]


def test_websocket_echo_both_ways_over_wss(setup: Setup) -> None:
    with setup.connect("/ws/chat?room=1") as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello from upstream"  # upstream -> client first
        ws.send("ping é")
        assert ws.recv(timeout=TIMEOUT) == "ping é"
        big = os.urandom(3 * 1024 * 1024 + 5)
        ws.send(big)
        assert ws.recv(timeout=TIMEOUT) == big
        for i in range(50):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=TIMEOUT) for _ in range(50)] == [f"m{i}" for i in range(50)]
        ws.close()
        assert ws.close_code == 1000
    # The close handshake went through to the application.
    wait_until(lambda: "/ws/chat?room=1" in setup.ws.closed, what="upstream close")
    assert setup.ws.closed["/ws/chat?room=1"] == 1000
    path, headers = setup.ws.requests[-1]
    assert path == "/ws/chat?room=1"
    assert _headers(headers, "Upgrade") == ["websocket"]
    assert [v.lower() for v in _headers(headers, "Connection")] == ["upgrade"]
    assert _headers(headers, "Host") == [f"{HOST}:{setup.s.port}"]
    assert _headers(headers, "X-Forwarded-For") == ["127.0.0.1"]
    assert _headers(headers, "X-Forwarded-Proto") == ["https"]
    assert len(_headers(headers, "Sec-WebSocket-Key")) == 1


def test_websocket_closed_by_the_upstream(setup: Setup) -> None:
    with setup.connect("/ws/upstream-closes") as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello from upstream"
        ws.send("close-please")
        with pytest.raises(ConnectionClosedOK) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1000, "bye")


def test_websocket_idle_timeout_closes_the_tunnel(setup: Setup) -> None:
    with setup.connect("/idle/timeout") as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello from upstream"
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        last = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        idle = time.monotonic() - last
    assert 0.8 <= idle <= 3.0, f"closed after {idle:.2f}s idle; idle_timeout is 1s"
    # The upstream side of the tunnel is closed as well.
    wait_until(lambda: "/idle/timeout" in setup.ws.closed, timeout=3, what="upstream closed")


def test_websocket_traffic_keeps_the_tunnel_open(setup: Setup) -> None:
    """Messages every 0.25s for 1.75s: never idle for the 1s idle_timeout, never closed."""
    with setup.connect("/idle/ticks") as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello from upstream"
        for i in range(7):
            time.sleep(0.25)
            ws.send(f"tick{i}")
            assert ws.recv(timeout=TIMEOUT) == f"tick{i}"


def test_upgrade_refused_by_the_upstream_is_an_ordinary_response(setup: Setup) -> None:
    """A request with Upgrade that the application answers without 101 (here: a plain HTTP
    GET with a bad WebSocket key): the client gets that answer, not a tunnel."""
    with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes("/ws/", HOST, headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "not-a-key"),
        ]))
        r = c.response()
        assert r.status == 400
        assert b"Sec-WebSocket-Key" in r.body


def _client_frame(text: str) -> bytes:
    """A masked text frame (RFC 6455 section 5.2), payload under 126 bytes."""
    payload = text.encode()
    mask = os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def _server_frame(c: HttpConn) -> str:
    first, length = c._exactly(2)
    assert first == 0x81 and length < 126, (first, length)
    return c._exactly(length).decode()


def test_bytes_sent_with_the_upgrade_request_are_not_lost(setup: Setup) -> None:
    """A client that sends its first frame in the same write as the upgrade request: those
    bytes wait in sniport until the tunnel exists, then go through, once."""
    key = base64.b64encode(os.urandom(16)).decode()
    with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes("/ws/early", HOST, headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key),
        ]) + _client_frame("early bird"))
        head = c.head()
        assert head.status == 101
        assert head.header("Upgrade") == "websocket"
        assert _server_frame(c) == "hello from upstream"
        assert _server_frame(c) == "early bird"
        c.send(_client_frame("second"))
        assert _server_frame(c) == "second"
