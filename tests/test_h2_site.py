"""Issue 9: HTTP/2 streams reach the same site rules and handlers as HTTP/1.1 requests.

Proven over real TLS connections with ALPN h2 (``support.h2client``): the Host rule per
stream (a name of another block, passthrough included, is 421 on that stream only); the
proxy streams bodies both ways with flow control and sends a body without content-length
upstream chunked; a reload drains with a GOAWAY naming the last stream, which still finishes;
``http2 = false`` makes ALPN pick HTTP/1.1. Each with both engines behind ``wire/h2.py``'s
interface: libnghttp2 and the pure-Python ``h2`` fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame
from support.backends import App, stopping
from support.configs import (
    passthrough_block,
    proxy_route,
    route,
    server_table,
    site_block,
    toml_lines,
)
from support.data import pattern_bytes
from support.h2client import H2Client, RawH2, h2_socket
from support.pki import Pki
from support.process import Sniport, start_sniport

A, A2, B, PT = "a.h2site.test", "www.a.h2site.test", "b.h2site.test", "pt.h2site.test"


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    a = App("up")
    with stopping([a]):
        yield a


ENGINES = ["nghttp2", "h2"]  # libnghttp2 (the default where installed) and the fallback


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest, pki: Pki, app: App,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    tmp = tmp_path_factory.mktemp("h2site")
    # One certificate for every name: a client may coalesce them on one connection.
    cert = pki.cert(A, A2, B, PT, directory=tmp / "certs")
    text = (server_table(("127.0.0.1:0",), toml_lines(workers=1, state_dir=tmp / "state",
                                                     drain_timeout="10s"))
            + passthrough_block("pt", [PT], ["127.0.0.1:9"])
            + site_block("a", [A, A2], cert,
                         route("/", respond={"status": 200, "body": "site a"})
                         + proxy_route("/app/", [app.url]))
            + site_block("b", [B], cert, route("/", respond={"status": 200, "body": "site b"}),
                         extra=toml_lines(http2=False)))
    s = start_sniport(text, tmp, env={**os.environ, "SNIPORT_H2_ENGINE": request.param})
    s.wait_log(f"HTTP/2 engine: {'libnghttp2' if request.param == 'nghttp2' else 'h2'}")
    yield s
    s.stop()


def client(server: Sniport, pki: Pki, name: str = A) -> H2Client:
    return H2Client(server.port, name, pki.client_context())


def test_421_on_the_stream_only(server: Sniport, pki: Pki) -> None:
    """Streams for another site and a passthrough name, on a connection to site a: each
    gets 421, the others on the same connection are served."""
    c = client(server, pki)
    sids = [c.request("/", authority=name) for name in (A, B, PT, A2, A)]
    got = [(r.status, r.body) for r in c.wait(*sids)]
    assert [s for s, _ in got] == [200, 421, 421, 200, 200]
    assert got[0] == got[3] == got[4] == (200, b"site a")
    assert c.goaway is None
    c.close()


def test_alpn_follows_the_site_http2_key(server: Sniport, pki: Pki) -> None:
    for name, expected in ((A, "h2"), (B, "http/1.1")):
        sock = h2_socket(server.port, name, pki.client_context())
        assert sock.selected_alpn_protocol() == expected
        sock.close()


def test_proxy_streams_an_upload_and_a_download(server: Sniport, pki: Pki, app: App) -> None:
    """5 MiB each way through the proxy, more than any window: flow control both ways.
    The upload has no content-length, so the upstream gets it chunked."""
    body = pattern_bytes(5 << 20)
    c = client(server, pki)
    up = c.get("/app/echo", method="POST", body=body)
    assert up.status == 200
    seen = json.loads(up.body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["chunked"] is True
    down = c.get(f"/app/_/download/{5 << 20}/cl")
    assert down.status == 200 and down.body == pattern_bytes(5 << 20)
    sized = c.get("/app/echo", method="POST", body=b"12345",
                  headers=[("content-length", "5")])
    assert json.loads(sized.body)["headers"].count(["content-length", "5"]) == 1
    c.close()


def test_request_seen_by_the_upstream(server: Sniport, pki: Pki, app: App) -> None:
    """What the upstream receives from an HTTP/2 request: an HTTP/1.1 request with Host from
    :authority, cookie crumbs joined, no te, the usual X-Forwarded-*."""
    c = client(server, pki)
    r = c.get("/app/see?q=1", headers=[("cookie", "a=1"), ("cookie", "b=2"),
                                       ("te", "trailers"), ("x-custom", "v")])
    seen = json.loads(r.body)
    names = [k for k, _ in seen["headers"]]
    assert seen["target"] == "/app/see?q=1" and seen["version"] == "HTTP/1.1"
    assert dict(seen["headers"])["host"] == A
    assert dict(seen["headers"])["cookie"] == "a=1; b=2"
    assert "te" not in names and dict(seen["headers"])["x-custom"] == "v"
    assert dict(seen["headers"])["x-forwarded-proto"] == "https"
    c.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["reload", "stop"])
def test_drain_with_a_goaway_and_the_stream_finishes(pki: Pki, app: App, tmp_path: Path,
                                                     engine: str, sig: int) -> None:
    """A reload (SIGHUP) or a graceful stop (SIGTERM) with a request in flight: GOAWAY
    naming it as the last stream, its response still completes, then the close."""
    cert = pki.cert(A, directory=tmp_path / "certs")
    text = (server_table(("127.0.0.1:0",), toml_lines(workers=1, state_dir=tmp_path / "st",
                                                      drain_timeout="10s"))
            + site_block("a", [A], cert, proxy_route("/", [app.url])))
    s = start_sniport(text, tmp_path, env={**os.environ, "SNIPORT_H2_ENGINE": engine})
    try:
        c = RawH2(s.port, A, pki.client_context())
        c.send_frames(c.headers(1, c.block("/_/slow/1.5")))
        time.sleep(0.3)  # the request is at the upstream, which answers after 1.5 s
        mark = s.mark()
        s.signal(sig)
        s.wait_log("reload" if sig == signal.SIGHUP else "stop|drain", start=mark)
        frames = []
        while (f := c.read_frame()) is not None:
            frames.append(f)
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert [(g.error_code, g.last_stream_id) for g in goaways] == [(0, 1)]
        ends = [f for f in frames if isinstance(f, DataFrame) and "END_STREAM" in f.flags]
        assert [f.stream_id for f in ends] == [1]
        assert frames.index(goaways[0]) < frames.index(ends[0])
        s.wait_log(r"conn .*end=drain")
    finally:
        s.stop()


def test_http11_clients_are_unchanged(server: Sniport, pki: Pki) -> None:
    """A client that offers only http/1.1 gets HTTP/1.1, as before."""
    ctx = pki.client_context()
    sock = h2_socket(server.port, A, ctx, alpn=("http/1.1",))
    assert sock.selected_alpn_protocol() == "http/1.1"
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {A}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"site a")
    sock.close()
    assert isinstance(ctx, ssl.SSLContext)
