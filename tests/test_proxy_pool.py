"""Reverse proxy, the upstream connection pool: connections are reused across requests and
client connections, counted at the upstream application itself; ``keepalive = 0`` opens one
per request; the idle count and the idle timeout are kept; a pooled connection that the
application closed is retried once on a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import App, echo_of, stopping
from support.clients import Response, fetch, request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import TIMEOUT, wait_until


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    apps: dict[str, App]

    def get(self, target: str) -> Response:
        return fetch(self.s.port, HOST, self.pki.client_context(), target)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_pool")
    apps = {name: App(name) for name in ("ka", "ka0", "ka2", "kat", "conc", "gone")}
    apps["stale"] = App("stale", mode="drop_reused")
    routes = "".join([
        proxy_route("/ka/", [apps["ka"].url]),
        proxy_route("/ka0/", [apps["ka0"].url], keepalive=0),
        proxy_route("/ka2/", [apps["ka2"].url], keepalive=2),
        proxy_route("/kat/", [apps["kat"].url], keepalive_timeout="500ms"),
        proxy_route("/conc/", [apps["conc"].url]),
        proxy_route("/stale/", [apps["stale"].url]),
        proxy_route("/gone/", [apps["gone"].url]),
    ])
    with stopping(apps.values()), start_sniport(proxy_site_config(pki, tmp, routes), tmp) as s:
        yield Setup(s, pki, apps)


def test_sequential_requests_share_one_upstream_connection(setup: Setup) -> None:
    app = setup.apps["ka"]
    n = 0
    for client in range(5):  # five client connections, four requests each
        with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
            for i in range(4):
                body = b"x" * (i * 1000)
                c.send(request_bytes(f"/ka/{client}/{i}?n={n}", HOST,
                                     method="POST" if body else "GET", body=body))
                r = c.response()
                assert r.status == 200
                echo = echo_of(r.body)
                assert echo["target"] == f"/ka/{client}/{i}?n={n}"
                assert echo["body_len"] == len(body)
                n += 1
    assert len(app.requests) == 20
    assert app.connections == 1, f"{app.connections} upstream connections for 20 requests"
    assert {r.conn for r in app.requests} == {1}


def test_keepalive_zero_opens_one_connection_per_request(setup: Setup) -> None:
    app = setup.apps["ka0"]
    for _ in range(2):
        with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
            for i in range(5):
                c.send(request_bytes(f"/ka0/{i}", HOST))
                assert c.response().status == 200
    assert len(app.requests) == 10
    assert app.connections == 10
    assert [r.conn for r in app.requests] == list(range(1, 11))
    # sniport closes each one after its response: none is left open.
    wait_until(lambda: app.open == 0, what="upstream connections closed")


def _concurrent(setup: Setup, prefix: str, n: int, delay: float) -> list[Response]:
    out: list[Response | None] = [None] * n

    def one(i: int) -> None:
        out[i] = setup.get(f"{prefix}_/slow/{delay}?i={i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(r is not None and r.status == 200 for r in out), out
    return [r for r in out if r is not None]


def test_concurrent_requests_then_the_pool_serves_them_all(setup: Setup) -> None:
    app = setup.apps["conc"]
    _concurrent(setup, "/conc/", 4, 0.5)
    assert app.connections == 4  # four at once need four connections
    for i in range(8):
        assert setup.get(f"/conc/after/{i}").status == 200
    assert app.connections == 4  # ... which all went back to the pool
    assert app.open == 4


def test_keepalive_caps_the_idle_connections(setup: Setup) -> None:
    app = setup.apps["ka2"]
    _concurrent(setup, "/ka2/", 4, 0.5)
    assert app.connections == 4
    # Only two may wait in the pool: the other two are closed.
    wait_until(lambda: app.open == 2, what="two idle upstream connections left")
    _concurrent(setup, "/ka2/", 4, 0.3)
    assert app.connections == 6  # the two pooled ones, and two new ones
    wait_until(lambda: app.open == 2, what="two idle upstream connections left")


def test_idle_upstream_connections_close_after_keepalive_timeout(setup: Setup) -> None:
    app = setup.apps["kat"]
    assert setup.get("/kat/1").status == 200
    assert app.open == 1
    wait_until(lambda: app.open == 0, timeout=3, what="idle connection closed after 500ms")
    assert setup.get("/kat/2").status == 200
    assert app.connections == 2


def test_pooled_connection_closed_by_the_upstream_is_retried_once(setup: Setup) -> None:
    """The application closes an idle keep-alive connection just as the next request is
    written on it (it reads the head, then closes): sniport retries on a new connection."""
    app = setup.apps["stale"]
    r = setup.get("/stale/1")
    assert r.status == 200 and echo_of(r.body)["conn"] == 1
    r = setup.get("/stale/2")
    assert r.status == 200
    assert echo_of(r.body)["target"] == "/stale/2"
    assert echo_of(r.body)["conn"] == 2
    assert app.connections == 2
    assert app.heads == 3  # the request was sent twice: once on the dead connection
    assert [rec.target for rec in app.requests] == ["/stale/1", "/stale/2"]


def test_client_gone_mid_response_closes_the_upstream_connection(setup: Setup) -> None:
    """The client reads 1 MiB of 100 MiB and leaves: that upstream connection is in the
    middle of a response, so it is closed, not pooled; the next request gets a new one."""
    app = setup.apps["gone"]
    with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes(f"/gone/_/download/{100 << 20}/cl", HOST))
        assert c.head().status == 200
        while len(c.buf) < 1 << 20:
            c._fill()
    wait_until(lambda: 1 in app.closed_conns, what="upstream connection closed")
    r = setup.get("/gone/next")
    assert r.status == 200
    assert echo_of(r.body)["conn"] == 2


def test_client_gone_before_the_response_closes_the_upstream_connection(setup: Setup) -> None:
    app = setup.apps["gone"]
    with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes("/gone/_/hang", HOST))
        wait_until(lambda: app.requests[-1].target == "/gone/_/hang", what="request upstream")
        hung = app.requests[-1].conn
    wait_until(lambda: hung in app.closed_conns, what="upstream connection closed")
    r = setup.get("/gone/after")
    assert r.status == 200
    assert echo_of(r.body)["conn"] not in app.closed_conns
