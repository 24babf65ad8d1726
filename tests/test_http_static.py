"""Static files end to end: traversal refused (404, never a byte from outside the root),
dotfiles, index files, the slash redirect, autoindex, content types, validators and
conditional requests (RFC 9110 section 13.2.2 order), ranges, precompressed siblings, the
SPA fallback, error pages, large files, a missing root and unreadable files.

Request targets are sent raw over TLS where a client library would normalise them; curl
runs with ``--path-as-is`` for the same reason.

As root, the sniport of this module runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
(setpriv), so that a mode-000 file is unreadable to it, as to any unprivileged server.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.clients import Response, curl_site, fetch, request_bytes, split_curl_output, tls_conn
from support.configs import route, site_config, toml_lines
from support.data import Files
from support.pki import Pki
from support.process import Sniport, no_dac_override_prefix, run_cli, start_sniport

HOST = "files.static.test"
MARKER = b"TOP-SECRET-MARKER-7f3a"  # in every file outside the roots
MTIME = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 GMT
LAST_MODIFIED = "Tue, 14 Nov 2023 22:13:20 GMT"
DATA = bytes(range(48, 58)) * 10  # b"0123456789" * 10: 100 bytes
DATA_ETAG = '"6553f100-64"'  # nginx's form: hex mtime, hex size
NOT_FOUND_PAGE = b"<h1>custom not found</h1>\n"
HOME = b"<h1>home</h1>\n"  # the root's index.html
BIG_SIZE = 20 * 1024 * 1024 + 3
JS = b"console.log('identity');\n"
JS_GZ = gzip.compress(JS, mtime=0)
JS_BR = b"\x8b\x0b\x80not-really-brotli-but-distinct\x03"


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    tmp: Path
    big_sha256: str
    big: bytes

    @property
    def port(self) -> int:
        return self.s.port

    def get(self, target: str, headers: tuple[tuple[str, str], ...] = (),
            method: str = "GET") -> Response:
        return fetch(self.port, HOST, self.pki.client_context(), target, headers=headers,
                     method=method)

    def raw(self, target: str) -> tuple[Response, bytes]:
        """A GET with ``target`` exactly as given; the response and every byte received."""
        with tls_conn(self.port, HOST, self.pki.client_context()) as c:
            c.send(request_bytes(target, HOST, headers=[("Connection", "close")]))
            r = c.response()
            wire = r.raw_head + r.body + c.read_to_close()
        return r, wire


def _build_tree(tmp: Path) -> dict[str, Path]:
    # Outside every root: files that must never be served.
    (tmp / "secret").write_bytes(MARKER + b" top\n")
    outside = tmp / "outside-dir"
    outside.mkdir()
    (outside / "s2.txt").write_bytes(MARKER + b" dir\n")
    (outside / "index.html").write_bytes(MARKER + b" index\n")
    pubparent = tmp / "pubparent"
    (pubparent / "pub").mkdir(parents=True)
    (pubparent / "hidden.txt").write_bytes(MARKER + b" alias\n")
    (pubparent / "pub" / "ok.txt").write_bytes(b"public\n")

    www = Files(tmp / "www", MTIME)
    www.add("index.html", HOME)
    www.add("404.html", NOT_FOUND_PAGE)
    www.add("sub/index.html", "<h1>sub</h1>\n")
    www.add("sub/page.html", "<p>page</p>\n")
    (www.root / "nodir").mkdir()
    (www.root / "live").mkdir()  # its index comes and goes (test_index_changes_on_disk)
    www.add("gzidx/index.html", b"<p>compressible</p>\n" * 20)
    www.add("gzidx/index.html.gz", gzip.compress(b"<p>compressible</p>\n" * 20, mtime=0))
    www.add("data.txt", DATA)
    for name in ("a.html", "UPPER.HTML", "app.mjs", "m.wasm", "i.webp", "d.json", "s.css",
                 "v.svg", "f.woff2", "p.avif", "x.unknownext", "noext", "t.txt"):
        www.add(f"types/{name}", b"x")
    www.add("app.js", JS)
    www.add("app.js.gz", JS_GZ)
    www.add("app.js.br", JS_BR)
    www.add("only.js", b"no siblings\n")
    www.add(".env", MARKER + b" dotenv\n")
    www.add(".git/config", MARKER + b" git\n")
    www.add("sub/.hidden", MARKER + b" hidden\n")
    www.add(".well-known/acme-challenge/token123", b"acme-proof\n")
    www.add("a/b.txt", b"in a\n")
    os.symlink(tmp / "secret", www.root / "link-out")
    os.symlink(outside, www.root / "dir-out")
    os.symlink(www.root / "sub" / "page.html", www.root / "link-in")
    # Unreadable: a file, a large file (streamed path), a file in an unsearchable directory.
    www.add("locked.txt", b"locked\n").chmod(0)
    www.add("locked-big.bin", b"L" * (300 * 1024)).chmod(0)
    www.add("lockeddir/f.txt", b"locked dir\n")
    (www.root / "lockeddir").chmod(0o600)

    listing = Files(tmp / "listing", MTIME)
    listing.add("<b>&.txt", b"escaped\n")
    listing.add("plain.txt", b"plain\n")
    listing.add(".hidden", b"hidden\n")
    listing.add("d/inner.txt", b"inner\n")

    dots = Files(tmp / "dots", MTIME)
    dots.add(".env", b"dotfiles allowed\n")

    spa = Files(tmp / "spa", MTIME)
    spa.add("index.html", b"<app></app>\n")
    spa.add("assets/app.js", b"spa js\n")
    return {"www": www.root, "listing": listing.root, "dots": dots.root, "spa": spa.root,
            "pub": pubparent / "pub", "nope": tmp / "does-not-exist"}


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("http_static")
    chain, key = pki.cert(HOST, directory=tmp / "certs")
    roots = _build_tree(tmp)
    big = os.urandom(BIG_SIZE)
    big_path = roots["www"] / "big.bin"
    big_path.write_bytes(big)
    routes = "".join([
        route("/", static={"root": roots["www"]}),
        route("/list/", static={"root": roots["listing"], "autoindex": True}),
        route("/dots/", static={"root": roots["dots"], "dotfiles": True}),
        route("/spa/", static={"root": roots["spa"], "fallback": "/index.html"}),
        route("/files", static={"root": roots["pub"]}),
        route("/nope/", static={"root": roots["nope"]}),
    ])
    config = site_config("files", [HOST], (chain, key), routes,
                         site=toml_lines(error_pages={"404": "/404.html"}))
    try:
        with start_sniport(config, tmp, prefix=no_dac_override_prefix()) as s:
            yield Setup(s, pki, tmp, hashlib.sha256(big).hexdigest(), big)
    finally:
        # Let pytest clean up what the test made unreadable.
        (roots["www"] / "lockeddir").chmod(0o700)


# --------------------------------------------------------------------------------------------
# Traversal: always 404, never a byte from outside the root


TRAVERSAL = [
    "/../secret",
    "/%2e%2e/secret",
    "/%2E%2E/secret",
    "/..%2fsecret",
    "/%2e%2e%2fsecret",
    "/a/..%5c..%5csecret",
    "/a%00b",
    "/a/b.txt%00.html",
    "/..\\secret",
    "/sub\\..\\..\\secret",
    "/%5c..%5csecret",
    "/./../secret",
    "/sub/../../secret",
    "//../secret",
    "/sub/%2e%2e/%2e%2e/secret",
    "/.%2e/secret",
    "/link-out",
    "/dir-out/s2.txt",
    "/dir-out/index.html",
    "/dir-out/",
    "/dir-out",
    "/files../hidden.txt",
    "/files/../hidden.txt",
    "/files/..%2fhidden.txt",
    "/spa/../secret",
    "/spa/..%2f..%2fsecret",
    "/list/../secret",
    "/list/..%2f..%2fsecret",
]


def refused_path(target: str) -> bool:
    """Whether the site refuses the path itself (400) before any file is looked for: an
    encoded slash or backslash, an escaped control character, a raw backslash."""
    from sniport.wire.httprules import BadPath, normalize_path

    try:
        normalize_path(target.partition("?")[0])
    except BadPath:
        return True
    return False


@pytest.mark.parametrize("target", TRAVERSAL)
def test_traversal_is_refused_and_leaks_nothing(setup: Setup, target: str) -> None:
    r, wire = setup.raw(target)
    assert MARKER not in wire
    if refused_path(target):
        assert r.status == 400, f"{target}: {r.status} {r.body[:80]!r}"
        return
    assert r.status == 404, f"{target}: {r.status} {r.body[:80]!r}"
    assert r.body == NOT_FOUND_PAGE


def test_traversal_with_curl_path_as_is(setup: Setup) -> None:
    for target in ("/../secret", "/%2e%2e/secret", "/..%2fsecret", "/a/..%5c..%5csecret",
                   "/sub/../../secret", "/files../hidden.txt"):
        r = curl_site(setup.pki, setup.port, HOST, target, "--path-as-is", "-D", "-")
        assert r.returncode == 0, r.stderr
        assert MARKER not in r.stdout
        head, body = split_curl_output(r.stdout)
        assert head.status == (400 if refused_path(target) else 404), target
        assert body == (b"400 Bad Request\n" if refused_path(target) else NOT_FOUND_PAGE)


def test_symlink_inside_the_root_is_served(setup: Setup) -> None:
    r = setup.get("/link-in")
    assert (r.status, r.body) == (200, b"<p>page</p>\n")
    assert setup.get("/files/ok.txt").body == b"public\n"


# --------------------------------------------------------------------------------------------
# Dotfiles, index files, directories, autoindex


@pytest.mark.parametrize("target", ["/.env", "/.git/config", "/sub/.hidden", "/.git/",
                                    "/%2eenv"])
def test_dotfiles_are_404(setup: Setup, target: str) -> None:
    r, wire = setup.raw(target)
    assert r.status == 404
    assert MARKER not in wire


def test_dotfiles_allowed_and_well_known(setup: Setup) -> None:
    r = setup.get("/dots/.env")
    assert (r.status, r.body) == (200, b"dotfiles allowed\n")
    r = setup.get("/.well-known/acme-challenge/token123")
    assert (r.status, r.body) == (200, b"acme-proof\n")


def test_index_files(setup: Setup) -> None:
    for target, body in (("/", b"<h1>home</h1>\n"), ("/sub/", b"<h1>sub</h1>\n"),
                         ("/sub/?x=1", b"<h1>sub</h1>\n")):
        r = setup.get(target)
        assert (r.status, r.body) == (200, body)
        assert r.header("Content-Type") == "text/html; charset=utf-8"
    r = setup.get("/nodir/")
    assert r.status == 403  # a directory without an index, autoindex off


INDEX_ETAG = f'"{MTIME:x}-{len(HOME):x}"'


def _same_answer(a: Response, b: Response) -> None:
    """Equal status, header fields (but Date) and body."""
    assert (a.status, a.body) == (b.status, b.body)
    assert [h for h in a.headers if h[0].lower() != "date"] == \
        [h for h in b.headers if h[0].lower() != "date"]


@pytest.mark.parametrize("headers", [
    (),
    (("If-None-Match", INDEX_ETAG),),
    (("If-Modified-Since", LAST_MODIFIED),),
    (("If-Match", '"nope"'),),
    (("Range", "bytes=2-5"),),
    (("Range", "bytes=2-5"), ("If-Range", INDEX_ETAG)),
    (("Range", "bytes=900-"),),
    (("Accept-Encoding", "gzip"),),
], ids=lambda h: "+".join(k for k, _ in h) or "plain")
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("directory", ["/", "/sub/", "/gzidx/"])
def test_an_index_answers_as_its_named_file(setup: Setup, directory: str, method: str,
                                            headers: tuple[tuple[str, str], ...]) -> None:
    """Issue 13: the directory's answer is its index file's, byte for byte but the Date:
    validators, 304/412, ranges, precompressed variant; first asked and then remembered."""
    for _ in range(2):
        by_dir = setup.get(directory, headers=headers, method=method)
        by_name = setup.get(directory + "index.html", headers=headers, method=method)
        _same_answer(by_dir, by_name)
    if directory == "/" and not headers:
        assert by_dir.header("ETag") == INDEX_ETAG


def test_index_changes_on_disk_are_seen(setup: Setup) -> None:
    """An index file added, changed and removed under a running server: the directory
    answers the new state once a path's metadata may have been revalidated (STAT_VALID, one
    second), as the file's own path does."""
    from sniport.http.static import STAT_VALID

    live = setup.tmp / "www" / "live"
    index = live / "index.html"
    settle = STAT_VALID + 0.3
    assert setup.get("/live/").status == 403
    try:
        for n, data in enumerate((b"<p>first</p>\n", b"<p>second, longer</p>\n")):
            index.write_bytes(data)
            os.utime(index, (MTIME + n, MTIME + n))
            time.sleep(settle)
            by_dir, by_name = setup.get("/live/"), setup.get("/live/index.html")
            assert (by_dir.status, by_dir.body) == (200, data)
            assert by_dir.header("ETag") == f'"{MTIME + n:x}-{len(data):x}"'
            _same_answer(by_dir, by_name)
            assert setup.get("/live").status == 301  # the slash redirect stays
    finally:
        index.unlink(missing_ok=True)
    time.sleep(settle)
    assert setup.get("/live/").status == 403
    assert setup.get("/live/index.html").status == 404


