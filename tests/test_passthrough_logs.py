"""The idle timeout, and the connection log line: every field, checked against what the
client put on the wire; text and JSON."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import RawTls
from support.configs import passthrough_config, toml_lines
from support.logs import CONN_FIELDS, json_log, wait_conn
from support.pki import Pki
from support.process import Sniport, SniportWith
from support.waiting import TIMEOUT, wait_until

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


def test_idle_relay_is_closed_after_idle_timeout(backend: TlsBackend, pki: Pki,
                                                 sniport_with: SniportWith) -> None:
    s = sniport_with(passthrough_config([backend.address], block='idle_timeout = "1s"'))
    c = RawTls.connect(("127.0.0.1", s.port), pki.client_context(), "vpn.example.com")
    start = time.monotonic()
    c.send_raw(c.hello())
    c.handshake()
    # Traffic every 0.4 s for 1.2 s: each byte restarts the idle clock.
    for i in range(4):
        if i:
            time.sleep(0.4)
        sent = time.monotonic()
        c.write(b"ping %d" % i)
        assert c.read_exactly(6) == b"ping %d" % i
        answered = time.monotonic()
    # sniport's last byte moved between ``sent`` and ``answered``; then nothing for 1 s.
    assert c.read() == b""
    closed = time.monotonic()
    assert closed - sent >= 0.95 and closed - answered < 1.6, (sent, answered, closed)
    c.close()
    rec = wait_conn(s, client=c.label)
    assert rec["end"] == "idle_timeout"
    # The pings kept it open past 1 s: the clock restarts on every byte.
    assert sent - start + 0.95 <= float(rec["duration"]) < answered - start + 1.6


def exchange(port: int, pki: Pki) -> tuple[RawTls, bytes]:
    """A full, cleanly closed TLS conversation with ALPN; every wire byte counted."""
    c = RawTls.connect(("127.0.0.1", port), pki.client_context(alpn=["h2", "http/1.1"]),
                       "vpn.example.com")
    hello = c.hello()
    c.send_raw(hello)
    c.handshake()
    payload = bytes(range(256)) * 40
    c.write(payload)
    assert c.read_exactly(len(payload)) == payload
    c.close_clean()
    return c, hello


def expected_fields(s: Sniport, backend: TlsBackend, c: RawTls, hello: bytes) -> dict[str, object]:
    return {
        "client": c.label,
        "listener": f"127.0.0.1:{s.port}",
        "sni": "vpn.example.com",
        "alpn": "h2,http/1.1",
        "hello": len(hello),
        "route": "passthrough:lan",
        "upstream": backend.address,
        "up": c.sent,
        "down": c.received,
        "end": "eof",
    }


def test_text_log_line_has_every_field(backend: TlsBackend, pki: Pki,
                                       sniport_with: SniportWith) -> None:
    s = sniport_with(passthrough_config([backend.address]))
    c, hello = exchange(s.port, pki)
    rec = wait_conn(s, client=c.label)
    line = next(x for x in s.log().splitlines() if f" client={c.label} " in x)
    assert re.match(rf"{STAMP} conn client=", line), line
    assert list(rec) == CONN_FIELDS
    duration = float(rec.pop("duration"))
    assert 0 <= duration < 2
    assert rec == {k: str(v) for k, v in expected_fields(s, backend, c, hello).items()}
    assert c.received > c.sent > len(hello)


def test_json_log_one_object_per_line(backend: TlsBackend, pki: Pki,
                                      sniport_with: SniportWith) -> None:
    s = sniport_with(passthrough_config([backend.address], server='log_format = "json"'))
    c, hello = exchange(s.port, pki)
    # And a rejected one without SNI, for null fields.
    raw = RawTls.connect(("127.0.0.1", s.port), pki.client_context(check_hostname=False),
                         None)
    raw.send_raw(raw.hello())
    with pytest.raises(ssl.SSLError, match="TLSV1_UNRECOGNIZED_NAME"):
        raw.handshake()
    raw.close()
    wait_until(lambda: len(json_log(s, "conn")) == 2, timeout=TIMEOUT, what="2 JSON lines")
    log = s.log()
    s.stop()
    lines = json_log(s, "conn")
    assert not re.search(rf"{STAMP} conn ", log), "a text conn line in JSON mode"
    good = next(r for r in lines if r["client"] == c.label)
    assert list(good) == ["time", "kind", *CONN_FIELDS]
    assert re.fullmatch(STAMP, str(good.pop("time")))
    assert good.pop("kind") == "conn"
    duration = good.pop("duration")
    assert isinstance(duration, float | int) and 0 <= duration < 2
    assert good == expected_fields(s, backend, c, hello)
    rejected = next(r for r in lines if r["client"] == raw.label)
    assert (rejected["sni"], rejected["hello"], rejected["route"], rejected["up"],
            rejected["down"], rejected["end"]) == (
        None, raw.sent, "reject", 0, 0, "rejected_no_sni")
    assert rejected["upstream"] in (None, "")  # none was chosen
    for line in log.splitlines():
        if line.startswith("{"):
            assert isinstance(json.loads(line), dict)


def test_access_log_to_a_file(backend: TlsBackend, pki: Pki, tmp_path: Path,
                              sniport_with: SniportWith) -> None:
    path = tmp_path / "access.log"
    s = sniport_with(passthrough_config([backend.address], server=toml_lines(access_log=path)))
    c, hello = exchange(s.port, pki)
    wait_until(lambda: path.exists() and f"client={c.label} " in path.read_text(),
               timeout=TIMEOUT, what="the line in the access log file")
    s.stop()
    assert " conn " not in s.log()
    (line,) = path.read_text().splitlines()
    assert re.fullmatch(
        rf"{STAMP} conn client={re.escape(c.label)} listener=127\.0\.0\.1:{s.port} "
        rf"sni=vpn\.example\.com alpn=h2,http/1\.1 hello={len(hello)} route=passthrough:lan "
        rf"upstream={re.escape(backend.address)} up={c.sent} down={c.received} "
        rf"duration=\d+\.\d+ end=eof", line), line
