"""Reverse proxy, failures: a stopped upstream (502), a hung one (504), a connect timeout
(502), an upstream that dies or stalls mid-response (the client connection ends, never a
second response), malformed upstream responses (502, and the pool is not poisoned), request
smuggling attempts from the client (400, and nothing reaches the upstream), and retries on
the next upstream when nothing was sent.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import App, Blackhole, echo_of, free_port, stopping
from support.clients import (
    HttpConn,
    PeerClosed,
    Response,
    curl_site,
    http_client,
    request_bytes,
    tls_conn,
)
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.data import pattern
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import TIMEOUT, wait_until

SMUGGLING = {
    "cl-te": b"POST /smug-cl-te/ HTTP/1.1\r\nHost: %s\r\nContent-Length: 6\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te-cl": b"POST /smug-te-cl/ HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n"
             b"Content-Length: 6\r\n\r\n0\r\n\r\nG",
    "obs-fold": b"GET /smug-obs-fold/ HTTP/1.1\r\nHost: %s\r\nX-Folded: a\r\n b\r\n\r\n",
    "bad-chunk-size": b"POST /smug-bad-chunk-size/ HTTP/1.1\r\nHost: %s\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /smug-chunk-size-overflow/ HTTP/1.1\r\nHost: %s\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n"
                           b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"POST /smug-two-lengths/ HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n"
                   b"Content-Length: 6\r\n\r\nhello!",
    "te-not-chunked": b"POST /smug-te-not-chunked/ HTTP/1.1\r\nHost: %s\r\n"
                      b"Transfer-Encoding: identity\r\n\r\nhello",
    "space-before-colon": b"POST /smug-space-before-colon/ HTTP/1.1\r\nHost: %s\r\n"
                          b"Content-Length : 5\r\n\r\nhello",
}


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    apps: dict[str, App]
    dead: dict[str, int]  # route -> a closed port it uses
    blackhole: Blackhole

    def conn(self) -> HttpConn:
        return tls_conn(self.s.port, HOST, self.pki.client_context())

    def get(self, target: str, method: str = "GET", body: bytes = b"") -> Response:
        with self.conn() as c:
            c.send(request_bytes(target, HOST, method=method, body=body))
            try:
                return c.response(method=method)
            except PeerClosed as exc:
                raise AssertionError(f"{method} {target}: the connection closed before a "
                                     f"whole response ({exc})") from None


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_failures")
    names = ["stopped", "hang", "die", "bad", "retry", "nopost-second", "getretry-second",
             "ctretry"]
    apps = {n: App(n) for n in names}
    apps["nopost-first"] = App("nopost-first", mode="close_after_head")
    apps["getretry-first"] = App("getretry-first", mode="close_after_head")
    apps["reset-first"] = App("reset-first", mode="close_on_accept")
    apps["reset-second"] = App("reset-second")
    for case in SMUGGLING:
        apps[f"smug-{case}"] = App(f"smug-{case}")
    dead = {"dead": free_port(), "rg": free_port(), "rp": free_port()}
    blackhole = Blackhole()
    routes = [
        proxy_route("/stopped/", [apps["stopped"].url]),
        proxy_route("/dead/", [f"http://127.0.0.1:{dead['dead']}"]),
        proxy_route("/hang/", [apps["hang"].url], timeout="1s", max_fails=0),
        proxy_route("/die/", [apps["die"].url], read_timeout="1s", max_fails=0),
        proxy_route("/bad/", [apps["bad"].url], max_fails=0),
        proxy_route("/rg/", [f"http://127.0.0.1:{dead['rg']}", apps["retry"].url]),
        proxy_route("/rp/", [f"http://127.0.0.1:{dead['rp']}", apps["retry"].url]),
        proxy_route("/nopost/", [apps["nopost-first"].url, apps["nopost-second"].url]),
        proxy_route("/getretry/", [apps["getretry-first"].url, apps["getretry-second"].url]),
        proxy_route("/reset/", [apps["reset-first"].url, apps["reset-second"].url],
                    max_fails=0),
        proxy_route("/ct/", [f"http://127.0.0.1:{blackhole.port}"], connect_timeout="500ms"),
        proxy_route("/ctretry/", [f"http://127.0.0.1:{blackhole.port}", apps["ctretry"].url],
                    connect_timeout="500ms"),
    ]
    routes += [proxy_route(f"/smug-{case}/", [apps[f"smug-{case}"].url]) for case in SMUGGLING]
    with stopping([*apps.values(), blackhole]), \
            start_sniport(proxy_site_config(pki, tmp, "".join(routes)), tmp) as s:
        yield Setup(s, pki, apps, dead, blackhole)


def _log_names(s: Sniport, label: str, words: str) -> None:
    """A diagnostic line names the upstream and says why (``words``: a regex)."""
    s.wait_log(rf"{re.escape(label)}\b[^\n]*(?:{words})", timeout=5)


def _short_error(r: Response, status: int) -> None:
    assert r.status == status, (r.status, r.body[:200])
    assert 0 < len(r.body) <= 100, r.body
    assert r.body.startswith(str(status).encode()), r.body


# --------------------------------------------------------------------------------------------
# 502, 504


def test_stopped_upstream_gives_502(setup: Setup) -> None:
    app = setup.apps["stopped"]
    assert setup.get("/stopped/1").status == 200  # a pooled connection exists now
    app.stop()
    r = setup.get("/stopped/2")
    _short_error(r, 502)
    _log_names(setup.s, app.label, "refused")
    # With curl, as a user would see it.
    c = curl_site(setup.pki, setup.s.port, HOST, "/stopped/3", "-w", "\n%{http_code}")
    assert c.returncode == 0, c.stderr
    assert c.stdout.endswith(b"\n502")


def test_dead_upstream_gives_502_with_curl(setup: Setup) -> None:
    c = curl_site(setup.pki, setup.s.port, HOST, "/dead/x", "-o", "/dev/null",
                  "-w", "%{http_code}")
    assert c.returncode == 0, c.stderr
    assert c.stdout == b"502"
    _log_names(setup.s, f"http://127.0.0.1:{setup.dead['dead']}", "refused")


def test_hung_upstream_gives_504_after_timeout(setup: Setup) -> None:
    t = time.monotonic()
    r = setup.get("/hang/_/hang")
    elapsed = time.monotonic() - t
    _short_error(r, 504)
    assert 0.9 <= elapsed <= 3.0, f"504 after {elapsed:.2f}s; timeout is 1s"
    _log_names(setup.s, setup.apps["hang"].label, "timeout|no response")
    t = time.monotonic()
    c = curl_site(setup.pki, setup.s.port, HOST, "/hang/_/hang", "-o", "/dev/null",
                  "-w", "%{http_code}")
    assert c.returncode == 0, c.stderr
    assert c.stdout == b"504"
    assert time.monotonic() - t <= 3.0


def test_connect_timeout_gives_502(setup: Setup) -> None:
    t = time.monotonic()
    r = setup.get("/ct/x")
    elapsed = time.monotonic() - t
    _short_error(r, 502)  # the issue: "Connect refused or connect timeout: 502"
    assert 0.4 <= elapsed <= 3.0, f"answered after {elapsed:.2f}s; connect_timeout is 0.5s"
    _log_names(setup.s, f"http://127.0.0.1:{setup.blackhole.port}", "timeout")


def test_connect_timeout_goes_to_the_next_upstream(setup: Setup) -> None:
    t = time.monotonic()
    r = setup.get("/ctretry/x")
    elapsed = time.monotonic() - t
    assert r.status == 200
    assert echo_of(r.body)["target"] == "/ctretry/x"
    assert 0.4 <= elapsed <= 3.0, f"answered after {elapsed:.2f}s; connect_timeout is 0.5s"
    assert len(setup.apps["ctretry"].requests) == 1


# --------------------------------------------------------------------------------------------
# An upstream that dies or stalls mid-response


def test_upstream_dying_mid_response_cuts_the_client_http_client(setup: Setup) -> None:
    """The application announces 200000 bytes, sends 100000, waits 0.2s, and dies (RST):
    the client gets those 100000 bytes and then the connection ends: IncompleteRead."""
    conn = http_client(setup.s.port, setup.pki.client_context(), HOST)
    try:
        conn.request("GET", "/die/_/die/100000/cl")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == "200000"
        with pytest.raises(http.client.IncompleteRead) as e:
            resp.read()
        assert len(e.value.partial) == 100000
        assert e.value.partial == bytes(next(pattern(100000)))
    finally:
        conn.close()


def _dechunk_all(data: bytes) -> tuple[bytes, bool]:
    """Whole chunks in ``data``: (their payload, whether the last-chunk was among them)."""
    out = bytearray()
    while data:
        line, sep, data = data.partition(b"\r\n")
        assert sep, f"cut inside a chunk-size line: {line[:20]!r}"
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(out), True
        assert len(data) >= size + 2, "cut inside a chunk"
        out += data[:size]
        assert data[size:size + 2] == b"\r\n"
        data = data[size + 2:]
    return bytes(out), False


def test_upstream_dying_mid_chunked_response_never_completes_it(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(request_bytes("/die/_/die/50000/chunked", HOST))
        head = c.head()
        assert head.status == 200
        assert head.header("Transfer-Encoding") == "chunked"
        rest = c.read_to_close()
    # What the application sent, and then the end of the connection: no last-chunk (the
    # client must not take the body for complete), no second response.
    payload, complete = _dechunk_all(rest)
    assert not complete, "sniport completed a body that the upstream never finished"
    assert payload == bytes(next(pattern(50000)))


def test_upstream_dying_mid_response_curl_reports_an_error(setup: Setup) -> None:
    c = curl_site(setup.pki, setup.s.port, HOST, "/die/_/die/100000/cl", "-o", "/dev/null",
                  "-w", "%{http_code} %{size_download}")
    assert c.returncode == 18, (c.returncode, c.stderr)  # "partial file"
    assert b"100000 bytes remaining" in c.stderr
    assert c.stdout == b"200 100000"


def test_upstream_stalling_mid_response_is_cut_after_read_timeout(setup: Setup) -> None:
    with tls_conn(setup.s.port, HOST, setup.pki.client_context(), timeout=5) as c:
        t = time.monotonic()
        c.send(request_bytes("/die/_/stall/1000", HOST))
        head = c.head()
        assert head.status == 200
        assert head.header("Content-Length") == "2000"
        try:
            rest = c.read_to_close()
        except TimeoutError:
            raise AssertionError("still open 5s after the upstream stalled; "
                                 "read_timeout is 1s") from None
        elapsed = time.monotonic() - t
    assert len(rest) == 1000
    assert 0.9 <= elapsed <= 3.5, f"cut after {elapsed:.2f}s; read_timeout is 1s"


# --------------------------------------------------------------------------------------------
# Malformed upstream responses


@pytest.mark.parametrize("what", ["status", "chunk", "clte"])
def test_malformed_upstream_response_is_502_and_pool_survives(setup: Setup, what: str) -> None:
    app = setup.apps["bad"]
    warm = setup.get(f"/bad/warm-{what}")
    assert warm.status == 200
    pooled = echo_of(warm.body)["conn"]
    r = setup.get(f"/bad/_/bad/{what}")
    bad = app.last()
    assert bad.target == f"/bad/_/bad/{what}"
    assert bad.conn == pooled  # the malformed answer came on the pooled connection
    _short_error(r, 502)
    # sniport closed that connection: it is in an unknown state.
    wait_until(lambda: pooled in app.closed_conns, what="malformed connection closed")
    r = setup.get(f"/bad/next-{what}")
    assert r.status == 200
    echo = echo_of(r.body)
    assert echo["target"] == f"/bad/next-{what}"
    assert echo["conn"] != pooled
    _log_names(setup.s, app.label, "bad|invalid|malformed")


def test_bad_chunk_after_the_head_cuts_the_client(setup: Setup) -> None:
    """The head went out before the bad chunk arrived: the only honest end is a close."""
    with setup.conn() as c:
        c.send(request_bytes("/bad/_/bad/chunk-late", HOST))
        head = c.head()
        assert head.status == 200
        rest = c.read_to_close()
    assert rest == b"5\r\nhello\r\n", rest
    r = setup.get("/bad/after-late")
    assert r.status == 200 and echo_of(r.body)["target"] == "/bad/after-late"


def test_bytes_after_a_response_are_not_taken_for_the_next_one(setup: Setup) -> None:
    """An upstream that sends a second, unrequested response after the first: the client
    gets the first, and that connection is not reused (the pool is not poisoned)."""
    app = setup.apps["bad"]
    r = setup.get("/bad/_/bad/extra")
    assert (r.status, r.body) == (200, b"ok")
    extra_conn = app.last().conn
    for i in range(3):
        r = setup.get(f"/bad/after-extra/{i}")
        assert r.status == 200
        echo = echo_of(r.body)
        assert echo["target"] == f"/bad/after-extra/{i}"
        assert echo["conn"] != extra_conn


# --------------------------------------------------------------------------------------------
# Request smuggling from the client


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_request_smuggling_is_400_and_nothing_reaches_the_upstream(setup: Setup,
                                                                   case: str) -> None:
    app = setup.apps[f"smug-{case}"]
    with setup.conn() as c:
        c.send(SMUGGLING[case] % HOST.encode())
        r = c.response()
        assert r.status == 400, (r.status, r.body[:200])
        assert c.closed_within(TIMEOUT)
    time.sleep(0.5)  # anything sniport would still send upstream has been sent by now
    assert app.snapshot() == (0, 0, 0, 0), (
        "(connections, heads, requests, bytes) at the upstream after a refused request; "
        f"it received {app.raw_heads}")
    # The route does reach that upstream for a well-formed request.
    r = setup.get(f"/smug-{case}/fine", method="POST", body=b"hello")
    assert r.status == 200
    assert echo_of(r.body)["body_len"] == 5
    assert app.snapshot()[2] == 1


# --------------------------------------------------------------------------------------------
# Retries


def test_get_and_post_go_to_the_next_upstream_when_connect_is_refused(setup: Setup) -> None:
    app = setup.apps["retry"]
    r = setup.get("/rg/x?y=1")
    assert r.status == 200
    assert echo_of(r.body)["target"] == "/rg/x?y=1"
    _log_names(setup.s, f"http://127.0.0.1:{setup.dead['rg']}", "refused")
    body = bytes(range(256)) * 400
    r = setup.get("/rp/submit", method="POST", body=body)
    assert r.status == 200
    echo = echo_of(r.body)
    assert (echo["method"], echo["body_len"]) == ("POST", len(body))
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [rec.method for rec in app.requests] == ["GET", "POST"]  # each sent once
    _log_names(setup.s, f"http://127.0.0.1:{setup.dead['rp']}", "refused")


def test_post_is_not_sent_twice_when_the_upstream_closes(setup: Setup) -> None:
    """The first upstream reads the request and closes without answering: the POST reached
    it, so it is not sent again to the second one."""
    first, second = setup.apps["nopost-first"], setup.apps["nopost-second"]
    r = setup.get("/nopost/submit", method="POST", body=b"pay once")
    _short_error(r, 502)
    assert (first.connections, first.heads) == (1, 1)
    assert second.snapshot() == (0, 0, 0, 0)


def test_get_goes_to_the_next_upstream_when_the_first_closes(setup: Setup) -> None:
    first, second = setup.apps["getretry-first"], setup.apps["getretry-second"]
    r = setup.get("/getretry/x")
    assert r.status == 200
    assert echo_of(r.body)["target"] == "/getretry/x"
    assert (first.connections, first.heads) == (1, 1)
    assert len(second.requests) == 1


def test_upstream_resetting_at_once_never_leaves_a_request_unanswered(setup: Setup) -> None:
    """An upstream that resets each connection as soon as it is accepted, under concurrent
    load: every request is still answered (by the second upstream), none hangs."""
    first, second = setup.apps["reset-first"], setup.apps["reset-second"]
    problems: list[str] = []

    def one(i: int) -> None:
        try:
            with tls_conn(setup.s.port, HOST, setup.pki.client_context(), timeout=5) as c:
                c.send(request_bytes(f"/reset/{i}", HOST))
                r = c.response()
            if r.status != 200:
                problems.append(f"/reset/{i}: {r.status}")
        except (OSError, PeerClosed) as exc:
            problems.append(f"/reset/{i}: {exc!r}")

    for rnd in range(15):
        threads = [threading.Thread(target=one, args=(rnd * 8 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        if problems:
            break
    assert problems == [], (f"{len(problems)} request(s) of round {rnd + 1} not answered "
                            f"(first upstream reset {first.connections} connections)")
    assert len(second.requests) == 15 * 8
