"""Reverse proxy, what the upstream application receives: method, path, query, body and
headers (Host, X-Forwarded-*, X-Real-IP, Forwarded, hop-by-hop fields, request_headers /
remove_request_headers, strip_prefix), and what the client receives back (the route's
headers / remove_headers, the upstream's hop-by-hop fields removed).

Real sockets and real TLS: a raw HTTP/1.1 client (support.clients) and curl, through sniport,
to a threaded upstream application that records every request it parsed (support.backends.App).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from support.backends import App, Rec, stopping
from support.clients import Response, curl_site, request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.pki import Pki
from support.process import Sniport, start_sniport


@dataclass
class Setup:
    s: Sniport  # no trusted proxies
    trusting: Sniport  # trusted_proxies = ["127.0.0.1/32"]
    app: App
    pki: Pki
    strict: App  # parses heads with llhttp, as uvicorn (httptools) and Node.js do

    def send(self, target: str, *, method: str = "GET",
             headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
             host: str = HOST, trusted: bool = False) -> tuple[Response, Rec]:
        """One request on a new TLS connection; the response and what the app received."""
        before = len(self.app.requests)
        port = (self.trusting if trusted else self.s).port
        with tls_conn(port, HOST, self.pki.client_context()) as c:
            c.send(request_bytes(target, host, method=method, headers=headers, body=body))
            resp = c.response(method=method)
        assert resp.status == 200, (resp.status, resp.body[:300])
        assert len(self.app.requests) == before + 1
        return resp, self.app.last()


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/echo/", {}),
    ("/uphost/", {"host": "upstream"}),
    ("/fwd/", {"forwarded": True}),
    ("/hdr/", {
        "request_headers": {"X-Added": "added", "X-Custom": "overridden"},
        "remove_request_headers": ["X-Secret", "User-Agent"],
        "route_keys": {
            "headers": {"X-Route": "r1", "Cache-Control": "no-store"},
            "remove_headers": ["X-Internal"],
        },
    }),
    ("/strip/", {"strip_prefix": True}),
    ("/nostrip/", {"strip_prefix": False}),
]


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_headers")
    app = App("echo")
    strict = App("strict", strict=True)
    routes = "".join(proxy_route(path, [app.url], **dict(keys)) for path, keys in ROUTES)
    routes += proxy_route("/strict/", [strict.url])
    trusted = 'trusted_proxies = ["127.0.0.1/32"]'
    with stopping([app, strict]), \
            start_sniport(proxy_site_config(pki, tmp / "a", routes), tmp / "a") as s, \
            start_sniport(proxy_site_config(pki, tmp / "b", routes, server=trusted),
                          tmp / "b") as trusting:
        yield Setup(s, trusting, app, pki, strict)


# --------------------------------------------------------------------------------------------
# Method, path, query, body


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_method_path_query_and_body_arrive_as_sent(setup: Setup, method: str) -> None:
    body = b"" if method in ("GET", "OPTIONS") else b"hello\x00world \xff" * 100
    target = "/echo/a/b%20c/./d?x=1&y=%20z&empty=&x=2"
    resp, rec = setup.send(target, method=method, body=body)
    assert rec.method == method
    # The path the route matched, normalised (RFC 3986 section 6.2.2: the dot segment is
    # gone, the escape of a space kept); the query exactly as the client wrote it.
    assert rec.target == "/echo/a/b%20c/d?x=1&y=%20z&empty=&x=2"
    assert rec.path == "/echo/a/b%20c/d"
    assert rec.query == "x=1&y=%20z&empty=&x=2"
    assert rec.version == "HTTP/1.1"
    assert rec.body == body
    assert rec.body_len == len(body)
    assert rec.body_sha == hashlib.sha256(body).hexdigest()
    if body:
        assert rec.get("Content-Length") == [str(len(body))]
        assert not rec.chunked
    # The client got the application's own answer.
    assert json.loads(resp.body)["target"] == rec.target
    assert resp.header("X-App") == "echo"


@pytest.mark.parametrize("length", [0, 5, 100_000])
def test_an_llhttp_application_accepts_the_forwarded_request(setup: Setup, length: int) -> None:
    """The head sniport sends must be one that llhttp-based applications (uvicorn with
    httptools, Node.js) accept: for instance a single Content-Length."""
    body = b"z" * length
    with tls_conn(setup.s.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes("/strict/post", HOST, method="POST", body=body,
                             headers=[("Content-Length", str(length))]))
        r = c.response()
    assert r.status == 200, r.body[:200]
    assert json.loads(r.body)["body_len"] == length


def test_empty_post_keeps_its_content_length(setup: Setup) -> None:
    _, rec = setup.send("/echo/empty", method="POST", headers=[("Content-Length", "0")])
    assert rec.method == "POST"
    assert rec.get("Content-Length") == ["0"]
    assert rec.get("Transfer-Encoding") == []
    assert rec.body_len == 0


def test_curl_request_reaches_the_application(setup: Setup) -> None:
    r = curl_site(setup.pki, setup.s.port, HOST, "/echo/curl/path?q=%C3%A9&n=1",
                  "-X", "PUT", "--data-binary", "curl body", "-H", "X-Custom: from-curl",
                  "-H", "X-Forwarded-For: 6.6.6.6", "-A", "curl-test")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["method"] == "PUT"
    assert echo["target"] == "/echo/curl/path?q=%C3%A9&n=1"
    assert echo["body_len"] == len(b"curl body")
    assert echo["body_sha256"] == hashlib.sha256(b"curl body").hexdigest()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["host"] == f"{HOST}:{setup.s.port}"  # curl's Host, as it sent it
    assert headers["x-custom"] == "from-curl"
    assert headers["user-agent"] == "curl-test"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"


# --------------------------------------------------------------------------------------------
# Host


def test_host_is_preserved_by_default(setup: Setup) -> None:
    _, rec = setup.send("/echo/h")
    assert rec.get("Host") == [HOST]
    _, rec = setup.send("/echo/h", host=f"{HOST}:{setup.s.port}")
    assert rec.get("Host") == [f"{HOST}:{setup.s.port}"]
    assert rec.get("X-Forwarded-Host") == [f"{HOST}:{setup.s.port}"]


def test_host_upstream_sends_the_upstreams_own_authority(setup: Setup) -> None:
    _, rec = setup.send("/uphost/h")
    assert rec.get("Host") == [f"127.0.0.1:{setup.app.port}"]
    # The name the client asked for is still told, in X-Forwarded-Host.
    assert rec.get("X-Forwarded-Host") == [HOST]


# --------------------------------------------------------------------------------------------
# X-Forwarded-*, X-Real-IP, Forwarded


FORGED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-For", "7.7.7.7"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "evil.test"),
    ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6;proto=http"),
]


def test_forwarding_headers_describe_the_client(setup: Setup) -> None:
    _, rec = setup.send("/echo/f")
    assert rec.get("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.get("X-Forwarded-Proto") == ["https"]
    assert rec.get("X-Forwarded-Host") == [HOST]
    assert rec.get("X-Real-IP") == ["127.0.0.1"]
    assert rec.get("Forwarded") == []  # only with forwarded = true


def test_untrusted_clients_forwarding_headers_are_replaced(setup: Setup) -> None:
    _, rec = setup.send("/echo/f", headers=FORGED)
    assert rec.get("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.get("X-Forwarded-Proto") == ["https"]
    assert rec.get("X-Forwarded-Host") == [HOST]
    assert rec.get("X-Real-IP") == ["127.0.0.1"]
    assert rec.get("Forwarded") == []
    _, rec = setup.send("/fwd/f", headers=FORGED)
    assert rec.get("Forwarded") == [f'for=127.0.0.1;proto=https;host="{HOST}"']
    assert rec.get("X-Forwarded-For") == ["127.0.0.1"]


def test_forwarded_true_adds_rfc7239_forwarded(setup: Setup) -> None:
    _, rec = setup.send("/fwd/f")
    assert rec.get("Forwarded") == [f'for=127.0.0.1;proto=https;host="{HOST}"']
    assert rec.get("X-Forwarded-For") == ["127.0.0.1"]


def test_trusted_proxy_forwarding_headers_are_appended_to(setup: Setup) -> None:
    _, rec = setup.send("/echo/t", trusted=True,
                        headers=[("X-Forwarded-For", "203.0.113.7, 198.51.100.2")])
    assert rec.get("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    # Several X-Forwarded-For fields are one list (RFC 9110 section 5.3).
    _, rec = setup.send("/echo/t", trusted=True,
                        headers=[("X-Forwarded-For", "203.0.113.7"),
                                 ("X-Forwarded-For", "198.51.100.2")])
    assert rec.get("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    _, rec = setup.send("/fwd/t", trusted=True,
                        headers=[("X-Forwarded-For", "203.0.113.7"),
                                 ("Forwarded", "for=203.0.113.7;proto=https")])
    assert rec.get("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert rec.get("Forwarded") == [
        f'for=203.0.113.7;proto=https, for=127.0.0.1;proto=https;host="{HOST}"']
    # A trusted proxy that sends none: sniport's own values, as for anyone.
    _, rec = setup.send("/echo/t", trusted=True)
    assert rec.get("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.get("X-Forwarded-Proto") == ["https"]
    assert rec.get("X-Real-IP") == ["127.0.0.1"]


# --------------------------------------------------------------------------------------------
# Hop-by-hop fields


def test_hop_by_hop_request_headers_are_not_forwarded(setup: Setup) -> None:
    body = b"0123456789"
    _, rec = setup.send("/echo/hop", method="POST", body=body, headers=[
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "named by Connection"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "h2c"),  # without "Connection: upgrade" this is no upgrade
        ("X-Custom", "kept"),
        ("User-Agent", "raw-client"),
    ])
    assert rec.names() == {
        "host", "x-custom", "user-agent", "content-length",
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
    }, rec.headers
    assert rec.get("X-Custom") == ["kept"]
    assert rec.body == body


def test_hop_by_hop_response_headers_are_not_returned(setup: Setup) -> None:
    resp, _ = setup.send("/echo/hop", headers=[
        ("X-Reply-Header", "Connection: X-Resp-Hop"),
        ("X-Reply-Header", "X-Resp-Hop: 1"),
        ("X-Reply-Header", "Keep-Alive: timeout=5"),
        ("X-Reply-Header", "Proxy-Connection: keep-alive"),
        ("X-Reply-Header", "X-Kept: yes"),
        ("X-Reply-Header", "Server: upstream-app/1.0"),
    ])
    names = resp.names()
    for gone in ("x-resp-hop", "keep-alive", "proxy-connection", "connection"):
        assert gone not in names, resp.headers
    assert resp.all("X-Kept") == ["yes"]
    assert resp.all("X-App") == ["echo"]
    assert resp.all("Server") == ["sniport"]
    assert resp.all("Content-Length") == [str(len(resp.body))]


# --------------------------------------------------------------------------------------------
# request_headers / remove_request_headers, route headers / remove_headers


def test_request_headers_set_and_removed_for_the_upstream(setup: Setup) -> None:
    _, rec = setup.send("/hdr/x", headers=[
        ("X-Custom", "original"), ("X-Secret", "s3cret"), ("User-Agent", "ua"),
        ("X-Keep", "k"),
    ])
    assert rec.get("X-Added") == ["added"]
    assert rec.get("X-Custom") == ["overridden"]
    assert rec.get("X-Secret") == []
    assert rec.get("User-Agent") == []
    assert rec.get("X-Keep") == ["k"]
    assert rec.get("Host") == [HOST]
    # The other routes of the same upstream are untouched by this route's settings.
    _, rec = setup.send("/echo/x", headers=[("X-Secret", "s3cret"), ("X-Custom", "original")])
    assert rec.get("X-Secret") == ["s3cret"]
    assert rec.get("X-Custom") == ["original"]
    assert rec.get("X-Added") == []


def test_route_headers_and_remove_headers_apply_to_the_response(setup: Setup) -> None:
    resp, _ = setup.send("/hdr/y", headers=[
        ("X-Reply-Header", "X-Internal: secret"),
        ("X-Reply-Header", "X-Route: from-app"),
        ("X-Reply-Header", "Cache-Control: max-age=60"),
        ("X-Reply-Header", "X-Other: kept"),
    ])
    assert resp.all("X-Internal") == []
    assert resp.all("X-Route") == ["r1"]  # the route's value replaces the application's
    assert resp.all("Cache-Control") == ["no-store"]
    assert resp.all("X-Other") == ["kept"]
    assert resp.all("X-App") == ["echo"]
    # Without the route's settings, the application's headers pass unchanged.
    resp, _ = setup.send("/echo/y", headers=[
        ("X-Reply-Header", "X-Internal: secret"),
        ("X-Reply-Header", "Cache-Control: max-age=60"),
    ])
    assert resp.all("X-Internal") == ["secret"]
    assert resp.all("Cache-Control") == ["max-age=60"]
    assert resp.all("X-Route") == []


# --------------------------------------------------------------------------------------------
# strip_prefix


def test_strip_prefix_true_sends_the_rest_of_the_path(setup: Setup) -> None:
    _, rec = setup.send("/strip/a/b?q=1&r=%2F")
    assert rec.target == "/a/b?q=1&r=%2F"
    _, rec = setup.send("/strip/")
    assert rec.target == "/"
    _, rec = setup.send("/strip/?only=query")
    assert rec.target == "/?only=query"


def test_strip_prefix_false_sends_the_whole_path(setup: Setup) -> None:
    _, rec = setup.send("/nostrip/a/b?q=1")
    assert rec.target == "/nostrip/a/b?q=1"
    _, rec = setup.send("/echo/a/b?q=1")
    assert rec.target == "/echo/a/b?q=1"