@pytest.mark.parametrize(("target", "location"), [
    ("/sub", "/sub/"),
    ("/sub?a=1&b=2", "/sub/?a=1&b=2"),
    ("/list/d", "/list/d/"),
    ("/list/d?x=%20y", "/list/d/?x=%20y"),
])
def test_directory_without_slash_redirects(setup: Setup, target: str, location: str) -> None:
    r = setup.get(target)
    assert r.status == 301
    assert r.all("Location") == [location]


def test_autoindex_escapes_names(setup: Setup) -> None:
    r = setup.get("/list/")
    assert r.status == 200
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    page = r.body.decode()
    assert html.escape("<b>&.txt") == "&lt;b&gt;&amp;.txt"
    assert ">&lt;b&gt;&amp;.txt</a>" in page
    assert 'href="%3Cb%3E%26.txt"' in page
    assert "<b>&" not in page
    assert 'href="plain.txt"' in page and 'href="d/"' in page
    assert ".hidden" not in page  # dotfiles are not listed when not served
    r = setup.get("/list/%3Cb%3E%26.txt")
    assert (r.status, r.body) == (200, b"escaped\n")


# --------------------------------------------------------------------------------------------
# Content types


@pytest.mark.parametrize(("name", "ctype"), [
    ("a.html", "text/html; charset=utf-8"),
    ("UPPER.HTML", "text/html; charset=utf-8"),
    ("app.mjs", "text/javascript; charset=utf-8"),
    ("m.wasm", "application/wasm"),
    ("i.webp", "image/webp"),
    ("d.json", "application/json"),
    ("s.css", "text/css; charset=utf-8"),
    ("v.svg", "image/svg+xml; charset=utf-8"),
    ("f.woff2", "font/woff2"),
    ("p.avif", "image/avif"),
    ("t.txt", "text/plain; charset=utf-8"),
    ("x.unknownext", "application/octet-stream"),
    ("noext", "application/octet-stream"),
])
def test_content_types(setup: Setup, name: str, ctype: str) -> None:
    r = setup.get(f"/types/{name}")
    assert r.status == 200
    assert r.all("Content-Type") == [ctype]


