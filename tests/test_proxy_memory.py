"""Reverse proxy, bounded memory: 1 GiB streams through sniport, down and up, while the
worker's resident memory (VmRSS, sampled every 20 ms from /proc) stays within a fixed bound
of what it was before. Once at full speed (curl reading as fast as it can), once with a
client that stops reading for a second twice (the upstream must be held back, not buffered),
and once up, to an application that stops reading for a second.

Measured on the 2-core machine these tests were written on: about 700 MB/s through
sniport with curl, so each 1 GiB transfer takes 1.5-2.5 s (plus the deliberate pauses).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import App, echo_of, stopping
from support.clients import curl_site, request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.data import pattern, pattern_sha256
from support.pki import Pki
from support.proc import RssSampler, children, rss
from support.process import Sniport, start_sniport

GIB = 1 << 30
BOUND = 64 * 1024 * 1024  # RSS growth allowed while 1 GiB passes
MB16 = 16 * 1024 * 1024


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    app: App
    worker: int

    def baseline(self) -> int:
        return rss(self.worker)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_memory")
    app = App("big")
    with stopping([app]), start_sniport(proxy_site_config(pki, tmp, proxy_route("/", [app.url])),
                                        tmp) as s:
        workers = children(s.pid)
        assert len(workers) == 1, workers
        st = Setup(s, pki, app, workers[0])
        # Warm up: buffers, TLS, the pool, both directions, so that the baseline is steady.
        r = curl_site(pki, s.port, HOST, f"/_/download/{MB16}/cl", "-o", "/dev/null")
        assert r.returncode == 0, r.stderr
        with tls_conn(s.port, HOST, pki.client_context(), timeout=30) as c:
            c.send(f"POST /warm HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {MB16}\r\n\r\n"
                   .encode())
            for piece in pattern(MB16):
                c.sock.sendall(piece)
            assert c.response().status == 200
        yield st


def _growth(samples: list[int], base: int) -> str:
    return f"RSS {base / 2**20:.1f} MiB before, {max(samples) / 2**20:.1f} MiB at most"


def test_1gib_download_with_curl_in_bounded_memory(setup: Setup) -> None:
    base = setup.baseline()
    t = time.monotonic()
    with RssSampler(setup.worker) as sampler:
        r = curl_site(setup.pki, setup.s.port, HOST, f"/_/download/{GIB}/cl", "-o",
                      "/dev/null", "-w", "%{http_code} %{size_download}", timeout=30)
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"200 {GIB}".encode()
    assert len(sampler.samples) >= 10
    assert max(sampler.samples) - base < BOUND, _growth(sampler.samples, base)
    assert elapsed < 25, f"1 GiB took {elapsed:.1f}s"


def test_1gib_download_to_a_client_that_pauses(setup: Setup) -> None:
    base = setup.baseline()
    h = hashlib.sha256()
    with RssSampler(setup.worker) as sampler, \
            tls_conn(setup.s.port, HOST, setup.pki.client_context(), timeout=30) as c:
        c.send(request_bytes(f"/_/download/{GIB}/cl", HOST))
        head = c.head()
        assert head.status == 200
        assert head.header("Content-Length") == str(GIB)
        h.update(c.buf)
        got = len(c.buf)
        pauses = [GIB // 4, 3 * GIB // 4]
        while got < GIB:
            data = c.sock.recv(min(1 << 20, GIB - got))
            assert data, f"closed after {got} bytes"
            h.update(data)
            got += len(data)
            if pauses and got >= pauses[0]:
                pauses.pop(0)
                time.sleep(1.0)  # the client stops reading; the upstream keeps sending
    assert (got, h.hexdigest()) == (GIB, pattern_sha256(GIB))
    assert max(sampler.samples) - base < BOUND, _growth(sampler.samples, base)


def test_1gib_upload_to_an_application_that_pauses(setup: Setup) -> None:
    base = setup.baseline()
    with RssSampler(setup.worker) as sampler, \
            tls_conn(setup.s.port, HOST, setup.pki.client_context(), timeout=30) as c:
        c.send(f"PUT /up?pause_at={GIB // 3} HTTP/1.1\r\nHost: {HOST}\r\n"
               f"Content-Length: {GIB}\r\n\r\n".encode())
        for piece in pattern(GIB):
            c.sock.sendall(piece)
        r = c.response()
    assert r.status == 200
    echo = echo_of(r.body)
    assert (echo["body_len"], echo["body_sha256"]) == (GIB, pattern_sha256(GIB))
    assert max(sampler.samples) - base < BOUND, _growth(sampler.samples, base)
