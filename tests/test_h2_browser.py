"""HTTP/2 with a real browser: headless Chromium against sniport on 127.0.0.1.

Proven here, with what Chromium itself reports (DevTools: each response's protocol and
connection id) checked against sniport's own log (one ``conn`` line per connection, one
access line per request with its stream):

- a page with 30 assets (stylesheets, scripts, images) loads over HTTP/2 on one connection,
  every asset on its own stream, and the scripts ran;
- two names of one site (site.test and www.site.test, one certificate for both) coalesce:
  the page's assets from www.site.test travel on the site.test connection, whose SNI is
  site.test, and sniport serves them (same block);
- a name of another block (app.site.test: its own [[site]]), which the first site's wildcard
  certificate also covers, is coalesced by Chromium onto the site.test connection (same IP,
  same port, a certificate valid for it, same site for the network partition); sniport
  answers that stream 421 Misdirected Request, and Chromium retries on a new connection
  whose SNI is app.site.test: the user sees the app's page (a navigation) and the app's
  image (a subresource), never the other site's.

Chromium opens spare connections of its own (raced, then closed without a byte): "one
connection" is counted as connections that carried requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.browser import Chromium, spki_hash
from support.configs import route, server_table, site_block, toml_lines
from support.data import Files
from support.logs import access_fields, conn_lines
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import wait_until

SITE = "site.test"
WWW = "www.site.test"
APP = "app.site.test"
APP_TEXT = "app.site.test says hello"
APP_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="77" height="33">'
           '<rect width="77" height="33"/></svg>')
ASSETS = 30

def _pages(www: Files) -> None:
    """The documents the browser loads (``PORT`` is replaced once sniport listens)."""
    assets = []
    for i in range(10):
        www.add(f"a/s{i}.css", f".c{i} {{ margin: {i}px }}\n")
        www.add(f"a/j{i}.js", "window.loaded = (window.loaded || 0) + 1;\n")
        www.add(f"a/i{i}.svg", f'<svg xmlns="http://www.w3.org/2000/svg" width="{i + 1}" '
                               f'height="1"/>')
        assets += [f'<link rel="stylesheet" href="/a/s{i}.css">',
                   f'<script src="/a/j{i}.js"></script>', f'<img src="/a/i{i}.svg">']
    www.add("index.html", "<!doctype html><html><head><link rel=icon href=data:,>"
            + "".join(a for a in assets if a.startswith("<link")) + "</head><body>"
            + "".join(a for a in assets if not a.startswith("<link"))
            + "<p>thirty assets</p><script>document.body.insertAdjacentText('beforeend', "
              "' scripts=' + window.loaded)</script></body></html>")
    # Half its images from the other name of the same site.
    imgs = "".join(f'<img src="https://{WWW if i % 2 else SITE}:PORT/a/i{i}.svg">'
                   for i in range(10))
    www.add("coalesce.html", "<!doctype html><html><head><link rel=icon href=data:,></head>"
            f"<body><p>two names</p>{imgs}</body></html>")
    www.add("plain.html", "<!doctype html><html><head><link rel=icon href=data:,></head>"
            "<body><p>the main site</p></body></html>")
    # An image of the app, shown on the main site's page: its size says which site answered.
    www.add("embed.html", "<!doctype html><html><head><link rel=icon href=data:,></head><body>"
            "<p id=out>waiting</p><script>const i = new Image(); i.onload = () => { "
            "out.textContent = 'image ' + i.naturalWidth + 'x' + i.naturalHeight }; "
            "i.onerror = () => { out.textContent = 'image failed' }; "
            f"i.src = 'https://{APP}:PORT/logo.svg'; document.body.append(i)</script>"
            "</body></html>")


@dataclass
class Setup:
    s: Sniport
    tmp: Path
    spki: list[str]

    @property
    def port(self) -> int:
        return self.s.port

    def url(self, host: str, path: str) -> str:
        return f"https://{host}:{self.port}{path}"

    def browser(self, name: str) -> Chromium:
        return Chromium(self.tmp / f"profile-{name}", spki=self.spki)

    def requests(self, after: int) -> list[dict[str, str]]:
        """sniport's access lines from log line ``after`` on: request, status and the
        ``k=v`` fields (sni, host, stream...)."""
        return access_fields(self.s.stderr.lines()[after:])

    def used_conns(self, route_name: str, conn_after: int, n: int) -> list[dict[str, str]]:
        """Wait for ``n`` connection lines of ``route_name`` (after the ``conn_after``-th)
        that carried bytes from the client; those lines (the browser must be closed)."""
        found: list[dict[str, str]] = []

        def enough() -> bool:
            found[:] = [c for c in conn_lines(self.s)[conn_after:]
                        if c.get("route") == route_name and int(c.get("up", "0")) > 0]
            return len(found) >= n

        wait_until(enough, 10, lambda: f"{n} used connections of {route_name}; log:\n"
                   f"{self.s.log()[-4000:]}")
        return found


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("h2_browser")
    main_cert = pki.cert(SITE, f"*.{SITE}", directory=tmp / "certs")  # covers APP too
    app_cert = pki.cert(APP, directory=tmp / "certs")
    www = Files(tmp / "www")
    _pages(www)
    config = (server_table(extra=toml_lines(workers=1, state_dir=tmp / "state"))
              + site_block("main", [SITE, WWW], main_cert,
                           route("/", static={"root": www.root}))
              + site_block("app", [APP], app_cert,
                           route("/", respond={"body": APP_TEXT})
                           + route("/logo.svg", respond={"body": APP_SVG,
                                                         "content_type": "image/svg+xml"})))
    s = start_sniport(config, tmp)
    try:
        for page in ("coalesce.html", "embed.html"):
            path = www.root / page
            path.write_text(path.read_text().replace("PORT", str(s.port)))
        yield Setup(s, tmp, [spki_hash(main_cert[0]), spki_hash(app_cert[0])])
    finally:
        s.stop()


def test_thirty_assets_load_over_one_http2_connection(setup: Setup) -> None:
    mark, conns = setup.s.mark(), len(conn_lines(setup.s))
    with setup.browser("assets") as chromium:
        page = chromium.page()
        responses = page.navigate(setup.url(SITE, "/"))
        assert page.failures() == []
        assert page.text().split() == ["thirty", "assets", f"scripts={ASSETS // 3}"]
    assets = [r for r in responses if "/a/" in r["url"]]
    assert len(assets) == ASSETS
    assert {(r["status"], r["protocol"]) for r in responses} == {(200, "h2")}
    assert len({r["connectionId"] for r in responses}) == 1, "Chromium used one connection"
    # sniport saw the same: one connection carried the 31 requests, each on its own stream.
    used = setup.used_conns("site:main", conns, 1)
    assert len(used) == 1, used
    assert used[0]["sni"] == SITE
    lines = setup.requests(mark)
    assert len(lines) == ASSETS + 1
    assert {(x["status"], x["sni"], x["request"].rsplit(" ", 1)[1]) for x in lines} == {
        ("200", SITE, "HTTP/2.0")}
    assert len({x["stream"] for x in lines}) == ASSETS + 1


def test_two_names_of_one_site_coalesce(setup: Setup) -> None:
    mark, conns = setup.s.mark(), len(conn_lines(setup.s))
    with setup.browser("coalesce") as chromium:
        page = chromium.page()
        responses = page.navigate(setup.url(SITE, "/coalesce.html"))
        assert page.failures() == []
        widths = page.evaluate("[...document.images].map(i => i.naturalWidth).join(',')")
    assert widths == ",".join(str(i + 1) for i in range(10))
    hosts = {r["url"].split("/")[2].split(":")[0] for r in responses}
    assert hosts == {SITE, WWW}
    assert {(r["status"], r["protocol"]) for r in responses} == {(200, "h2")}
    assert len({r["connectionId"] for r in responses}) == 1, [
        (r["url"], r["connectionId"]) for r in responses]
    used = setup.used_conns("site:main", conns, 1)
    assert [c["sni"] for c in used] == [SITE]
    www_lines = [x for x in setup.requests(mark) if x["host"] == f"{WWW}:{setup.port}"]
    assert len(www_lines) == 5
    assert {(x["status"], x["sni"]) for x in www_lines} == {("200", SITE)}


def _assert_misdirected_then_retried(setup: Setup, mark: int, conns: int, path: str,
                                     app_response: dict[str, object],
                                     main_connection: object) -> None:
    """The request for APP went first on the main site's connection (SNI site.test) and got
    421 there, then on a connection of its own (SNI app.site.test) and got 200."""
    lines = [x for x in setup.requests(mark) if x["host"] == f"{APP}:{setup.port}"
             and x["request"].split(" ")[1] == path]  # not the favicon
    assert [(x["request"], x["status"], x["sni"]) for x in lines] == [
        (f"GET {path} HTTP/2.0", "421", SITE), (f"GET {path} HTTP/2.0", "200", APP)], lines
    assert app_response["status"] == 200 and app_response["protocol"] == "h2"
    assert app_response["connectionId"] != main_connection, "retried on a new connection"
    assert [c["sni"] for c in setup.used_conns("site:app", conns, 1)] == [APP]


def test_navigation_to_a_name_of_another_block_gets_421_and_chromium_retries(
        setup: Setup) -> None:
    mark, conns = setup.s.mark(), len(conn_lines(setup.s))
    with setup.browser("navigate") as chromium:
        page = chromium.page()
        first = page.navigate(setup.url(SITE, "/plain.html"))
        assert page.text().strip() == "the main site"
        responses = page.navigate(setup.url(APP, "/"))
        assert page.text().strip() == APP_TEXT  # the app's page, not the main site's
        assert page.evaluate("location.host") == f"{APP}:{setup.port}"
    app = [r for r in responses if r["url"] == setup.url(APP, "/")]
    assert len(app) == 1, [r["url"] for r in responses]
    _assert_misdirected_then_retried(setup, mark, conns, "/", app[0], first[0]["connectionId"])


def test_subresource_of_another_block_gets_421_and_chromium_retries(setup: Setup) -> None:
    mark, conns = setup.s.mark(), len(conn_lines(setup.s))
    with setup.browser("embed") as chromium:
        page = chromium.page()
        page.navigate(setup.url(SITE, "/embed.html"))
        page.wait_for("document.getElementById('out').textContent !== 'waiting'")
        assert page.evaluate("document.getElementById('out').textContent") == "image 77x33"
        responses = page.responses()
    main = [r for r in responses if r["url"].startswith(setup.url(SITE, "/"))]
    app = [r for r in responses if r["url"].startswith(setup.url(APP, "/"))]
    assert len(app) == 1, [r["url"] for r in responses]
    _assert_misdirected_then_retried(setup, mark, conns, "/logo.svg", app[0],
                                     main[0]["connectionId"])
