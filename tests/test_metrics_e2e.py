"""Issue 11 item 3: /metrics served by the master, summing every worker, never going down.

One sniport with two workers, a site and a passthrough block, ``metrics_listen`` on port 0.
The tests send traffic whose counts they know (over new connections, so both workers get
some), scrape with a real client, and parse the text with prometheus_client's parser
(independent of our renderer); then reload and scrape again, and scrape all through a
reload: no counter ever decreases.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.backends import TlsBackend, start_tls_backend
from support.clients import fetch
from support.configs import route, site_block, toml_lines
from support.pki import Pki
from support.process import Sniport, start_sniport

SITE = "site.metrics.test"
PT = "pt.metrics.test"
Sample = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    backend: TlsBackend
    url: str
    config: Path
    text: str


def config_text(tmp: Path, pki: Pki, backend: TlsBackend, body: str) -> str:
    return ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=2,
                                      state_dir=tmp / "state", metrics_listen="127.0.0.1:0",
                                      access_log="off")
            + "\n" + site_block("site", [SITE], pki.cert(SITE, directory=tmp / "certs"),
                                route("/", respond={"body": body}))
            + "[[passthrough]]\n" + toml_lines(name="pt", hosts=[PT],
                                               upstreams=[backend.address]))


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("metrics_e2e")
    backend = start_tls_backend(pki, PT)
    text = config_text(tmp, pki, backend, "one")
    s = start_sniport(text, tmp)
    try:
        port = s.wait_log(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1)
        yield Setup(s, pki, backend, f"http://127.0.0.1:{port}/metrics", tmp / "sniport.toml",
                    text)
    finally:
        s.stop()
        backend.close()


def scrape(url: str) -> dict[Sample, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counters(samples: dict[Sample, float]) -> dict[Sample, float]:
    return {k: v for k, v in samples.items()
            if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def test_traffic_is_counted_exactly_over_both_workers(setup: Setup) -> None:
    before = scrape(setup.url)
    ctx = setup.pki.client_context()
    for _ in range(10):  # HTTP/1.1, new connections: both workers take some
        assert fetch(setup.s.port, SITE, ctx, "/").status == 200
    h2 = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(setup.pki.ca_file),
                         "--resolve", f"{SITE}:{setup.s.port}:127.0.0.1",
                         f"https://{SITE}:{setup.s.port}/a", f"https://{SITE}:{setup.s.port}/b"],
                        capture_output=True, text=True, timeout=20)
    assert h2.returncode == 0 and h2.stdout == "oneone", h2.stderr
    for _ in range(3):  # passthrough: 3 bytes up, the name back down
        with socket.create_connection(("127.0.0.1", setup.s.port), timeout=10) as raw, \
                setup.pki.client_context().wrap_socket(raw, server_hostname=PT) as tls:
            tls.sendall(b"WHO")
            assert tls.recv(100) == PT.encode()
    for _ in range(2):  # a name nobody claims: rejected
        with socket.create_connection(("127.0.0.1", setup.s.port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="nobody.test")
    with socket.create_connection(("127.0.0.1", setup.s.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # not a ClientHello
        with contextlib.suppress(ConnectionResetError):  # closed with bytes unread
            raw.recv(10)
    time.sleep(1.5)  # the relays' and closes' counts land when those connections end
    after = scrape(setup.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    listener = "127.0.0.1:0"  # as the config names it (labels come from the config)
    assert delta("sniport_http_requests_total", site="site", route="/", status="2xx",
                 protocol="HTTP/1.1") == 10
    assert delta("sniport_http_requests_total", site="site", route="/", status="2xx",
                 protocol="HTTP/2.0") == 2
    assert delta("sniport_http_request_duration_seconds_count", site="site", route="/") == 12
    assert delta("sniport_tls_handshakes_total", site="site") == 11
    assert delta("sniport_connections_total", listener=listener, decision="terminate",
                 block="site") == 11
    assert delta("sniport_connections_total", listener=listener, decision="passthrough",
                 block="pt") == 3
    assert delta("sniport_connections_total", listener=listener, decision="reject",
                 block="") == 2
    assert delta("sniport_passthrough_bytes_total", block="pt", direction="up") > 3 * 3
    assert delta("sniport_passthrough_bytes_total", block="pt", direction="down") > 3 * len(PT)
    assert delta("sniport_clienthello_failures_total", reason="bad_record") + \
        delta("sniport_clienthello_failures_total", reason="other") + \
        delta("sniport_clienthello_failures_total", reason="truncated") == 1
    assert value(after, "sniport_open_connections", listener=listener) == 0
    assert value(after, "sniport_upstream_healthy_workers", upstream=setup.backend.address) == 2
    assert value(after, "sniport_certificate_not_after_seconds", site="site") > time.time()


def test_counters_never_go_down_across_reloads_even_while_scraped(setup: Setup) -> None:
    ctx = setup.pki.client_context()
    for _ in range(6):
        fetch(setup.s.port, SITE, ctx, "/")
    seen: list[dict[Sample, float]] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            seen.append(counters(scrape(setup.url)))
            time.sleep(0.02)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        for body in ("two", "three"):
            setup.config.write_text(setup.text.replace('body = "one"', f'body = "{body}"'))
            mark = setup.s.mark()
            setup.s.signal(signal.SIGHUP)
            setup.s.wait_log(r"reloaded \S+ \(generation \d+\)", start=mark)
            time.sleep(0.3)
            for _ in range(4):  # the new generation's workers count too
                assert fetch(setup.s.port, SITE, ctx, "/").body == body.encode()
        time.sleep(1.0)  # the old workers drain and are retired
    finally:
        stop.set()
        thread.join(10)
    assert len(seen) > 10
    for earlier, later in itertools.pairwise(seen):
        for key, v in earlier.items():
            assert later.get(key, 0.0) >= v, (key, v, later.get(key))
    last = counters(scrape(setup.url))
    assert value(last, "sniport_config_reloads_total", result="ok") >= 2
    total = sum(v for (name, labels), v in last.items()
                if name == "sniport_http_requests_total")
    assert total >= 6 + 8


def test_metrics_listen_moves_with_a_reload_and_stays_when_the_reload_fails(
        setup: Setup) -> None:
    """Found in review: a reload that failed after binding the new /metrics address had
    already closed the old one. Now the new address is bound first (a failure changes
    nothing) and takes over only when the new generation serves."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        setup.config.write_text(setup.text.replace('metrics_listen = "127.0.0.1:0"',
                                                   f'metrics_listen = "127.0.0.1:{port}"'))
        mark = setup.s.mark()
        setup.s.signal(signal.SIGHUP)
        setup.s.wait_log(r"reload failed", start=mark)
        assert scrape(setup.url)  # the old address still answers
    finally:
        taken.close()
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    setup.config.write_text(setup.text.replace('metrics_listen = "127.0.0.1:0"',
                                               f'metrics_listen = "127.0.0.1:{port}"'))
    mark = setup.s.mark()
    setup.s.signal(signal.SIGHUP)
    setup.s.wait_log(r"reloaded \S+ \(generation \d+\)", start=mark)
    time.sleep(1.1)  # a render is reused for a second (supervisor.RENDER_EVERY)
    moved = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(moved, "sniport_config_reloads_total", result="failed") >= 1
    with pytest.raises(OSError):
        scrape(setup.url)  # the old one is closed
    setup.config.write_text(setup.text)
