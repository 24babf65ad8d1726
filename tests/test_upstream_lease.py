"""Issue 9: the proxy's hold on an upstream connection is an ``UpstreamLease`` whose release
runs exactly once, so ``Upstream.active`` (what ``least_conn`` balances on) comes back to
zero however a request ends.

Two parts:
- the lease alone, pure: one release counts, a second is a no-op; each outcome tells the
  upstream's health what it should and pools or closes the connection;
- the proxy in this process, on real sockets: the HTTP/1.1 engine and the site serve plain
  HTTP on 127.0.0.1, upstreams are the test applications of ``support.backends``, and
  after every way a proxied request can end (answered, refused then the next upstream,
  closed before or during the response, 504, read timeout, client gone, 413, WebSocket
  tunnel ended from either side, malformed response, stale pooled connection...) every
  upstream's ``active`` is back to exactly 0: not above (a leak that would starve it under
  ``least_conn``), not below (a release counted twice).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from support.backends import App, WsEcho, free_port, stopping
from support.configs import PROXY_HOST, proxy_route, proxy_site_config
from support.pki import Pki

from sniport.addresses import parse_http_upstream
from sniport.config import ProxyHandler, loads
from sniport.http.engine import HttpConnection, Limits
from sniport.http.proxy import ProxyRoute
from sniport.http.site import SiteApp, default_handlers
from sniport.http.upstream import OUTCOMES, Outcome, Upstream, UpstreamConn, UpstreamLease
from sniport.routing import RouteTable

# --------------------------------------------------------------------------------------------
# The lease alone


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def _upstream(max_fails: int = 1) -> Upstream:
    cfg = ProxyHandler.model_validate({"upstreams": ["http://127.0.0.1:9"],
                                       "max_fails": max_fails, "fail_timeout": "10s"})
    return Upstream(parse_http_upstream("http://127.0.0.1:9"), cfg, None)


def _lease(up: Upstream, loop: asyncio.AbstractEventLoop) -> tuple[UpstreamLease, UpstreamConn]:
    """A lease on a real connection object that never connected (no transport): pooled means
    in the upstream's idle list, closed means ``closed``."""
    conn = UpstreamConn(up)
    return up.lease(conn, loop), conn


@pytest.mark.parametrize(("outcome", "pooled", "closed", "fails"), [
    ("reuse", True, False, 0),
    ("answered", False, True, 0),
    ("failed", False, True, 1),
    ("abandoned", False, True, 0),
])
def test_a_lease_counts_once_and_settles_the_connection(
        loop: asyncio.AbstractEventLoop, outcome: Outcome, pooled: bool, closed: bool,
        fails: int) -> None:
    up = _upstream(max_fails=0)
    lease, conn = _lease(up, loop)
    other, _ = _lease(up, loop)
    assert up.active == 2
    assert lease.release(outcome, "why")
    assert up.active == 1
    # Every later release, whatever its outcome, is a no-op: no count, no health, no I/O.
    for again in OUTCOMES:
        assert not lease.release(again, "again")
    assert up.active == 1
    assert (conn in up.idle, conn.closed, up.fails) == (pooled, closed, fails)
    other.release("abandoned")
    assert up.active == 0
    up.close_idle()


def test_failures_take_an_upstream_down_and_an_answer_brings_it_back(
        loop: asyncio.AbstractEventLoop) -> None:
    up = _upstream(max_fails=2)
    for _ in range(2):
        _lease(up, loop)[0].release("failed", "upstream_timeout")
    now = loop.time()
    assert up.fails == 2 and not up.available(now) and up.available(now + 10.5)
    _lease(up, loop)[0].release("abandoned")  # no verdict: still down
    assert not up.available(now)
    _lease(up, loop)[0].release("answered")
    assert up.fails == 0 and up.available(now) and up.active == 0


# --------------------------------------------------------------------------------------------
# The proxy in this process


class _NoLog:
    enabled = False

    def request(self, conn: Any, ex: Any, now: float) -> None:
        pass


