"""HTTP/2 with real command-line clients: ``curl --http2`` and ``nghttp`` (nghttp2-client)
against sniport on 127.0.0.1, every exchange checked as the client reports it.

Proven here, for each of the two clients (ALPN picks h2; every response is HTTP/2):

- static files: a range request (206 and exactly the bytes asked for), If-None-Match with
  the file's ETag (304, no body), a precompressed ``.gz`` sibling served with
  ``Content-Encoding: gzip`` (and ``Vary``) when the client accepts it, the plain file when
  it does not; HEAD (the GET's headers, no body);
- a proxied request streams a 5 MiB upload and a 5 MiB download (upstream framed by length
  and by chunks) byte-exact: the application's sha256 of what it received, the client's of
  what it got;
- a redirect route (308 and its Location), a fixed ``respond`` route, the site's error page
  for a 404;
- a site with ``http2 = false`` makes ALPN pick http/1.1: curl --http2 reports HTTP/1.1,
  nghttp (HTTP/2 only) refuses the connection;
- the access log line says ``HTTP/2.0`` and carries the stream the client used;
- a Host (``:authority``) of another block on a connection is 421 on that stream (curl).

And a differential test: the same requests (GETs with a query and a cookie, POSTs and a
PUT with bodies, DELETE, HEAD), each sent by curl over HTTP/1.1 and over HTTP/2 with the
same lower-case fields in the same order, reach a recording upstream as identical bytes:
the request heads, byte for byte, and the bodies (length and sha256). The application
cannot tell which protocol the client spoke.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.backends import App
from support.clients import curl
from support.configs import proxy_route, route, server_table, site_block, toml_lines
from support.data import Files, pattern, pattern_sha256
from support.logs import access_fields
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import TIMEOUT, wait_until

FILES = "files.h2.test"  # the site: static, proxy, redirect, respond, error pages
H1 = "h1only.h2.test"  # a site with http2 = false
OTHER = "other.h2.test"  # another block: a request for it on FILES's connection is 421
DATA = bytes(range(48, 58)) * 10  # b"0123456789" * 10
JS = b"console.log('identity, not compressed');\n" * 20
JS_GZ = gzip.compress(JS, mtime=0)
NOT_FOUND_PAGE = b"<h1>h2 custom not found</h1>\n"
FIXED = "fixed answer over h2"
MIB5 = 5 * 1024 * 1024


@dataclass
class Reply:
    """A response as the client reported it."""

    status: int
    version: str  # "2" or "1.1"
    headers: list[tuple[str, str]]  # lower-case names
    body: bytes
    client_stream: int = 0  # the stream id the client used (when asked for, -v)
    stderr: str = ""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return values[-1] if values else None


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    tmp: Path
    app: App
    etag: str = ""
    counter: list[int] = field(default_factory=lambda: [0])

    @property
    def port(self) -> int:
        return self.s.port

    def scratch(self, name: str) -> Path:
        self.counter[0] += 1
        return self.tmp / f"{self.counter[0]}-{name}"

    def access(self, after: int) -> list[dict[str, str]]:
        """sniport's access lines from log line ``after`` on: request, status and the
        ``k=v`` fields (sni, host, stream...)."""
        return access_fields(self.s.stderr.lines()[after:])

    def wait_access(self, after: int, request: str) -> dict[str, str]:
        found: list[dict[str, str]] = []

        def seen() -> bool:
            found[:] = [x for x in self.access(after) if x["request"] == request]
            return bool(found)

        wait_until(seen, TIMEOUT, lambda: f"an access line for {request!r}; log:\n"
                   f"{self.s.log()[-3000:]}")
        return found[0]


# --------------------------------------------------------------------------------------------
# The two clients, one interface


def run_curl(setup: Setup, host: str, path: str, *, method: str = "GET",
             headers: Sequence[tuple[str, str]] = (), upload: Path | None = None,
             version: str = "--http2", verbose: bool = False) -> Reply:
    """curl (``version``: --http2 or --http1.1) to https://host:port/path, verifying the
    certificate with the test CA; the head as curl dumped it, the body exactly as received
    (no decoding)."""
    head, body = setup.scratch("head"), setup.scratch("body")
    args = [version, "--resolve", f"{host}:{setup.port}:127.0.0.1", "--cacert",
            str(setup.pki.ca_file), "-D", str(head), "-o", str(body), "-w", "%{http_version}"]
    if method == "HEAD":
        # -I: curl reads no body after a HEAD (and writes the head where the body would
        # go); that no DATA frame follows a HEAD is nghttp's to show, which reads them all.
        args.append("-I")
    elif method != "GET" or upload is not None:
        args += ["-X", method]
    if upload is not None:
        args += ["--data-binary", f"@{upload}"]
    for name, value in headers:
        args += ["-H", f"{name}: {value}"]
    if verbose:
        args.append("-v")
    r = curl(*args, f"https://{host}:{setup.port}{path}", timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    lines = [line.rstrip("\r") for line in head.read_text("latin-1").split("\n")]
    status = int(lines[0].split(" ")[1])
    fields = [(k.strip().lower(), v.strip()) for k, _, v in
              (line.partition(":") for line in lines[1:] if line)]
    stderr = r.stderr.decode(errors="replace")
    m = re.search(r"Using Stream ID: (\d+)", stderr)
    got = body.read_bytes() if body.exists() and method != "HEAD" else b""
    return Reply(status, r.stdout.decode(), fields, got,
                 int(m.group(1)) if m else 0, stderr)


def run_nghttp(setup: Setup, host: str, path: str, *, method: str = "GET",
               headers: Sequence[tuple[str, str]] = (), upload: Path | None = None,
               verbose: bool = False) -> Reply:
    """nghttp to 127.0.0.1:port with ``:authority`` (and so the SNI) host:port; status and
    fields from its HAR file, the body from its stdout (which nghttp decodes when the
    response is gzip-encoded)."""
    har = setup.scratch("har")
    args = ["nghttp", "-t", "30", "-r", str(har), "-H", f":authority: {host}:{setup.port}"]
    if method != "GET" and not (method == "POST" and upload is not None):
        args += ["-H", f":method: {method}"]
    if upload is not None:
        args += ["-d", str(upload)]
    for name, value in headers:
        args += ["-H", f"{name}: {value}"]
    if verbose:
        args.append("-v")
    r = subprocess.run([*args, f"https://127.0.0.1:{setup.port}{path}"], capture_output=True,
                       timeout=40)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0, stderr + r.stdout.decode(errors="replace")[-2000:]
    response = json.loads(har.read_text())["log"]["entries"][0]["response"]
    fields = [(h["name"], h["value"]) for h in response["headers"]
              if not h["name"].startswith(":")]
    body = r.stdout
    stream = 0
    if verbose:
        # "send HEADERS frame <length=43, flags=0x25, stream_id=13>" ... "; Open new stream"
        m = re.search(rb"send HEADERS frame <[^>]*stream_id=(\d+)>[^\[]*; Open new stream",
                      body)
        assert m, body[-2000:]
        stream = int(m.group(1))
        body = b""  # mixed with the frame log
    assert response["httpVersion"] == "HTTP/2.0"
    return Reply(response["status"], "2", fields, body, stream, stderr)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("h2_clients")
    www = Files(tmp / "www")
    www.add("data.txt", DATA)
    www.add("app.js", JS)
    www.add("app.js.gz", JS_GZ)
    www.add("404.html", NOT_FOUND_PAGE)
    app = App("h2app")
    files_cert = pki.cert(FILES, directory=tmp / "certs")
    config = (server_table(extra=toml_lines(workers=1, state_dir=tmp / "state"))
              + site_block("files", [FILES], files_cert,
                           route("/", static={"root": www.root})
                           + route("/old/", redirect={"to": f"https://{FILES}/new/"})
                           + route("/fixed", respond={"status": 200, "body": FIXED})
                           + proxy_route("/api/", [app.url]),
                           extra=toml_lines(error_pages={"404": "/404.html"}))
              + site_block("h1only", [H1], pki.cert(H1, directory=tmp / "certs"),
                           route("/", respond={"body": "h1 only"}),
                           extra=toml_lines(http2=False))
              + site_block("other", [OTHER], pki.cert(OTHER, directory=tmp / "certs"),
                           route("/", respond={"body": "other site"})))
    upload = tmp / "upload.bin"
    with upload.open("wb") as f:
        for piece in pattern(MIB5):
            f.write(piece)
    s = start_sniport(config, tmp)
    try:
        yield Setup(s, pki, tmp, app)
    finally:
        s.stop()
        app.stop()


@dataclass
class Client:
    name: str
    setup: Setup

    def get(self, path: str, *, host: str = FILES, method: str = "GET",
            headers: Sequence[tuple[str, str]] = (), upload: Path | None = None,
            verbose: bool = False) -> Reply:
        if self.name == "curl":
            reply = run_curl(self.setup, host, path, method=method, headers=headers,
                             upload=upload, verbose=verbose)
        else:
            reply = run_nghttp(self.setup, host, path, method=method, headers=headers,
                               upload=upload, verbose=verbose)
        if host != H1:
            assert reply.version == "2", f"{self.name} did not speak HTTP/2: {reply}"
        return reply


@pytest.fixture(params=["curl", "nghttp"])
def client(request: pytest.FixtureRequest, setup: Setup) -> Client:
    return Client(request.param, setup)


# --------------------------------------------------------------------------------------------
# Static files


def test_range_request(client: Client) -> None:
    r = client.get("/data.txt", headers=[("range", "bytes=10-29")])
    assert r.status == 206
    assert r.header("content-range") == f"bytes 10-29/{len(DATA)}"
    assert r.header("content-length") == "20"
    assert r.body == DATA[10:30]


def test_if_none_match_gives_304(client: Client) -> None:
    first = client.get("/data.txt")
    assert first.status == 200 and first.body == DATA
    etag = first.header("etag")
    assert etag
    again = client.get("/data.txt", headers=[("if-none-match", etag)])
    assert again.status == 304
    assert again.body == b""
    assert again.header("etag") == etag


def test_precompressed_gz_when_accepted(client: Client) -> None:
    r = client.get("/app.js", headers=[("accept-encoding", "gzip")])
    assert r.status == 200
    assert r.header("content-encoding") == "gzip"
    assert r.header("content-length") == str(len(JS_GZ))
    assert r.header("vary") == "Accept-Encoding"
    # curl gives the bytes as sent; nghttp decodes gzip before writing the body out.
    assert r.body == (JS_GZ if client.name == "curl" else JS)
    plain = client.get("/app.js", headers=[("accept-encoding", "identity")])
    assert plain.status == 200
    assert plain.header("content-encoding") is None
    assert plain.body == JS


def test_head_has_the_get_headers_and_no_body(client: Client) -> None:
    get = client.get("/data.txt")
    head = client.get("/data.txt", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == str(len(DATA))
    for name in ("etag", "last-modified", "content-type", "accept-ranges"):
        assert head.header(name) == get.header(name), name


# --------------------------------------------------------------------------------------------
# Proxy, redirect, respond, error pages


def test_proxy_streams_a_5mib_upload_byte_exact(client: Client, setup: Setup) -> None:
    r = client.get("/api/upload", method="POST", upload=setup.tmp / "upload.bin",
                   headers=[("content-type", "application/octet-stream")])
    assert r.status == 200
    echo = json.loads(r.body)
    assert (echo["method"], echo["path"]) == ("POST", "/api/upload")
    assert echo["body_len"] == MIB5
    assert echo["body_sha256"] == pattern_sha256(MIB5)


@pytest.mark.parametrize("framing", ["cl", "chunked"])
def test_proxy_streams_a_5mib_download_byte_exact(client: Client, framing: str) -> None:
    r = client.get(f"/api/_/download/{MIB5}/{framing}")
    assert r.status == 200
    assert len(r.body) == MIB5
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(MIB5)


def test_redirect(client: Client) -> None:
    r = client.get("/old/page?q=1")
    assert r.status == 308
    assert r.header("location") == f"https://{FILES}/new/page?q=1"


def test_fixed_respond_route(client: Client) -> None:
    r = client.get("/fixed")
    assert r.status == 200
    assert r.body == FIXED.encode()
    assert r.header("content-type") == "text/plain; charset=utf-8"


def test_site_error_page_for_404(client: Client) -> None:
    r = client.get("/no/such/file.txt")
    assert r.status == 404
    assert r.body == NOT_FOUND_PAGE
    assert (r.header("content-type") or "").startswith("text/html")


# --------------------------------------------------------------------------------------------
# ALPN, logs, 421


def test_http2_false_makes_alpn_pick_http11(client: Client, setup: Setup) -> None:
    if client.name == "curl":
        r = client.get("/", host=H1)
        assert r.status == 200 and r.body == b"h1 only"
        assert r.version == "1.1", "curl --http2 was answered over HTTP/1.1"
        return
    # nghttp speaks HTTP/2 only: without h2 in ALPN it has nothing to talk.
    out = subprocess.run(["nghttp", "-t", "10", "-H", f":authority: {H1}:{setup.port}",
                          f"https://127.0.0.1:{setup.port}/"], capture_output=True,
                         timeout=20)
    said = out.stderr + out.stdout
    assert b"HTTP/2 protocol was not selected" in said, said
    assert b"processed=0" in said, said


def test_access_log_says_http2_and_the_stream(client: Client, setup: Setup) -> None:
    mark = setup.s.mark()
    path = f"/fixed?log={client.name}"
    r = client.get(path, verbose=True)
    assert r.status == 200
    assert r.client_stream > 0
    line = setup.wait_access(mark, f"GET {path} HTTP/2.0")
    assert line["status"] == "200"
    assert line["sni"] == FILES and line["host"] == f"{FILES}:{setup.port}"
    assert line["stream"] == str(r.client_stream)


def test_host_of_another_block_is_421_on_the_stream(setup: Setup) -> None:
    # curl sends a Host field as :authority; the connection's SNI stays FILES.
    mark = setup.s.mark()
    r = run_curl(setup, FILES, "/?misdirected", headers=[("Host", f"{OTHER}:{setup.port}")])
    assert r.version == "2"
    assert r.status == 421
    line = setup.wait_access(mark, "GET /?misdirected HTTP/2.0")
    assert (line["status"], line["sni"], line["host"]) == ("421", FILES,
                                                         f"{OTHER}:{setup.port}")


# --------------------------------------------------------------------------------------------
# The differential test


@dataclass(frozen=True)
class DiffCase:
    id: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


DIFF_CASES = [
    # A browser's order: the cookie among the other fields, not last.
    DiffCase("get-cookie", "GET", "/api/diff/get?x=1&y=%20z&y=2",
             (("cookie", "a=1; b=2"), ("x-one", "1"), ("x-multi", "one, two"))),
    DiffCase("get-cookie-last", "GET", "/api/diff/get2?x=1",
             (("x-one", "1"), ("cookie", "a=1; b=2"))),
    DiffCase("post-form", "POST", "/api/diff/form",
             (("content-type", "application/x-www-form-urlencoded"),),
             b"name=value&other=%26" * 100),
    DiffCase("post-binary", "POST", "/api/diff/binary",
             (("content-type", "application/octet-stream"),), bytes(range(256)) * 1024),
    DiffCase("put", "PUT", "/api/diff/put",
             (("content-type", "text/plain"), ("if-match", '"v1"')),
             "unicode body: \u00e9 \u00fc \u2713\n".encode()),
    DiffCase("delete", "DELETE", "/api/diff/thing/7", (("authorization", "Bearer abc.def"),)),
    DiffCase("head", "HEAD", "/api/diff/head", (("accept-language", "en, fr;q=0.5"),)),
]


def _recorded_more(app: App, than: int) -> bool:
    with app.lock:
        return len(app.requests) > than


@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: c.id)
def test_http11_and_http2_requests_reach_the_upstream_as_identical_bytes(
        setup: Setup, case: DiffCase) -> None:
    seen: dict[str, tuple[str, int, str]] = {}
    upload = None
    if case.body is not None:
        upload = setup.scratch("diff-body")
        upload.write_bytes(case.body)
    # The same fields, in lower case as HTTP/2 requires (RFC 9113 section 8.2.1), and no
    # field left to curl's defaults, whose spelling differs by version.
    fields = [("user-agent", "differential/1"), ("accept", "*/*"), *case.headers]
    for version in ("--http1.1", "--http2"):
        before = len(setup.app.requests)
        r = run_curl(setup, FILES, case.path, method=case.method, headers=fields,
                     upload=upload, version=version)
        assert r.status == 200, (version, r)
        assert r.version == ("2" if version == "--http2" else "1.1")
        wait_until(functools.partial(_recorded_more, setup.app, before), TIMEOUT,
                   "the upstream to record the request")
        with setup.app.lock:
            assert len(setup.app.requests) == before + 1
            head, rec = setup.app.raw_heads[-1], setup.app.requests[-1]
        seen[version] = (head.decode("latin-1"), rec.body_len, rec.body_sha)
    assert seen["--http2"][0] == seen["--http1.1"][0], "the request heads differ"
    assert seen["--http2"][1:] == seen["--http1.1"][1:], "the bodies differ"