def test_js_content_type(setup: Setup) -> None:
    r = setup.get("/only.js")
    assert r.header("Content-Type") == "text/javascript; charset=utf-8"


# --------------------------------------------------------------------------------------------
# Validators and conditional requests


def test_etag_and_last_modified(setup: Setup) -> None:
    r = setup.get("/data.txt")
    assert (r.status, r.body) == (200, DATA)
    assert r.header("ETag") == DATA_ETAG
    assert r.header("Last-Modified") == LAST_MODIFIED
    assert r.header("Accept-Ranges") == "bytes"
    assert r.header("Content-Length") == "100"


PAST = "Mon, 01 Jan 2001 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"
BEFORE = "Tue, 14 Nov 2023 22:13:19 GMT"  # one second before Last-Modified


@pytest.mark.parametrize(("headers", "status"), [
    ((("If-None-Match", DATA_ETAG),), 304),
    ((("If-None-Match", f"W/{DATA_ETAG}"),), 304),
    ((("If-None-Match", f'"nope", {DATA_ETAG}'),), 304),
    ((("If-None-Match", "*"),), 304),
    ((("If-None-Match", '"nope"'),), 200),
    ((("If-Modified-Since", LAST_MODIFIED),), 304),
    ((("If-Modified-Since", FUTURE),), 304),
    ((("If-Modified-Since", BEFORE),), 200),
    ((("If-Modified-Since", "not a date"),), 200),
    ((("If-Match", '"nope"'),), 412),
    ((("If-Match", f"W/{DATA_ETAG}"),), 412),  # If-Match compares strongly
    ((("If-Match", DATA_ETAG),), 200),
    ((("If-Match", "*"),), 200),
    ((("If-Unmodified-Since", PAST),), 412),
    ((("If-Unmodified-Since", LAST_MODIFIED),), 200),
    # RFC 9110 section 13.2.2: If-Match, then If-Unmodified-Since (only without If-Match),
    # then If-None-Match, then If-Modified-Since (only without If-None-Match).
    ((("If-Match", '"nope"'), ("If-None-Match", DATA_ETAG)), 412),
    ((("If-None-Match", DATA_ETAG), ("If-Match", '"nope"')), 412),
    ((("If-Match", DATA_ETAG), ("If-Unmodified-Since", PAST)), 200),
    ((("If-Match", DATA_ETAG), ("If-None-Match", DATA_ETAG)), 304),
    ((("If-Unmodified-Since", PAST), ("If-None-Match", DATA_ETAG)), 412),
    ((("If-None-Match", '"nope"'), ("If-Modified-Since", FUTURE)), 200),
    ((("If-None-Match", DATA_ETAG), ("If-Modified-Since", BEFORE)), 304),
    ((("If-Unmodified-Since", PAST), ("If-Modified-Since", FUTURE)), 412),
])
def test_conditional_requests(setup: Setup, headers: tuple[tuple[str, str], ...],
                              status: int) -> None:
    r = setup.get("/data.txt", headers=headers)
    assert r.status == status, f"{headers}: {r.status}"
    if status == 304:
        assert r.body == b""
        assert r.header("ETag") == DATA_ETAG
        assert r.header("Last-Modified") == LAST_MODIFIED
        assert r.header("Content-Length") is None
    elif status == 200:
        assert r.body == DATA


