"""Sites end to end: which requests a terminated site answers (DESIGN.md, 421 rules), the
longest-prefix route, the route's response headers, redirects and fixed answers, the plain
HTTP port's redirects, and the access log (combined format and JSON).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.clients import (
    Response,
    client_label,
    curl,
    curl_site,
    fetch,
    plain_conn,
    request_bytes,
    tls_conn,
)
from support.configs import route, site_config
from support.data import Files
from support.logs import json_log, wait_access
from support.pki import Pki, insecure_client_context
from support.process import Sniport, SniportWith, start_sniport
from support.waiting import wait_until

MAIN = "main.site.test"
WWW = "www.main.site.test"
OTHER = "other.site.test"
DEFAULT = "default.site.test"
PASS = "pass.site.test"
CSS = b"body { color: #333 }\n"


@dataclass
class Setup:
    s: Sniport
    pki: Pki

    @property
    def port(self) -> int:
        return self.s.port

    @property
    def http_port(self) -> int:
        return self.s.listen_port(1)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("http_site")
    certs = tmp / "certs"
    m_chain, m_key = pki.cert(MAIN, WWW, directory=certs)
    o_chain, o_key = pki.cert(OTHER, directory=certs)
    d_chain, d_key = pki.cert(DEFAULT, directory=certs)
    assets = Files(tmp / "assets")
    assets.add("site.css", CSS)
    config = f"""
[server]
listen = ["127.0.0.1:0"]
# 127.0.0.2: sniport refuses the same "127.0.0.1:0" in both lists, ephemeral or not.
http_listen = ["127.0.0.2:0"]

[[passthrough]]
name = "lan"
hosts = ["{PASS}"]
upstreams = ["127.0.0.1:9"]

[[site]]
name = "main"
hosts = ["{MAIN}", "{WWW}"]
tls = {{ cert = "{m_chain}", key = "{m_key}" }}
  [[site.route]]
  path = "/"
  respond = {{ body = "root" }}
  [[site.route]]
  path = "/docs/"
  respond = {{ body = "docs" }}
  [[site.route]]
  path = "/docs/api/"
  respond = {{ body = "api" }}
  [[site.route]]
  path = "/docs/api/v2"
  respond = {{ body = "v2" }}
  [[site.route]]
  path = "/old/"
  redirect = {{ to = "https://new.site.test/base/", status = 301 }}
  [[site.route]]
  path = "/go/"
  redirect = {{ to = "https://new.site.test/x/" }}
  [[site.route]]
  path = "/moved"
  redirect = {{ to = "https://new.site.test/fixed", keep_path = false }}
  [[site.route]]
  path = "/health"
  respond = {{ status = 503, body = "down for maintenance", content_type = "text/x-custom" }}
  [[site.route]]
  path = "/teapot"
  respond = {{ status = 418 }}
  [[site.route]]
  path = "/assets/"
  static = {{ root = "{assets.root}" }}
  remove_headers = ["Last-Modified", "Accept-Ranges"]
  [site.route.headers]
  Cache-Control = "public, max-age=31536000, immutable"
  Strict-Transport-Security = "max-age=63072000"
  [[site.route]]
  path = "/bare"
  respond = {{ body = "bare" }}
  remove_headers = ["Server"]

[[site]]
name = "other"
hosts = ["{OTHER}"]
tls = {{ cert = "{o_chain}", key = "{o_key}" }}
  [[site.route]]
  path = "/"
  respond = {{ body = "other" }}

[[site]]
name = "fallback"
hosts = ["{DEFAULT}"]
tls = {{ cert = "{d_chain}", key = "{d_key}" }}
  [[site.route]]
  path = "/"
  respond = {{ body = "default site" }}