@dataclass
class Proxy:
    """sniport's site and engine on a plain-HTTP port of this process's event loop."""

    loop: asyncio.AbstractEventLoop
    port: int
    routes: dict[str, ProxyRoute]
    server: asyncio.AbstractServer
    ws: WsEcho
    apps: dict[str, App] = field(default_factory=dict)

    def upstreams(self) -> list[Upstream]:
        return [u for r in self.routes.values() for u in r.upstreams]

    def actives(self) -> dict[str, int]:
        return {f"{path}{u.label}": u.active for path, r in self.routes.items()
                for u in r.upstreams}

    def reset(self) -> None:
        """Each test judges its own ending: a count an earlier failure left is forgotten."""
        for up in self.upstreams():
            up.active = 0

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    async def settled(self, timeout: float = 5.0) -> None:
        """Every lease released: ``active`` 0 everywhere (never below: a double release)."""
        deadline = self.loop.time() + timeout
        while True:
            counts = self.actives()
            assert all(n >= 0 for n in counts.values()), f"released twice: {counts}"
            if not any(counts.values()):
                return
            if self.loop.time() > deadline:
                raise AssertionError(f"leases never released: {counts}")
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def proxy(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("upstream_lease")
    apps = {"a": App("a"), "b": App("b"), "crash": App("crash", mode="close_after_head"),
            "drop": App("drop", mode="drop_reused")}
    ws = WsEcho()
    routes = "".join([
        proxy_route("/ok/", [apps["a"].url], timeout="400ms", read_timeout="400ms"),
        proxy_route("/lc/", [apps["a"].url, apps["b"].url], lb="least_conn"),
        proxy_route("/failover/", [f"http://127.0.0.1:{free_port()}", apps["b"].url]),
        proxy_route("/crash/", [apps["crash"].url], max_fails=0),
        proxy_route("/drop/", [apps["drop"].url]),
        proxy_route("/small/", [apps["a"].url], route_keys={"max_body_size": 1000}),
        proxy_route("/ws/", [f"http://127.0.0.1:{ws.port}"], idle_timeout="400ms"),
    ])
    loaded = loads(proxy_site_config(pki, tmp, routes), "lease-test")
    site = loaded.config.site[0]
    app = SiteApp(site, RouteTable(loaded.config), lambda r: default_handlers(r, []))
    by_path = {r.prefix: r.handler for r in app.routes}
    proxies = {p: h for p, h in by_path.items() if isinstance(h, ProxyRoute)}
    loop = uvloop.new_event_loop()
    limits = Limits(header_timeout=5.0, keepalive_timeout=5.0)

    def protocol() -> HttpConnection:
        return HttpConnection(loop, app, limits, _NoLog(), sni=PROXY_HOST, client="test",
                              scheme="http", on_close=lambda *_: None,
                              client_ip="127.0.0.1")

    for route in proxies.values():
        route.start(loop)
    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    with stopping([*apps.values(), ws]):
        yield Proxy(loop, port, proxies, server, ws, apps)
        for route in proxies.values():
            route.stop()
        server.close()
        loop.run_until_complete(server.wait_closed())
    loop.close()


async def _connect(p: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


def _head(method: str, target: str, extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {PROXY_HOST}\r\n{extra}\r\n".encode()


async def _status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 5)
    return int(line.split()[1]) if line else 0


async def _response(p: Proxy, method: str, target: str, extra: str = "",
                    body: bytes = b"") -> tuple[int, bytes]:
    """One request on its own connection; the status (0: closed without one) and all the
    bytes up to the close."""
    reader, writer = await _connect(p)
    writer.write(_head(method, target, "Connection: close\r\n" + extra) + body)
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    status = int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


async def _answered(p: Proxy) -> None:
    status, data = await _response(p, "GET", "/ok/x")
    assert status == 200 and b"X-App: a" in data


async def _head_request(p: Proxy) -> None:
    assert (await _response(p, "HEAD", "/ok/x"))[0] == 200


async def _not_framed(p: Proxy) -> None:
    status, data = await _response(p, "GET", "/ok/_/download/5000/close")
    assert status == 200 and len(data) > 5000


async def _keepalive_pooled(p: Proxy) -> None:
    reader, writer = await _connect(p)
    for _ in range(3):
        writer.write(_head("GET", "/ok/_/download/100/chunked"))
        assert await _status(reader) == 200
        await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    assert p.routes["/ok/"].upstreams[0].idle, "the connection was not pooled"


async def _refused_then_next(p: Proxy) -> None:
    status, data = await _response(p, "GET", "/failover/x")
    assert status == 200 and b"X-App: b" in data


async def _closed_before_response(p: Proxy) -> None:
    assert (await _response(p, "GET", "/crash/x"))[0] == 502


async def _closed_before_response_after_body(p: Proxy) -> None:
    status, _ = await _response(p, "POST", "/crash/x", "Content-Length: 5\r\n", b"hello")
    assert status == 502


async def _closed_mid_response(p: Proxy) -> None:
    status, data = await _response(p, "GET", "/ok/_/die/3000/cl")
    assert status == 200 and len(data) < 6000  # cut: the head said 6000


async def _timeout_504(p: Proxy) -> None:
    assert (await _response(p, "GET", "/ok/_/hang"))[0] == 504


async def _read_timeout(p: Proxy) -> None:
    status, data = await _response(p, "GET", "/ok/_/stall/1000")
    assert status == 200 and len(data) < 2000


async def _client_gone_mid_response(p: Proxy) -> None:
    reader, writer = await _connect(p)
    # Bigger than every buffer on the way: the proxy is still sending when the client goes.
    writer.write(_head("GET", "/lc/_/download/50000000/cl"))
    assert await _status(reader) == 200
    await asyncio.wait_for(reader.readexactly(100_000), 5)
    writer.transport.abort()


async def _client_gone_before_response(p: Proxy) -> None:
    _, writer = await _connect(p)
    writer.write(_head("GET", "/lc/_/slow/0.3"))
    await asyncio.sleep(0.1)
    writer.transport.abort()


async def _body_too_large(p: Proxy) -> None:
    chunks = b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    status, _ = await _response(p, "POST", "/small/x", "Transfer-Encoding: chunked\r\n",
                                chunks)
    assert status == 413


async def _malformed_response(p: Proxy) -> None:
    assert (await _response(p, "GET", "/ok/_/bad/status"))[0] == 502


async def _stale_pooled_connection(p: Proxy) -> None:
    # "drop" closes every reused connection without answering: the second request finds
    # its pooled connection dead and is retried once on a fresh one.
    reader, writer = await _connect(p)
    for _ in range(2):
        writer.write(_head("GET", "/drop/x"))
        assert await _status(reader) == 200
        await asyncio.wait_for(reader.readuntil(b"}"), 5)
        await asyncio.sleep(0.1)  # pooled, once the read is parsed to its end
    writer.close()


def _ws_head(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return _head("GET", path, "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")


def _ws_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def _tunnel(p: Proxy, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _connect(p)
    writer.write(_ws_head(path))
    assert await _status(reader) == 101
    await asyncio.wait_for(reader.readuntil(b"hello from upstream"), 5)
    return reader, writer


async def _tunnel_closed_by_client(p: Proxy) -> None:
    _, writer = await _tunnel(p, "/ws/by-client")
    writer.transport.abort()


async def _tunnel_closed_by_upstream(p: Proxy) -> None:
    reader, writer = await _tunnel(p, "/ws/by-upstream")
    writer.write(_ws_frame("close-please"))
    await asyncio.wait_for(reader.read(-1), 5)  # the tunnel ends: sniport closes the client
    writer.close()


async def _tunnel_idle(p: Proxy) -> None:
    reader, writer = await _tunnel(p, "/ws/idle")
    await asyncio.wait_for(reader.read(-1), 5)  # idle_timeout ends it
    writer.close()


ENDINGS: dict[str, Callable[[Proxy], Awaitable[None]]] = {
    "answered": _answered,
    "head": _head_request,
    "delimited by the close": _not_framed,
    "keep-alive, pooled": _keepalive_pooled,
    "connect refused, then the next upstream": _refused_then_next,
    "upstream closes before the response": _closed_before_response,
    "upstream closes before the response, body sent": _closed_before_response_after_body,
    "upstream closes mid-response": _closed_mid_response,
    "timeout 504": _timeout_504,
    "read timeout mid-response": _read_timeout,
    "client gone mid-response": _client_gone_mid_response,
    "client gone before the response": _client_gone_before_response,
    "body too large": _body_too_large,
    "malformed response": _malformed_response,
    "stale pooled connection, retried": _stale_pooled_connection,
    "tunnel closed by the client": _tunnel_closed_by_client,
    "tunnel closed by the upstream": _tunnel_closed_by_upstream,
    "tunnel idle timeout": _tunnel_idle,
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_active_returns_to_zero(proxy: Proxy, ending: str) -> None:
    proxy.reset()
    proxy.run(ENDINGS[ending](proxy))
    proxy.run(proxy.settled())


def test_least_conn_still_spreads_after_failures(proxy: Proxy) -> None:
    """End to end: after requests that ended badly on the least_conn route, both of its
    upstreams still get work; a leaked count would send everything to one."""

    async def scenario() -> list[str]:
        proxy.reset()
        for ending in (_client_gone_mid_response, _client_gone_before_response):
            for _ in range(3):
                await ending(proxy)
        await proxy.settled()
        served = []
        for i in range(6):
            status, data = await _response(proxy, "GET", f"/lc/{i}")
            assert status == 200
            served.append("a" if b"X-App: a" in data else "b")
        return served

    served = proxy.run(scenario())
    assert sorted(set(served)) == ["a", "b"], served
    proxy.run(proxy.settled())


def test_no_connection_left_open_to_an_app(proxy: Proxy) -> None:
    """What was released was closed or pooled: beyond the pools, no connection stays open
    ("a" is left out: its stalled responses hold their threads, by design)."""
    for route in proxy.routes.values():
        for up in route.upstreams:
            up.close_idle()
    proxy.run(asyncio.sleep(0.3))
    for name in ("b", "crash", "drop"):
        app = proxy.apps[name]
        assert app.open == 0, f"{name}: {app.open} connections still open"