def test_conditional_head(setup: Setup) -> None:
    r = setup.get("/data.txt", headers=(("If-None-Match", DATA_ETAG),), method="HEAD")
    assert r.status == 304
    r = setup.get("/data.txt", headers=(("If-Match", '"nope"'),), method="HEAD")
    assert r.status == 412


# --------------------------------------------------------------------------------------------
# Ranges


@pytest.mark.parametrize(("spec", "start", "end"), [
    ("bytes=0-9", 0, 9),
    ("bytes=-5", 95, 99),
    ("bytes=10-", 10, 99),
    ("bytes=95-200", 95, 99),
    ("bytes=99-99", 99, 99),
    ("bytes=-500", 0, 99),
])
def test_range(setup: Setup, spec: str, start: int, end: int) -> None:
    r = setup.get("/data.txt", headers=(("Range", spec),))
    assert r.status == 206
    assert r.header("Content-Range") == f"bytes {start}-{end}/100"
    assert r.header("Content-Length") == str(end - start + 1)
    assert r.body == DATA[start:end + 1]
    assert r.header("ETag") == DATA_ETAG


@pytest.mark.parametrize("spec", ["bytes=100-", "bytes=500-600", "bytes=-0"])
def test_range_not_satisfiable(setup: Setup, spec: str) -> None:
    r = setup.get("/data.txt", headers=(("Range", spec),))
    assert r.status == 416
    assert r.all("Content-Range") == ["bytes */100"]


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=x-y"])
def test_range_ignored(setup: Setup, spec: str) -> None:
    r = setup.get("/data.txt", headers=(("Range", spec),))
    assert (r.status, r.body) == (200, DATA)
    assert r.header("Content-Range") is None


