"""Upstreams: failover in order, refusal, connect timeout, unix sockets, PROXY protocol."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import Blackhole, TlsBackend, free_port, start_tls_backend
from support.clients import RawTls, client_label, make_hello, wait_closed
from support.configs import passthrough_block, passthrough_config, server_table
from support.logs import wait_conn
from support.pki import Pki
from support.process import Sniport, SniportWith, start_sniport
from support.waiting import TIMEOUT


@pytest.fixture
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


def config(upstreams: list[str]) -> str:
    return passthrough_config(upstreams, block='connect_timeout = "300ms"')


def who(port: int, pki: Pki, name: str = "vpn.example.com") -> tuple[bytes, str]:
    c = RawTls.connect(("127.0.0.1", port), pki.client_context(), name)
    client = client_label(c.sock)
    c.send_raw(c.hello())
    c.handshake()
    answer = c.ask_who()
    return answer, client


def refused_connection(port: int, pki: Pki) -> tuple[bytes, str, float]:
    """Send a hello; return what came back before the close, the client, and the wait."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    client = client_label(sock)
    start = time.monotonic()
    sock.sendall(make_hello(pki.client_context(), "vpn.example.com"))
    got = wait_closed(sock)
    waited = time.monotonic() - start
    sock.close()
    return got, client, waited


def test_failover_from_refusing_to_answering(backend: TlsBackend, pki: Pki,
                                             sniport_with: SniportWith) -> None:
    dead = free_port()
    s = sniport_with(config([f"127.0.0.1:{dead}", backend.address]))
    answer, client = who(s.port, pki)
    assert answer == b"vpn.example.com"
    rec = wait_conn(s, client=client)
    assert (rec["upstream"], rec["end"]) == (backend.address, "eof")


def test_all_refusing_closes_with_upstream_refused(pki: Pki, tmp_path: Path,
                                                   sniport_with: SniportWith) -> None:
    ups = [f"unix:{tmp_path}/nobody.sock", f"127.0.0.1:{free_port()}",
           f"127.0.0.1:{free_port()}"]
    s = sniport_with(config(ups))
    got, client, _ = refused_connection(s.port, pki)
    assert got == b""
    rec = wait_conn(s, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["up"], rec["down"],
            rec["end"]) == ("vpn.example.com", "passthrough:lan", "-", "0", "0",
                            "upstream_refused")
    assert s.proc.poll() is None


def test_upstream_that_never_accepts_times_out(pki: Pki, sniport_with: SniportWith) -> None:
    with Blackhole() as hole:
        s = sniport_with(config([f"127.0.0.1:{hole.port}"]))
        got, client, waited = refused_connection(s.port, pki)
        assert got == b""
        assert 0.28 <= waited < 1.5
        rec = wait_conn(s, client=client)
        assert (rec["upstream"], rec["end"]) == ("-", "upstream_timeout")
        assert 0.28 <= float(rec["duration"]) < 1.5
        s.stop()


def test_failover_after_connect_timeout(backend: TlsBackend, pki: Pki,
                                        sniport_with: SniportWith) -> None:
    with Blackhole() as hole:
        s = sniport_with(config([f"127.0.0.1:{hole.port}", backend.address]))
        start = time.monotonic()
        answer, client = who(s.port, pki)
        assert answer == b"vpn.example.com"
        assert time.monotonic() - start >= 0.28
        rec = wait_conn(s, client=client)
        assert (rec["upstream"], rec["end"]) == (backend.address, "eof")
        assert float(rec["duration"]) >= 0.28
        s.stop()


def test_unix_upstream(pki: Pki, tmp_path: Path, sniport_with: SniportWith) -> None:
    path = f"{tmp_path}/up.sock"
    b = start_tls_backend(pki, "vpn.example.com", unix_path=path)
    s = sniport_with(config([f"unix:{path}"]))
    c = RawTls.connect(("127.0.0.1", s.port), pki.client_context(), "vpn.example.com")
    client = client_label(c.sock)
    c.send_raw(c.hello())
    c.handshake()
    assert c.peer_der() == b.der
    assert c.ask_who() == b"vpn.example.com"
    rec = wait_conn(s, client=client)
    assert (rec["upstream"], rec["end"]) == (f"unix:{path}", "eof")
    s.stop()
    b.close()


# ---------------------------------------------------------------------------------------------
# PROXY protocol (haproxy's proxy-protocol.txt)

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def proxied(pki: Pki, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[Sniport, TlsBackend, TlsBackend]]:
    v1 = start_tls_backend(pki, "v1.example.com", expect_proxy="v1")
    v2 = start_tls_backend(pki, "v2.example.com", expect_proxy="v2")
    config = (server_table(["127.0.0.1:0", "[::1]:0"])
              + passthrough_block("one", ["v1.example.com"], [v1.address],
                                  'proxy_protocol = "v1"')
              + passthrough_block("two", ["v2.example.com"], [v2.address],
                                  'proxy_protocol = "v2"')
              + '[default]\nto = "passthrough:two"\n')
    with start_sniport(config, tmp_path_factory.mktemp("proxied")) as s:
        yield s, v1, v2
    v1.close()
    v2.close()


def proxied_who(address: tuple[str, int], pki: Pki, name: str | None,
                ) -> tuple[bytes, tuple[str, int]]:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(TIMEOUT)
    raw.connect(address)
    c = RawTls(raw, pki.client_context(check_hostname=name is not None), name)
    local = raw.getsockname()[:2]
    c.send_raw(c.hello())
    c.handshake()
    answer = c.ask_who()
    return answer, (local[0], local[1])


@pytest.mark.parametrize("family", ["127.0.0.1", "::1"])
def test_proxy_v1_header(proxied: tuple[Sniport, TlsBackend, TlsBackend], pki: Pki,
                         family: str) -> None:
    s, v1, _ = proxied
    port = s.port if family == "127.0.0.1" else s.listen_port(1)
    before = len(v1.proxy_headers)
    answer, (ip, cport) = proxied_who((family, port), pki, "v1.example.com")
    assert answer == b"v1.example.com"
    proto = "TCP4" if family == "127.0.0.1" else "TCP6"
    assert v1.proxy_headers[before:] == [
        f"PROXY {proto} {family} {family} {cport} {port}\r\n".encode()]
    client = f"{ip}:{cport}" if proto == "TCP4" else f"[{ip}]:{cport}"
    rec = wait_conn(s, client=client)
    assert (rec["route"], rec["end"]) == ("passthrough:one", "eof")


@pytest.mark.parametrize("family", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("name", ["v2.example.com", None])
def test_proxy_v2_header(proxied: tuple[Sniport, TlsBackend, TlsBackend], pki: Pki,
                         family: str, name: str | None) -> None:
    s, _, v2 = proxied
    port = s.port if family == "127.0.0.1" else s.listen_port(1)
    before = len(v2.proxy_headers)
    answer, (_, cport) = proxied_who((family, port), pki, name)
    assert answer == b"v2.example.com"
    packed = ipaddress.ip_address(family).packed
    body = packed + packed + struct.pack("!HH", cport, port)
    if name is not None:
        # PP2_TYPE_AUTHORITY (0x02): the server name the client asked for.
        body += struct.pack("!BH", 0x02, len(name)) + name.encode()
    fam = 0x11 if family == "127.0.0.1" else 0x21  # TCP over IPv4 / IPv6
    header = V2_SIG + struct.pack("!BBH", 0x21, fam, len(body)) + body
    assert v2.proxy_headers[before:] == [header]
