"""The master's /metrics endpoint, driven by a select loop in a thread, with real clients."""

from __future__ import annotations

import http.client
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sniport.metrics_http import MetricsEndpoint

BODY = b"# HELP x_total x\n# TYPE x_total counter\nx_total 1\n"


class Loop:
    """A stand-in for the master's select loop, driving one MetricsEndpoint."""

    def __init__(self, body: bytes = BODY, **options: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.body = body
        self.fail = False
        self.endpoint = MetricsEndpoint(sock, self.render, **options)
        self.turns = 0
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def render(self) -> bytes:
        if self.fail:
            raise RuntimeError("boom")
        return self.body

    def run(self) -> None:
        ep = self.endpoint
        while not self._stop:
            readable, writable, _ = select.select([self._wake_r, *ep.fds()],
                                                  ep.fds_writable(), [], 0.05)
            for fd in readable:
                if fd == self._wake_r:
                    os.read(fd, 64)
                else:
                    ep.on_readable(fd)
            for fd in writable:
                ep.on_writable(fd)
            ep.expire(time.monotonic())
            self.turns += 1
        ep.close()

    def stop(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self.thread.join(5)
        assert not self.thread.is_alive()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def get(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.stop()


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_curl_get_and_head(loop: Loop) -> None:
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "5",
                          f"http://127.0.0.1:{loop.port}/metrics"],
                         capture_output=True, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert b"Connection: close" in head
    assert body == BODY
    out = subprocess.run(["curl", "-s", "-I", "--max-time", "5",
                          f"http://127.0.0.1:{loop.port}/metrics"],
                         capture_output=True, check=True).stdout
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert f"Content-Length: {len(BODY)}".encode() in out
    assert out.endswith(b"\r\n\r\n")


def test_http_client_statuses(loop: Loop) -> None:
    status, headers, body = loop.get("GET", "/metrics?debug=1")
    assert (status, body) == (200, BODY)
    assert headers["connection"] == "close"
    assert loop.get("GET", "/")[0] == 404
    assert loop.get("GET", "/metrics/x")[0] == 404
    status, headers, _ = loop.get("POST", "/metrics")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert loop.get("DELETE", "/nope")[0] == 405
    loop.fail = True
    assert loop.get("GET", "/metrics")[0] == 500
    loop.fail = False
    assert loop.get("GET", "/metrics")[0] == 200
    wait_for(lambda: loop.endpoint.connections() == 0)


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bad_and_oversized_requests(loop: Loop) -> None:
    assert raw(loop.port, b"GARBAGE\x00\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
    assert raw(loop.port, big).startswith(b"HTTP/1.1 431 ")
    assert loop.get("GET", "/metrics")[0] == 200


def test_slow_client_is_closed_at_its_deadline() -> None:
    lp = Loop(request_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", lp.port), timeout=5) as s:
            start = time.monotonic()
            s.sendall(b"GET /metr")
            assert s.recv(100) == b""  # closed without an answer
            took = time.monotonic() - start
        assert 0.4 <= took < 2.0
        assert lp.get("GET", "/metrics")[0] == 200  # the loop goes on
    finally:
        lp.stop()


def test_a_client_that_does_not_read_does_not_block_the_loop() -> None:
    body = b"x" * (16 * 1024 * 1024)  # far more than socket buffers hold
    lp = Loop(body=body, response_timeout=1.5)
    try:
        stuck = socket.create_connection(("127.0.0.1", lp.port), timeout=5)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: lp.endpoint.fds_writable() != [])  # its response is pending
        # Others are served meanwhile, even with the same big body.
        status, _, got = lp.get("GET", "/metrics")
        assert status == 200 and len(got) == len(body)
        assert lp.get("GET", "/other")[0] == 404
        assert lp.endpoint.connections() >= 1
        # The stuck one is dropped at its deadline, its response unfinished.
        wait_for(lambda: lp.endpoint.connections() == 0, timeout=5)
        stuck.close()
    finally:
        lp.stop()


def test_connections_beyond_the_cap_get_503() -> None:
    lp = Loop(max_connections=4)
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", lp.port), timeout=5))
        wait_for(lambda: lp.endpoint.connections() == 4)
        # The 503 is sent as every answer is (half-close, then the client's close), so the
        # request the client sent meanwhile never turns it into a reset; several in a row.
        for _ in range(5):
            assert raw(lp.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(
                b"HTTP/1.1 503 Service Unavailable")
        wait_for(lambda: lp.endpoint.connections() == 4)
        for s in idle:
            s.close()
        idle.clear()
        wait_for(lambda: lp.endpoint.connections() == 0)
        assert lp.get("GET", "/metrics")[0] == 200
    finally:
        for s in idle:
            s.close()
        lp.stop()