@pytest.mark.parametrize(("if_range", "status"), [
    (DATA_ETAG, 206),
    ('"6553f0ff-64"', 200),  # an older entity tag
    (f"W/{DATA_ETAG}", 200),  # weak tags never match If-Range
    (LAST_MODIFIED, 206),
    (BEFORE, 200),
])
def test_if_range(setup: Setup, if_range: str, status: int) -> None:
    r = setup.get("/data.txt", headers=(("Range", "bytes=0-9"), ("If-Range", if_range)))
    assert r.status == status
    assert r.body == (DATA[:10] if status == 206 else DATA)


def test_range_on_a_large_file(setup: Setup) -> None:
    start = 10_000_000
    r = setup.get("/big.bin", headers=(("Range", f"bytes={start}-{start + 99_999}"),))
    assert r.status == 206
    assert r.header("Content-Range") == f"bytes {start}-{start + 99_999}/{BIG_SIZE}"
    assert r.body == setup.big[start:start + 100_000]


# --------------------------------------------------------------------------------------------
# Precompressed siblings


@pytest.mark.parametrize(("accept", "coding", "body"), [
    ("gzip", "gzip", JS_GZ),
    ("gzip, deflate", "gzip", JS_GZ),
    ("br", "br", JS_BR),
    ("gzip, br", "br", JS_BR),
    ("br;q=0, gzip", "gzip", JS_GZ),
    ("*", "br", JS_BR),
    ("identity", None, JS),
    ("gzip;q=0", None, JS),
    (None, None, JS),
])
def test_precompressed(setup: Setup, accept: str | None, coding: str | None,
                       body: bytes) -> None:
    headers = (("Accept-Encoding", accept),) if accept is not None else ()
    r = setup.get("/app.js", headers=headers)
    assert r.status == 200
    assert r.body == body
    assert r.header("Content-Length") == str(len(body))
    assert r.all("Content-Encoding") == ([coding] if coding else [])
    assert r.all("Vary") == ["Accept-Encoding"]
    assert r.header("Content-Type") == "text/javascript; charset=utf-8"


