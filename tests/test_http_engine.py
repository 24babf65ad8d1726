"""The HTTP/1.1 engine end to end, over real TLS connections: keep-alive, pipelining, HEAD,
Date/Server, ``Expect: 100-continue``, limits (414, 431, 413), the header and keep-alive
timeouts, malformed framing (400 and close), clients that vanish or stop reading.

Requests are written byte for byte by the test (support.clients.HttpConn), so nothing is
normalised or reframed by a client library; curl checks the user-visible cases.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.clients import PeerClosed, client_label, curl_site, fetch, request_bytes, tls_conn
from support.configs import route, site_config, toml_lines
from support.logs import wait_conn
from support.pki import Pki
from support.proc import family_rss, open_fds
from support.process import Sniport, start_sniport
from support.waiting import wait_until

HOST = "eng.http.test"
SMALL = {"a.txt": b"alpha\n", "b.txt": b"bravo bravo\n", "c.txt": b"charlie charlie charlie\n"}
BIG_SIZE = 1024 * 1024 + 17  # over the engine's 256 KiB small-file limit: streamed


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    big: bytes

    @property
    def port(self) -> int:
        return self.s.port


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("http_engine")
    chain, key = pki.cert(HOST, directory=tmp / "certs")
    www = tmp / "www"
    www.mkdir()
    for name, data in SMALL.items():
        (www / name).write_bytes(data)
    big = os.urandom(BIG_SIZE)
    (www / "big.bin").write_bytes(big)
    routes = (route("/", static={"root": www})
              + route("/echo", max_body_size="1K", respond={"status": 200, "body": "posted"}))
    config = site_config("eng", [HOST], (chain, key), routes,
                         server=toml_lines(header_timeout="1s", keepalive_timeout="2s"))
    with start_sniport(config, tmp) as s:
        yield Setup(s, pki, big)


def get(path: str, *, method: str = "GET",
        headers: Sequence[tuple[str, str]] = ()) -> bytes:
    return request_bytes(path, HOST, method=method, headers=headers)


# --------------------------------------------------------------------------------------------
# Keep-alive, pipelining, HEAD, Date and Server


def test_keep_alive_serves_several_requests_on_one_connection(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        label = client_label(c)
        for name, data in [*SMALL.items(), ("a.txt", SMALL["a.txt"])]:
            c.send(get(f"/{name}"))
            r = c.response()
            assert (r.status, r.body) == (200, data)
            assert r.header("Connection") is None
            assert r.header("Content-Length") == str(len(data))
        c.send(get("/echo", headers=[("Connection", "close")]))
        r = c.response()
        assert (r.status, r.body, r.header("Connection")) == (200, b"posted", "close")
        assert c.closed_within(5.0)
    assert wait_conn(setup.s, client=label)["end"] == "close_requested"


def test_pipelined_requests_answered_in_order(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        # One write: four requests, one a HEAD whose answer must carry no body.
        c.send(get("/a.txt") + get("/b.txt", method="HEAD") + get("/c.txt") + get("/echo"))
        first, second, third, fourth = (c.response(), c.response(method="HEAD"),
                                        c.response(), c.response())
        assert (first.status, first.body) == (200, SMALL["a.txt"])
        assert (second.status, second.body) == (200, b"")
        assert second.header("Content-Length") == str(len(SMALL["b.txt"]))
        assert (third.status, third.body) == (200, SMALL["c.txt"])
        assert (fourth.status, fourth.body) == (200, b"posted")
        # And a pipeline whose first answer is streamed (a file over 256 KiB).
        c.send(get("/big.bin") + get("/a.txt"))
        big, small = c.response(), c.response()
        assert big.status == 200 and big.body == setup.big
        assert (small.status, small.body) == (200, SMALL["a.txt"])
        c.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)  # nothing more: exactly one response per request


def test_head_has_no_body_and_the_same_length(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        for path, size in (("/b.txt", len(SMALL["b.txt"])), ("/big.bin", BIG_SIZE),
                           ("/echo", len(b"posted"))):
            c.send(get(path))
            full = c.response()
            c.send(get(path, method="HEAD"))
            head = c.response(method="HEAD")
            assert full.status == head.status == 200
            assert full.header("Content-Length") == head.header("Content-Length") == str(size)
            assert head.header("Content-Type") == full.header("Content-Type")
            assert head.header("ETag") == full.header("ETag")
            assert head.header("Transfer-Encoding") is None
        # No stray body bytes were sent: the next response parses from its first byte.
        c.send(get("/a.txt"))
        r = c.response()
        assert r.raw_head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert r.body == SMALL["a.txt"]


def test_date_and_server_headers(setup: Setup) -> None:
    for path in ("/a.txt", "/echo", "/missing"):
        before = time.time()
        r = fetch(setup.port, HOST, setup.pki.client_context(), path)
        after = time.time()
        assert r.header("Server") == "sniport"
        assert len(r.all("Date")) == 1
        date = r.header("Date") or ""
        assert date.endswith(" GMT")
        stamp = email.utils.parsedate_to_datetime(date).timestamp()
        assert int(before) - 1 <= stamp <= after + 1
        assert r.raw_head.index(b"\r\nServer: ") < r.raw_head.index(b"\r\nDate: ")


def test_curl_keep_alive_reuses_the_connection(setup: Setup) -> None:
    url = f"https://{HOST}:{setup.port}"
    r = curl_site(setup.pki, setup.port, HOST, "/a.txt", "-v", "-o", "/dev/null",
                  "-o", "/dev/null", f"{url}/b.txt", "-w", "%{num_connects}\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1", b"0"]
    assert b"Re-using existing connection" in r.stderr


# --------------------------------------------------------------------------------------------
# Expect: 100-continue


def test_expect_100_continue_on_a_respond_route(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(get("/echo", method="POST", headers=[("Content-Length", "5"),
                                                     ("Expect", "100-continue")]))
        # The body is not sent yet: the server answers 100 Continue (then the final status
        # once the body is in) or the final status at once (then the body is not expected).
        r = c.response(skip_1xx=False)
        if r.status == 100:
            c.send(b"hello")
            r = c.response()
            assert (r.status, r.body) == (200, b"posted")
            c.send(get("/a.txt"))
        else:
            assert (r.status, r.body) == (200, b"posted")
            c.send(b"hello" + get("/a.txt"))
        r = c.response()
        assert (r.status, r.body) == (200, SMALL["a.txt"])
    # curl sends Expect and waits; the answer comes before its 1 s expect timeout.
    out = curl_site(setup.pki, setup.port, HOST, "/echo", "-v", "-H", "Expect: 100-continue",
                    "--data-binary", "x" * 600)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"posted"
    assert b"> Expect: 100-continue" in out.stderr
    assert b"Done waiting for 100-continue" not in out.stderr


def test_expect_100_continue_over_the_limit_gets_413_not_100(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(get("/echo", method="POST", headers=[("Content-Length", "5000"),
                                                     ("Expect", "100-continue")]))
        r = c.response(skip_1xx=False)
        assert r.status == 413
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)


# --------------------------------------------------------------------------------------------
# Limits: 414, 431, 413


def test_request_target_over_8_kib_gets_414(setup: Setup) -> None:
    ok_target = "/echo?" + "q" * (8192 - len("/echo?"))
    assert len(ok_target) == 8192
    r = fetch(setup.port, HOST, setup.pki.client_context(), ok_target)
    assert (r.status, r.body) == (200, b"posted")
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(get(ok_target + "q"))
        r = c.response()
        assert r.status == 414
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)


@pytest.mark.parametrize("shape", ["one_header", "many_headers"])
def test_header_section_over_16_kib_gets_431(setup: Setup, shape: str) -> None:
    if shape == "one_header":
        small = [("X-Pad", "p" * 15_000)]
        large = [("X-Pad", "p" * 17_000)]
    else:
        small = [(f"X-Pad-{i}", "p" * 500) for i in range(28)]  # ~14.5 KB
        large = [(f"X-Pad-{i}", "p" * 500) for i in range(36)]  # ~18.6 KB
    assert sum(len(k) + len(v) + 4 for k, v in large) > 16 * 1024
    r = fetch(setup.port, HOST, setup.pki.client_context(), "/echo", headers=small)
    assert r.status == 200
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(get("/echo", headers=large))
        r = c.response()
        assert r.status == 431, f"a {shape} header section of ~17-19 KB got {r.status}"
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)


def test_content_length_over_max_body_size_gets_413(setup: Setup) -> None:
    r = fetch(setup.port, HOST, setup.pki.client_context(), "/echo", method="POST",
              body=b"b" * 1024)
    assert (r.status, r.body) == (200, b"posted")
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        label = client_label(c)
        c.send(get("/echo", method="POST", headers=[("Content-Length", "1025")]))
        r = c.response()
        assert r.status == 413
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)
    assert wait_conn(setup.s, client=label)["end"] == "body_too_large"


def test_chunked_body_growing_over_max_body_size_gets_413(setup: Setup) -> None:
    chunks = b"".join(b"200\r\n" + b"c" * 512 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        # Head and the whole 3 KiB body in one write: the server has it all at once.
        c.send(get("/echo", method="POST", headers=[("Transfer-Encoding", "chunked")])
               + chunks + get("/a.txt"))
        r = c.response()
        assert r.status == 413, f"a 3 KiB chunked body over a 1 KiB limit got {r.status}"
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)


# --------------------------------------------------------------------------------------------
# Timeouts


def test_header_timeout_gets_408_and_close(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        label = client_label(c)
        started = time.monotonic()
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: eng.ht")  # half a head, then silence
        r = c.response()
        waited = time.monotonic() - started
        assert r.status == 408
        assert r.header("Connection") == "close"
        assert 0.9 <= waited < 3.0, waited
        assert c.closed_within(5.0)
    assert wait_conn(setup.s, client=label)["end"] == "header_timeout"


def test_header_timeout_also_after_a_request(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(get("/a.txt"))
        assert c.response().status == 200
        started = time.monotonic()
        c.send(b"GET /b.txt HTTP/1.1\r\n")
        r = c.response()
        assert r.status == 408
        assert 0.9 <= time.monotonic() - started < 3.0
        assert c.closed_within(5.0)


def test_keepalive_timeout_closes_an_idle_connection(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        label = client_label(c)
        c.send(get("/a.txt"))
        assert c.response().status == 200
        started = time.monotonic()
        assert not c.closed_within(1.5), "closed before keepalive_timeout (2s)"
        assert c.closed_within(3.0), "still open well after keepalive_timeout (2s)"
        assert 1.9 <= time.monotonic() - started < 4.5
    assert wait_conn(setup.s, client=label)["end"] == "keepalive_timeout"


# --------------------------------------------------------------------------------------------
# Malformed framing: 400 and close


BAD = {
    "content_length_and_transfer_encoding":
        b"POST /echo HTTP/1.1\r\nHost: eng.http.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_differing_content_lengths":
        b"POST /echo HTTP/1.1\r\nHost: eng.http.test\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
    "bad_chunk_size":
        b"POST /echo HTTP/1.1\r\nHost: eng.http.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n",
    "http11_without_host":
        b"GET /echo HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
    "two_hosts":
        b"GET /echo HTTP/1.1\r\nHost: eng.http.test\r\nHost: eng.http.test\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_request_gets_400_and_close(setup: Setup, case: str) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        label = client_label(c)
        c.send(BAD[case] + get("/a.txt"))  # a request after it must never be answered
        r = c.response()
        assert r.status == 400, f"{case}: got {r.status} {r.body!r}"
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)
    rec = wait_conn(setup.s, client=label)
    assert rec["end"] != "eof"


def test_http10_without_host_is_served(setup: Setup) -> None:
    with tls_conn(setup.port, HOST, setup.pki.client_context()) as c:
        c.send(b"GET /a.txt HTTP/1.0\r\n\r\n")
        r = c.response()
        assert (r.status, r.body) == (200, SMALL["a.txt"])
        assert r.version == "HTTP/1.1"
        assert r.header("Connection") == "close"
        assert c.closed_within(5.0)


# --------------------------------------------------------------------------------------------
# Clients that vanish or stop reading (a separate sniport with the default timeouts)


BULK_SIZE = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def bulk(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("http_bulk")
    chain, key = pki.cert(HOST, directory=tmp / "certs")
    www = tmp / "www"
    www.mkdir()
    with open(www / "huge.bin", "wb") as f:
        f.truncate(BULK_SIZE)  # sparse: reads as zeros, costs no disk
    (www / "a.txt").write_bytes(SMALL["a.txt"])
    # One worker: the tests count descriptors after a warm-up request, and libuv opens a
    # reserve descriptor (/dev/null, for EMFILE) in each worker on its first connection.
    config = site_config("bulk", [HOST], (chain, key), route("/", static={"root": www}),
                         server="workers = 1")
    with start_sniport(config, tmp) as s:
        yield Setup(s, pki, b"")


def _settle_fds(pid: int, baseline: int) -> None:
    wait_until(lambda: open_fds(pid) <= baseline, 5.0, f"sniport's descriptors back to {baseline}")


def test_client_disconnecting_mid_response_frees_everything(bulk: Setup) -> None:
    pid = bulk.s.proc.pid
    assert fetch(bulk.port, HOST, bulk.pki.client_context(), "/a.txt").status == 200
    baseline = open_fds(pid)
    labels = {}
    for abortive in (False, True):
        c = tls_conn(bulk.port, HOST, bulk.pki.client_context())
        labels["reset" if abortive else "fin"] = client_label(c)
        c.send(get("/huge.bin"))
        head = c.head()
        assert head.status == 200 and head.header("Content-Length") == str(BULK_SIZE)
        got = len(c.buf)
        while got < 256 * 1024:
            got += len(c.sock.recv(65536))
        if abortive:  # a reset rather than a FIN
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    # Descriptors back where they were, and the next client is served.
    _settle_fds(pid, baseline)
    r = fetch(bulk.port, HOST, bulk.pki.client_context(), "/a.txt")
    assert (r.status, r.body) == (200, SMALL["a.txt"])
    for how, label in labels.items():
        rec = wait_conn(bulk.s, client=label)
        assert rec["end"] != "eof", rec
        # What was handed to TLS for this client: the socket buffers' worth, not the whole
        # file read, encrypted and thrown away after the client left.
        assert int(rec["down"]) < 16 * 1024 * 1024, (
            f"client closed with a {how} after ~256 KiB of a {BULK_SIZE}-byte file: "
            f"down={rec['down']} end={rec['end']} duration={rec['duration']}")


def test_client_that_stops_reading_does_not_grow_memory(bulk: Setup) -> None:
    pid = bulk.s.proc.pid
    assert fetch(bulk.port, HOST, bulk.pki.client_context(), "/a.txt").status == 200
    before = family_rss(pid)
    with tls_conn(bulk.port, HOST, bulk.pki.client_context()) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(get("/huge.bin"))
        head = c.head()
        assert head.status == 200
        # Stop reading. Give sniport time to fill every buffer it is willing to fill.
        time.sleep(1.5)
        stalled = family_rss(pid)
        # Meanwhile others are served.
        r = fetch(bulk.port, HOST, bulk.pki.client_context(), "/a.txt")
        assert (r.status, r.body) == (200, SMALL["a.txt"])
        # Then read it all: every byte arrives, in order (the file is all zeros).
        digest = hashlib.sha256(bytes(c.buf))
        got = len(c.buf)
        c.buf.clear()
        while got < BULK_SIZE:
            chunk = c.sock.recv(1 << 20)
            if not chunk:
                raise PeerClosed(f"closed after {got} of {BULK_SIZE} bytes")
            digest.update(chunk)
            got += len(chunk)
        assert got == BULK_SIZE
        assert digest.hexdigest() == hashlib.sha256(bytes(BULK_SIZE)).hexdigest()
        after = family_rss(pid)
    grown = stalled - before
    assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB while stalled"
    assert after - before < 40 * 1024 * 1024


def test_file_truncated_mid_response_closes_without_second_response(bulk: Setup) -> None:
    www = Path(bulk.s.config).parent / "www"
    target = www / "shrinking.bin"
    head_bytes = os.urandom(1024 * 1024)
    with open(target, "wb") as f:
        f.write(head_bytes)
        f.truncate(48 * 1024 * 1024)  # the rest sparse: zeros
    with tls_conn(bulk.port, HOST, bulk.pki.client_context()) as c:
        label = client_label(c)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(get("/shrinking.bin") + get("/a.txt"))
        head = c.head()
        assert head.status == 200 and head.header("Content-Length") == str(48 * 1024 * 1024)
        time.sleep(0.3)  # sniport has filled the socket buffers and waits for the reader
        os.truncate(target, 2 * 1024 * 1024)
        rest = c.read_to_close()
    assert 2 * 1024 * 1024 <= len(rest) < 48 * 1024 * 1024
    # Only the file's bytes, in order, then the close: no error response after them, and
    # the pipelined request behind it is not answered.
    assert rest[: len(head_bytes)] == head_bytes
    assert rest[len(head_bytes):] == bytes(len(rest) - len(head_bytes))
    rec = wait_conn(bulk.s, client=label)
    assert rec["end"] == "file_truncated"
