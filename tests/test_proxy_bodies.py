"""Reverse proxy, bodies: 20 MB up and down with the right sha256, framed by Content-Length
or chunks, both ways; close-delimited responses; Expect: 100-continue; trailers on either
side; HEAD, 204 and 304 answers, after which the connection goes on.

Clients: a raw HTTP/1.1 client over TLS, http.client, and curl.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.backends import App, echo_of, stopping
from support.clients import HttpConn, curl_site, http_client, request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.data import pattern, pattern_sha256
from support.pki import Pki
from support.process import Sniport, start_sniport

MB20 = 20 * 1024 * 1024


@dataclass
class Setup:
    s: Sniport
    app: App
    pki: Pki
    tmp: Path

    def conn(self) -> HttpConn:
        return tls_conn(self.s.port, HOST, self.pki.client_context(), timeout=30)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_bodies")
    app = App("bodies")
    with stopping([app]), start_sniport(proxy_site_config(pki, tmp, proxy_route("/", [app.url])),
                                        tmp) as s:
        yield Setup(s, app, pki, tmp)


def _send_pattern(c: HttpConn, n: int, piece: int = 1 << 20) -> None:
    for p in pattern(n, piece):
        c.sock.sendall(p)


def _chunked(n: int, sizes: tuple[int, ...]) -> Iterator[bytes]:
    """pattern(n) as chunks of the given sizes in turn (without the last-chunk)."""
    stream = pattern(n)
    buf = bytearray()
    left, i = n, 0
    while left:
        size = min(left, sizes[i % len(sizes)])
        i += 1
        while len(buf) < size:
            buf += next(stream)
        yield b"%x\r\n" % size + bytes(buf[:size]) + b"\r\n"
        del buf[:size]
        left -= size


# --------------------------------------------------------------------------------------------
# Uploads


def test_upload_20mb_content_length(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(f"POST /up/cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {MB20}\r\n"
               "Content-Type: application/octet-stream\r\n\r\n".encode())
        _send_pattern(c, MB20, piece=65536 + 17)
        r = c.response()
    assert r.status == 200
    echo = echo_of(r.body)
    assert (echo["body_len"], echo["body_sha256"]) == (MB20, pattern_sha256(MB20))
    assert echo["chunked"] is False
    assert [v for k, v in echo["headers"] if k.lower() == "content-length"] == [str(MB20)]


def test_upload_20mb_chunked_with_trailers(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(f"POST /up/chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n"
               "Trailer: X-Sum\r\n\r\n".encode())
        for chunk in _chunked(MB20, (1, 4096, 1 << 20, 3, 300_000)):
            c.sock.sendall(chunk)
        c.send(b"0\r\nX-Sum: " + pattern_sha256(MB20).encode() + b"\r\n\r\n")
        r = c.response()
        assert r.status == 200
        echo = echo_of(r.body)
        assert (echo["body_len"], echo["body_sha256"]) == (MB20, pattern_sha256(MB20))
        assert echo["chunked"] is True  # the length was unknown: chunked to the upstream too
        assert [k.lower() for k, _ in echo["headers"]].count("transfer-encoding") == 1
        # The message ended where it should: the same connection carries the next request.
        c.send(request_bytes("/after/trailers", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/after/trailers"


def test_upload_small_chunked_body(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(f"PUT /up/small HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n".encode())
        r = c.response()
    assert r.status == 200
    echo = echo_of(r.body)
    assert echo["method"] == "PUT"
    assert (echo["body_len"], echo["body_sha256"]) == (
        11, hashlib.sha256(b"hello world").hexdigest())


def test_upload_20mb_with_curl(setup: Setup) -> None:
    path = setup.tmp / "upload.bin"
    with path.open("wb") as f:
        for p in pattern(MB20):
            f.write(p)
    # curl sends "Expect: 100-continue" for a body this large and waits for the 100.
    r = curl_site(setup.pki, setup.s.port, HOST, "/up/curl", "--data-binary", f"@{path}",
                  "-H", "Content-Type: application/octet-stream", "-w", "\n%{http_code}",
                  timeout=30)
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"200"
    echo = echo_of(body)
    assert (echo["body_len"], echo["body_sha256"]) == (MB20, pattern_sha256(MB20))


def test_expect_100_continue(setup: Setup) -> None:
    n = 1 << 20
    with setup.conn() as c:
        c.send(f"POST /up/expect HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {n}\r\n"
               "Expect: 100-continue\r\n\r\n".encode())
        # The body is not sent until the 100 arrives (the read times out after TIMEOUT).
        interim = c.head()
        assert interim.status == 100
        assert interim.raw_head.startswith(b"HTTP/1.1 100 ")
        _send_pattern(c, n)
        r = c.head()
        assert r.status == 200  # exactly one interim response, then the final one
        length = int(r.header("Content-Length") or -1)
        echo = echo_of(c._exactly(length))
    assert (echo["body_len"], echo["body_sha256"]) == (n, pattern_sha256(n))


# --------------------------------------------------------------------------------------------
# Downloads


def test_download_20mb_content_length(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(request_bytes(f"/d/_/download/{MB20}/cl", HOST))
        r = c.response()
    assert r.status == 200
    assert r.all("Content-Length") == [str(MB20)]
    assert r.all("Transfer-Encoding") == []
    assert (len(r.body), hashlib.sha256(r.body).hexdigest()) == (MB20, pattern_sha256(MB20))


def test_download_20mb_chunked_with_http_client(setup: Setup) -> None:
    conn = http_client(setup.s.port, setup.pki.client_context(), HOST, timeout=30)
    try:
        conn.request("GET", f"/d/_/download/{MB20}/chunked")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        h = hashlib.sha256()
        total = 0
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            total += len(chunk)
        assert (total, h.hexdigest()) == (MB20, pattern_sha256(MB20))
        # And the connection is still good for another request.
        conn.request("GET", "/d/again")
        again = conn.getresponse()
        assert again.status == 200
        assert json.loads(again.read())["target"] == "/d/again"
    finally:
        conn.close()


def test_download_20mb_chunked_with_curl(setup: Setup) -> None:
    out = setup.tmp / "download.bin"
    r = curl_site(setup.pki, setup.s.port, HOST, f"/d/_/download/{MB20}/chunked",
                  "-o", str(out), "-w", "%{http_code} %{size_download}", timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"200 {MB20}".encode()
    h = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    assert h.hexdigest() == pattern_sha256(MB20)


def test_close_delimited_response_is_reframed(setup: Setup) -> None:
    n = 5 * 1024 * 1024 + 3
    with setup.conn() as c:
        c.send(request_bytes(f"/d/_/download/{n}/close", HOST))
        r = c.response()
        assert r.status == 200
        assert (len(r.body), hashlib.sha256(r.body).hexdigest()) == (n, pattern_sha256(n))
        # The upstream's close ended its body; the client's connection was framed by
        # sniport and goes on.
        c.send(request_bytes("/d/after-close", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/d/after-close"


def test_response_trailers_do_not_break_the_message(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(request_bytes("/t/_/trailers", HOST, headers=[("TE", "trailers")]))
        r = c.response()
        assert r.status == 200
        assert r.body == b"hello world"
        c.send(request_bytes("/t/after", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/t/after"
    r2 = curl_site(setup.pki, setup.s.port, HOST, "/t/_/trailers")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == b"hello world"


# --------------------------------------------------------------------------------------------
# Responses without a body


def test_head_response_ends_at_the_head(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(request_bytes("/h/x", HOST, method="HEAD"))
        r = c.response(method="HEAD")
        assert r.status == 200
        length = r.header("Content-Length")
        assert length is not None and int(length) > 100  # the GET's length, no body
        c.send(request_bytes("/h/next", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/h/next"
        assert setup.app.last().method == "GET"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_end_at_the_head(setup: Setup, status: int) -> None:
    with setup.conn() as c:
        c.send(request_bytes(f"/s/_/status/{status}", HOST))
        r = c.response()
        assert r.status == status
        assert r.all("Content-Length") == []
        assert r.all("Transfer-Encoding") == []
        assert r.all("X-App") == ["bodies"]
        if status == 304:
            assert r.all("ETag") == ['"v1"']
        c.send(request_bytes("/s/next", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/s/next"


def test_big_request_and_response_on_one_keepalive_connection(setup: Setup) -> None:
    """A 4 MiB upload then a 4 MiB download then a small request, pipelined on one
    connection: each answer is whole and in order."""
    n = 4 * 1024 * 1024
    with setup.conn() as c:
        c.send(f"POST /k/1 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {n}\r\n\r\n".encode())
        _send_pattern(c, n)
        c.send(request_bytes(f"/k/_/download/{n}/cl", HOST) + request_bytes("/k/3", HOST))
        first = c.response()
        second = c.response()
        third = c.response()
    assert echo_of(first.body)["body_sha256"] == pattern_sha256(n)
    assert hashlib.sha256(second.body).hexdigest() == pattern_sha256(n)
    assert echo_of(third.body)["target"] == "/k/3"


def test_interim_responses_from_the_upstream_leave_one_final_response(setup: Setup) -> None:
    with setup.conn() as c:
        c.send(request_bytes("/i/_/interim", HOST))
        heads = [c.head()]
        while heads[-1].status < 200:
            heads.append(c.head())
        final = heads[-1]
        assert final.status == 200
        assert all(100 <= h.status < 200 for h in heads[:-1])
        body = c._exactly(int(final.header("Content-Length") or -1))
        assert echo_of(body)["target"] == "/i/_/interim"
        c.send(request_bytes("/i/next", HOST))
        r = c.response()
        assert r.status == 200
        assert echo_of(r.body)["target"] == "/i/next"