def test_precompressed_variants_have_their_own_etags(setup: Setup) -> None:
    tags = {setup.get("/app.js", headers=(("Accept-Encoding", ae),)).header("ETag")
            for ae in ("gzip", "br", "identity")}
    assert len(tags) == 3 and None not in tags
    r = setup.get("/only.js", headers=(("Accept-Encoding", "gzip, br"),))
    assert r.header("Content-Encoding") is None
    assert r.header("Vary") is None


def test_precompressed_with_curl(setup: Setup) -> None:
    r = curl_site(setup.pki, setup.port, HOST, "/app.js", "--compressed",
                  "-H", "Accept-Encoding: gzip", "-D", "-")
    assert r.returncode == 0, r.stderr
    head, body = split_curl_output(r.stdout)
    assert head.header("Content-Encoding") == "gzip"
    assert body == JS


# --------------------------------------------------------------------------------------------
# Fallback, error pages, large files


def test_spa_fallback(setup: Setup) -> None:
    for target in ("/spa/", "/spa/some/client/route", "/spa/missing.png?x=1"):
        r = setup.get(target)
        assert (r.status, r.body) == (200, b"<app></app>\n"), target
        assert r.header("Content-Type") == "text/html; charset=utf-8"
    r = setup.get("/spa/assets/app.js")
    assert (r.status, r.body) == (200, b"spa js\n")


def test_error_page(setup: Setup) -> None:
    r = setup.get("/no/such/file.txt")
    assert (r.status, r.body) == (404, NOT_FOUND_PAGE)
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    r = setup.get("/no/such/file.txt", method="HEAD")
    assert r.status == 404
    assert r.header("Content-Length") == str(len(NOT_FOUND_PAGE))


def test_large_file_streams_correctly(setup: Setup) -> None:
    r = curl_site(setup.pki, setup.port, HOST, "/big.bin", "-D", "-", timeout=30)
    assert r.returncode == 0, r.stderr
    head, body = split_curl_output(r.stdout)
    assert head.status == 200
    assert head.header("Content-Length") == str(BIG_SIZE)
    assert len(body) == BIG_SIZE
    assert hashlib.sha256(body).hexdigest() == setup.big_sha256
    # Twice on one connection, to check the framing after a streamed body.
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(request_bytes("/big.bin", HOST) + request_bytes("/data.txt", HOST))
        first, second = c.response(), c.response()
    assert hashlib.sha256(first.body).hexdigest() == setup.big_sha256
    assert second.body == DATA


# --------------------------------------------------------------------------------------------
# A missing root, unreadable files


def test_missing_root_is_404_and_check_warns(setup: Setup) -> None:
    r = setup.get("/nope/anything.txt")
    assert r.status == 404
    r = setup.get("/nope/")
    assert r.status == 404
    check = run_cli("check", "-c", str(setup.s.config))
    assert check.returncode == 0, check.stdout + check.stderr
    warnings = [line for line in check.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, check.stdout
    assert warnings[0].startswith(f"warning: {setup.s.config}: site[0](files).route[5].static.root")
    assert str(setup.tmp / "does-not-exist") in warnings[0]


@pytest.mark.parametrize("target", ["/locked.txt", "/locked-big.bin", "/lockeddir/f.txt"])
def test_unreadable_file_is_403_and_logged(setup: Setup, target: str) -> None:
    r = setup.get(target)
    assert r.status == 403, f"{target}: {r.status}"
    assert b"locked" not in r.body
    name = target.rsplit("/", 1)[1]
    setup.s.wait_log(rf"WARNING static: .*{name}")
