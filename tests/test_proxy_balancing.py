"""Reverse proxy, load balancing and health: round robin alternates; least_conn prefers the
idle upstream while a slow request is in flight; passive health takes an upstream out after
``max_fails`` failures for ``fail_timeout``; active checks take it out and put it back, and
say so in the log. Which upstream served a request is counted at the applications.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import App, stopping
from support.clients import Response, fetch
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

    def served_by(self, target: str) -> str:
        r = self.get(target)
        assert r.status == 200, (target, r.status, r.body[:200])
        app = r.header("X-App")
        assert app is not None
        return app


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_balancing")
    apps = {n: App(n) for n in ("rr-a", "rr-b", "lc-a", "lc-b", "pf-b", "hc-a", "hc-b")}
    apps["pf-a"] = App("pf-a", mode="close_after_head")  # never answers: a failure
    health = {"path": "/healthz", "interval": "300ms", "expect": 200}
    routes = "".join([
        proxy_route("/rr/", [apps["rr-a"].url, apps["rr-b"].url]),
        proxy_route("/lc/", [apps["lc-a"].url, apps["lc-b"].url], lb="least_conn"),
        proxy_route("/pf/", [apps["pf-a"].url, apps["pf-b"].url], max_fails=2,
                    fail_timeout="2s"),
        proxy_route("/hc/", [apps["hc-a"].url, apps["hc-b"].url], health=health),
    ])
    with stopping(apps.values()), start_sniport(proxy_site_config(pki, tmp, routes), tmp) as s:
        yield Setup(s, pki, apps)


def test_round_robin_alternates(setup: Setup) -> None:
    order = [setup.served_by(f"/rr/{i}") for i in range(8)]
    assert sorted(set(order)) == ["rr-a", "rr-b"]
    assert all(a != b for a, b in itertools.pairwise(order)), order
    assert order.count("rr-a") == order.count("rr-b") == 4


def test_least_conn_prefers_the_idle_upstream(setup: Setup) -> None:
    a, b = setup.apps["lc-a"], setup.apps["lc-b"]
    slow: list[Response] = []
    t = threading.Thread(target=lambda: slow.append(setup.get("/lc/_/slow/1.5")))
    t.start()
    wait_until(lambda: len(a.requests) + len(b.requests) == 1, what="slow request upstream")
    busy = "lc-a" if a.requests else "lc-b"
    idle = "lc-b" if busy == "lc-a" else "lc-a"
    during = [setup.served_by(f"/lc/quick/{i}") for i in range(6)]
    assert during == [idle] * 6, f"{busy} had a request in flight: {during}"
    t.join(TIMEOUT)
    assert slow and slow[0].status == 200 and slow[0].header("X-App") == busy
    # Both idle again: both get requests.
    after = [setup.served_by(f"/lc/after/{i}") for i in range(6)]
    assert set(after) == {"lc-a", "lc-b"}, after


def test_passive_health_skips_a_failing_upstream_for_fail_timeout(setup: Setup) -> None:
    bad, good = setup.apps["pf-a"], setup.apps["pf-b"]
    label = re.escape(bad.label)
    # Every request is answered (a GET that failed before a response goes on to the next
    # upstream) until pf-a has failed twice in a row.
    sent = 0
    for i in range(6):
        assert setup.served_by(f"/pf/{i}") == "pf-b"
        sent += 1
        if bad.connections == 2:
            break
    assert bad.connections == 2
    marked = time.monotonic()
    setup.s.wait_log(rf"{label}\b[^\n]*\bdown\b", timeout=5)
    # Down: not even tried.
    for i in range(6):
        assert setup.served_by(f"/pf/down/{i}") == "pf-b"
    assert bad.connections == 2
    # After fail_timeout it is tried again (and fails again, and is skipped again).
    time.sleep(max(0.0, marked + 2.3 - time.monotonic()))
    for i in range(4):
        assert setup.served_by(f"/pf/again/{i}") == "pf-b"
    assert bad.connections == 3
    assert len(good.requests) == sent + 6 + 4


def test_active_health_checks_take_an_upstream_out_and_back(setup: Setup) -> None:
    a, b = setup.apps["hc-a"], setup.apps["hc-b"]
    label = re.escape(a.label)

    def probes(app: App) -> list[str]:
        return [r.path for r in app.requests if r.path == "/healthz"]

    def served(n: int, tag: str) -> list[str]:
        return [setup.served_by(f"/hc/{tag}/{i}") for i in range(n)]

    # The checks run: both applications see GET /healthz every 300ms.
    wait_until(lambda: len(probes(a)) >= 2 and len(probes(b)) >= 2, timeout=3,
               what="health probes at both upstreams")
    probe = next(r for r in a.requests if r.path == "/healthz")
    assert probe.method == "GET"
    assert set(served(4, "before")) == {"hc-a", "hc-b"}

    a.health = 500
    setup.s.wait_log(rf"{label}\b[^\n]*\bdown\b", timeout=3)
    assert served(6, "down") == ["hc-b"] * 6

    a.health = 200
    setup.s.wait_log(rf"{label}\b[^\n]*\bup\b", timeout=3)
    assert set(served(4, "up")) == {"hc-a", "hc-b"}