[default]
to = "site:fallback"
"""
    with start_sniport(config, tmp) as s:
        yield Setup(s, pki)


# --------------------------------------------------------------------------------------------
# Routes: the longest prefix wins


@pytest.mark.parametrize(("path", "body"), [
    ("/", b"root"), ("/index.html", b"root"), ("/docs", b"root"), ("/docsx", b"root"),
    ("/docs/", b"docs"), ("/docs/guide", b"docs"), ("/docs/api", b"docs"),
    ("/docs/api/", b"api"), ("/docs/api/v1/users", b"api"),
    ("/docs/api/v2", b"v2"), ("/docs/api/v2/users?x=1", b"v2"), ("/docs/api/v2x", b"v2"),
])
def test_longest_prefix_wins(setup: Setup, path: str, body: bytes) -> None:
    r = fetch(setup.port, MAIN, setup.pki.client_context(), path)
    assert (r.status, r.body) == (200, body)


# --------------------------------------------------------------------------------------------
# Which requests a site answers


@pytest.mark.parametrize(("sni", "host", "status", "body"), [
    (MAIN, MAIN, 200, b"root"),
    (MAIN, WWW, 200, b"root"),  # another host of the same site
    (WWW, MAIN, 200, b"root"),
    (MAIN, OTHER, 421, None),  # another site's host
    (MAIN, PASS, 421, None),  # a passthrough block's host
    (MAIN, "unknown.site.test", 421, None),  # no block's host, and main is not [default]
    (OTHER, MAIN, 421, None),
    (DEFAULT, "unknown.site.test", 200, b"default site"),  # the [default].to site serves it
    (DEFAULT, MAIN, 421, None),
    (DEFAULT, PASS, 421, None),
    ("nobody.site.test", "nobody.site.test", 200, b"default site"),  # SNI of no block
    ("nobody.site.test", OTHER, 421, None),
    (MAIN, "MAIN.Site.TEST:443", 200, b"root"),  # port and case do not matter
    (MAIN, "www.main.site.test.:8443", 200, b"root"),  # nor a trailing dot
    (OTHER, "Other.Site.Test:1", 200, b"other"),
])
def test_host_header_against_the_site(setup: Setup, sni: str, host: str, status: int,
                                      body: bytes | None) -> None:
    ctx = setup.pki.client_context() if sni != "nobody.site.test" else insecure_client_context()
    r = fetch(setup.port, sni, ctx, "/", host=host)
    assert r.status == status, f"SNI {sni}, Host {host}: {r.status} {r.body!r}"
    if body is not None:
        assert r.body == body


def test_misdirected_request_then_the_right_host_on_the_same_connection(setup: Setup) -> None:
    with tls_conn(setup.port, MAIN, setup.pki.client_context()) as c:
        # A browser that reused this connection for another name gets 421 and may retry.
        c.send(request_bytes("/docs/", OTHER))
        r = c.response()
        assert r.status == 421
        assert r.reason == "Misdirected Request"
        c.send(request_bytes("/docs/", MAIN))
        r = c.response()
        assert (r.status, r.body) == (200, b"docs")


# --------------------------------------------------------------------------------------------
# The route's response headers, on every response of the route


ROUTE_HEADERS = {"cache-control": "public, max-age=31536000, immutable",
                 "strict-transport-security": "max-age=63072000"}


def _assert_route_headers(r: Response, what: str) -> None:
    for name, value in ROUTE_HEADERS.items():
        assert r.all(name) == [value], f"{what}: {name} is {r.all(name)}"
    assert "last-modified" not in r.names(), what
    assert "accept-ranges" not in r.names(), what


def test_route_headers_and_removals_on_every_response(setup: Setup) -> None:
    with tls_conn(setup.port, MAIN, setup.pki.client_context()) as c:
        c.send(request_bytes("/assets/site.css", MAIN))
        ok = c.response()
        assert (ok.status, ok.body) == (200, CSS)
        _assert_route_headers(ok, "200")
        etag = ok.header("ETag")
        assert etag is not None
        c.send(request_bytes("/assets/site.css", MAIN, headers=[("If-None-Match", etag)]))
        not_modified = c.response()
        assert not_modified.status == 304
        _assert_route_headers(not_modified, "304")
        c.send(request_bytes("/assets/missing.css", MAIN))
        missing = c.response()
        assert missing.status == 404
        _assert_route_headers(missing, "404")
        c.send(request_bytes("/assets/site.css", MAIN, method="HEAD"))
        head = c.response(method="HEAD")
        assert head.status == 200
        _assert_route_headers(head, "HEAD")
        c.send(request_bytes("/assets/site.css", MAIN, headers=[("Range", "bytes=999-")]))
        unsatisfiable = c.response()
        assert unsatisfiable.status == 416
        _assert_route_headers(unsatisfiable, "416")
    # Other routes of the site do not get them.
    r = fetch(setup.port, MAIN, setup.pki.client_context(), "/docs/")
    assert "cache-control" not in r.names()
    assert "strict-transport-security" not in r.names()


def test_remove_headers_removes_server(setup: Setup) -> None:
    r = fetch(setup.port, MAIN, setup.pki.client_context(), "/bare")
    assert (r.status, r.body) == (200, b"bare")
    assert r.all("Server") == [], f"remove_headers = [\"Server\"], yet: {r.headers}"
    assert fetch(setup.port, MAIN, setup.pki.client_context(), "/").header("Server") == "sniport"


# --------------------------------------------------------------------------------------------
# redirect and respond


@pytest.mark.parametrize(("target", "status", "location"), [
    ("/old/a/b?x=1&y=2", 301, "https://new.site.test/base/a/b?x=1&y=2"),
    ("/old/", 301, "https://new.site.test/base/"),
    ("/old/deep/page.html", 301, "https://new.site.test/base/deep/page.html"),
    ("/go/p?q=1", 308, "https://new.site.test/x/p?q=1"),
    ("/moved", 308, "https://new.site.test/fixed"),
    ("/moved/anything/else?q=1", 308, "https://new.site.test/fixed"),
])
def test_redirect(setup: Setup, target: str, status: int, location: str) -> None:
    r = fetch(setup.port, MAIN, setup.pki.client_context(), target)
    assert r.status == status
    assert r.all("Location") == [location]
    assert r.header("Content-Length") == str(len(r.body))


def test_redirect_with_curl(setup: Setup) -> None:
    r = curl_site(setup.pki, setup.port, MAIN, "/old/a%20b/c?k=v", "-o", "/dev/null",
                  "-w", "%{http_code} %{redirect_url}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"301 https://new.site.test/base/a%20b/c?k=v"


def test_respond(setup: Setup) -> None:
    r = fetch(setup.port, MAIN, setup.pki.client_context(), "/health")
    assert (r.status, r.body) == (503, b"down for maintenance")
    assert r.header("Content-Type") == "text/x-custom"
    assert r.header("Content-Length") == str(len(b"down for maintenance"))
    r = fetch(setup.port, MAIN, setup.pki.client_context(), "/teapot")
    assert (r.status, r.body) == (418, b"")
    assert r.header("Content-Length") == "0"
    assert r.header("Content-Type") is None
    r = fetch(setup.port, MAIN, setup.pki.client_context(), "/health", method="HEAD")
    assert (r.status, r.header("Content-Length")) == (503, str(len(b"down for maintenance")))
    out = curl_site(setup.pki, setup.port, MAIN, "/health", "-w",
                    "\n%{http_code} %{content_type}")
    assert out.stdout == b"down for maintenance\n503 text/x-custom"


# --------------------------------------------------------------------------------------------
# The plain HTTP port


@pytest.mark.parametrize(("host", "target", "status", "location"), [
    (MAIN, "/p?q=1", 308, f"https://{MAIN}:PORT/p?q=1"),
    ("WWW.Main.Site.Test:80", "/a/b/", 308, f"https://{WWW}:PORT/a/b/"),
    (DEFAULT, "/", 308, f"https://{DEFAULT}:PORT/"),
    ("unknown.site.test", "/p", 404, None),
    (PASS, "/p", 404, None),
])
def test_http_port_redirects_site_hosts(setup: Setup, host: str, target: str, status: int,
                                        location: str | None) -> None:
    with plain_conn(setup.http_port, host="127.0.0.2") as c:
        c.send(request_bytes(target, host))
        r = c.response()
    assert r.status == status
    if location is not None:
        assert r.all("Location") == [location.replace("PORT", str(setup.port))]
    else:
        assert r.header("Location") is None


def test_http_port_with_curl_follows_to_the_site(setup: Setup) -> None:
    r = curl("-L", "--cacert", str(setup.pki.ca_file),
             "--resolve", f"{MAIN}:{setup.http_port}:127.0.0.2",
             "--resolve", f"{MAIN}:{setup.port}:127.0.0.1",
             "-w", "\n%{http_code} %{num_redirects} %{url_effective}",
             f"http://{MAIN}:{setup.http_port}/docs/api/?k=v")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"api\n200 1 https://{MAIN}:{setup.port}/docs/api/?k=v".encode()


# --------------------------------------------------------------------------------------------
# The access log


def test_access_log_combined_plus_sni(setup: Setup) -> None:
    token = time.monotonic_ns()
    agent = f"log-test/{token}"
    with tls_conn(setup.port, MAIN, setup.pki.client_context()) as c:
        for target in (f"/docs/x?q={token}", f"/health?{token}", f"/assets/none{token}"):
            c.send(request_bytes(target, f"{MAIN}:{setup.port}",
                                 headers=[("User-Agent", agent),
                                          ("Referer", "https://ref.site.test/")]))
            c.response()
    lines = []
    for target, status, size in ((f"/docs/x?q={token}", "200", "4"),
                                 (f"/health?{token}", "503", "20"),
                                 (f"/assets/none{token}", "404", None)):
        m = wait_access(setup.s, f"GET {target} HTTP/1.1")
        lines.append(m)
        assert m.group("ip") == "127.0.0.1"
        assert re.fullmatch(r"\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000",
                            m.group("time"))
        assert m.group("status") == status
        if size is not None:
            assert m.group("bytes") == size
        assert m.group("referer") == "https://ref.site.test/"
        assert m.group("agent") == agent
        assert m.group("sni") == MAIN
        assert m.group("host") == f"{MAIN}:{setup.port}"
        ttfb, total = float(m.group("ttfb")), float(m.group("total"))
        assert 0 <= ttfb <= total < 5
    # Exactly one line per request.
    log = setup.s.log()
    assert log.count(f'"{agent}"') == 3
    # A request on the default site with no Referer and no User-Agent: dashes.
    fetch(setup.port, DEFAULT, setup.pki.client_context(), f"/nothing-{token}", host="x.site.test")
    m = wait_access(setup.s, f"GET /nothing-{token} HTTP/1.1")
    assert (m.group("referer"), m.group("agent"), m.group("sni"), m.group("host")) == (
        "-", "-", DEFAULT, "x.site.test")


def test_access_log_json(pki: Pki, tmp_path: Path, sniport_with: SniportWith) -> None:
    cert = pki.cert("json.site.test", directory=tmp_path / "certs")
    s = sniport_with(site_config("j", ["json.site.test"], cert,
                                 route("/", respond={"body": "json here"}),
                                 server='log_format = "json"'))
    with tls_conn(s.port, "json.site.test", pki.client_context()) as c:
        label = client_label(c)
        c.send(request_bytes("/a?b=c", "json.site.test", headers=[("User-Agent", "j/1")]))
        c.response()
        c.send(request_bytes("/h", "JSON.site.test:7", method="HEAD"))
        c.response(method="HEAD")
    wait_until(lambda: len(json_log(s, "req")) >= 2, 10.0, "two JSON request lines")
    first, second = json_log(s, "req")[:2]
    s.stop()
    for rec in (first, second):
        for name in ("client", "sni", "host", "method", "path", "status", "bytes", "ttfb",
                     "total"):
            assert name in rec, f"{name} missing from {rec}"
        assert rec["client"] == label
        assert rec["sni"] == "json.site.test"
        ttfb, total = rec["ttfb"], rec["total"]
        assert isinstance(ttfb, float | int) and isinstance(total, float | int)
        assert 0 <= ttfb <= total < 5
    assert (first["host"], first["method"], first["path"], first["status"],
            first["bytes"]) == ("json.site.test", "GET", "/a?b=c", 200, 9)
    assert first["user_agent"] == "j/1"
    assert (second["host"], second["method"], second["path"], second["status"],
            second["bytes"]) == ("JSON.site.test:7", "HEAD", "/h", 200, 0)
