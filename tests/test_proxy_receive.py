"""Issue 11 item 1: PROXY protocol received from a load balancer (DESIGN.md "PROXY protocol
from a load balancer").

One sniport whose listener requires a PROXY header and believes it from 127.0.0.1 only; the
tests play the balancer (they write the header themselves, v1 and v2) and clients come
from other loopback addresses (127.0.0.2 is untrusted). The header's source must be the
client everywhere: the proxied application's X-Forwarded-For, the connection log, a
passthrough block's deny list and the PROXY header it sends upstream, the per-IP limit.
HAProxy itself in front is ``test_fleet.py``.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.backends import App, TlsBackend, echo_of, header_values, start_tls_backend
from support.clients import recv_to_eof
from support.configs import proxy_route, site_block, toml_lines
from support.logs import conn_lines, wait_conn
from support.pki import Pki
from support.process import Sniport, start_sniport

from sniport.wire import proxyproto

SITE = "app.pp.test"
PT = "pt.pp.test"
DENIED_PT = "denied.pp.test"
CLIENT = ("203.0.113.7", 40001)  # where the "balancer" says the client is
DEST = ("198.51.100.1", 443)  # the address the client connected to, on the balancer


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    app: App
    backend: TlsBackend


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_receive")
    app = App("app")
    backend = start_tls_backend(pki, PT, expect_proxy="v2")
    config = (
        "[server]\n" + toml_lines(workers=1, state_dir=tmp / "state", max_connections_per_ip=2,
                                  trusted_proxies=["127.0.0.1/32"], client_hello_timeout="2s")
        + 'listen = [{ address = "127.0.0.1:0", proxy_protocol = true }]\n\n'
        + site_block("app", [SITE], pki.cert(SITE, directory=tmp / "certs"),
                     proxy_route("/", [app.url]))
        + "[[passthrough]]\n" + toml_lines(name="pt", hosts=[PT], upstreams=[backend.address],
                                           proxy_protocol="v2")
        + "[[passthrough]]\n" + toml_lines(name="denied", hosts=[DENIED_PT],
                                           upstreams=[backend.address],
                                           deny=["203.0.113.0/24"]))
    s = start_sniport(config, tmp)
    try:
        yield Setup(s, pki, app, backend)
    finally:
        s.stop()
        app.stop()
        backend.close()


def balancer(port: int, header: bytes, source_ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(header)
    return sock


def https_get(setup: Setup, header: bytes, host: str = SITE) -> bytes:
    raw = balancer(setup.s.port, header)
    with setup.pki.client_context().wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET /who HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return recv_to_eof(tls)


def closed_without_answer(sock: socket.socket) -> bool:
    """Closed by sniport, nothing sent: an EOF, or a reset (unread bytes at the close)."""
    try:
        return recv_to_eof(sock) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_headers_source_is_the_client_for_the_application_and_the_log(
        setup: Setup, version: str) -> None:
    unique = b"lb-req-42"
    header = (proxyproto.encode_v1(CLIENT, DEST) if version == "v1" else
              proxyproto.encode_v2(CLIENT, DEST, tlvs=[(proxyproto.PP2_TYPE_UNIQUE_ID,
                                                        unique)]))
    mark = len(conn_lines(setup.s))
    echo = echo_of(body_of(https_get(setup, header)))
    assert header_values(echo, "X-Forwarded-For") == [CLIENT[0]]
    assert header_values(echo, "X-Real-IP") == [CLIENT[0]]
    line = wait_conn(setup.s, after=mark, sni=SITE)
    assert line["client"] == f"{CLIENT[0]}:{CLIENT[1]}"
    assert line["via"].startswith("127.0.0.1:")
    assert line.get("proxy_id") == ("lb-req-42" if version == "v2" else None)


def test_passthrough_sends_the_header_client_and_destination_upstream(setup: Setup) -> None:
    """The PROXY header sniport sends to a passthrough upstream names the client the
    balancer named, and the address the client connected to; a v4-mapped source is sent
    as TCP4."""
    before = len(setup.backend.proxy_headers)
    mapped = ("::ffff:203.0.113.9", 40002)
    raw = balancer(setup.s.port, proxyproto.encode_v2(mapped, ("::ffff:198.51.100.1", 443)))
    with setup.pki.client_context().wrap_socket(raw, server_hostname=PT) as tls:
        tls.sendall(b"WHO")
        assert tls.recv(100) == PT.encode()
    sent = proxyproto.parse(setup.backend.proxy_headers[before])
    assert isinstance(sent, proxyproto.Proxied)
    assert sent.source == ("203.0.113.9", 40002) and sent.dest == ("198.51.100.1", 443)
    assert sent.authority == PT


def test_a_blocks_deny_list_sees_the_header_source(setup: Setup) -> None:
    mark = len(conn_lines(setup.s))
    raw = balancer(setup.s.port, proxyproto.encode_v1(CLIENT, DEST))
    with pytest.raises((ssl.SSLError, OSError)), \
            setup.pki.client_context().wrap_socket(raw, server_hostname=DENIED_PT) as tls:
        tls.recv(10)
    line = wait_conn(setup.s, after=mark, sni=DENIED_PT)
    assert (line["client"], line["end"]) == (f"{CLIENT[0]}:{CLIENT[1]}", "denied")


def test_local_and_unknown_keep_the_sockets_addresses(setup: Setup) -> None:
    """A balancer's health check: LOCAL (v2) or UNKNOWN (v1), then a request."""
    for header in (proxyproto.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]), b"PROXY UNKNOWN\r\n"):
        echo = echo_of(body_of(https_get(setup, header)))
        assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.parametrize(("send", "end"), [
    (b"\x16\x03\x01\x02\x00\x01", "proxy_protocol_invalid: not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "proxy_protocol_invalid"),
    (proxyproto.V2_SIGNATURE + b"\x21\x11\x23\x28", "proxy_protocol_invalid: v2 length 9000"),
    (b"PROXY TCP4 1.2.3", "client_hello_timeout"),  # half a header, then silence
    (b"", "client_hello_timeout"),
])
def test_no_valid_header_closes_that_connection_with_the_reason(
        setup: Setup, send: bytes, end: str) -> None:
    sock = balancer(setup.s.port, send)
    client = f"127.0.0.1:{sock.getsockname()[1]}"
    assert closed_without_answer(sock)
    line = wait_conn(setup.s, client=client)
    assert line["end"].startswith(end), line
    # Nothing else affected: the next client is served.
    assert header_values(echo_of(body_of(https_get(setup, proxyproto.encode_v1(CLIENT, DEST)))),
                         "X-Forwarded-For") == [CLIENT[0]]


def test_a_header_split_over_packets_and_the_hello_behind_it_are_read_exactly(
        setup: Setup) -> None:
    header = proxyproto.encode_v2(CLIENT, DEST, authority=SITE)
    raw = balancer(setup.s.port, header[:5])
    time.sleep(0.05)
    raw.sendall(header[5:20])
    time.sleep(0.05)
    raw.sendall(header[20:])
    with setup.pki.client_context().wrap_socket(raw, server_hostname=SITE) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n".encode())
        echo = echo_of(body_of(recv_to_eof(tls)))
    assert header_values(echo, "X-Forwarded-For") == [CLIENT[0]]


def test_a_header_from_an_untrusted_address_is_never_believed(setup: Setup) -> None:
    sock = balancer(setup.s.port, proxyproto.encode_v1(CLIENT, DEST), source_ip="127.0.0.2")
    client = f"127.0.0.2:{sock.getsockname()[1]}"
    assert closed_without_answer(sock)
    assert wait_conn(setup.s, client=client)["end"] == "proxy_untrusted"


def test_the_per_ip_limit_counts_the_header_source(setup: Setup) -> None:
    """max_connections_per_ip = 2: two held connections from 203.0.113.50, the third is
    refused; another client behind the same balancer is not."""
    held = [balancer(setup.s.port, proxyproto.encode_v1(("203.0.113.50", 1000 + i), DEST))
            for i in range(2)]
    time.sleep(0.2)
    mark = len(conn_lines(setup.s))
    assert closed_without_answer(
        balancer(setup.s.port, proxyproto.encode_v1(("203.0.113.50", 1002), DEST)))
    line = wait_conn(setup.s, after=mark, end="per_ip_limit")
    assert line["client"] == "203.0.113.50:1002"
    other = echo_of(body_of(https_get(setup, proxyproto.encode_v1(("203.0.113.51", 1), DEST))))
    assert header_values(other, "X-Forwarded-For") == ["203.0.113.51"]
    for sock in held:
        sock.close()


def test_a_balancers_health_check_is_logged_as_one_and_not_as_a_failure(setup: Setup) -> None:
    """HAProxy's ``check`` on a send-proxy-v2 server: a LOCAL header, then a reset."""
    for close in ("fin", "reset"):
        sock = balancer(setup.s.port, proxyproto.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]))
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        time.sleep(0.1)
        if close == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert wait_conn(setup.s, client=client)["end"] == "balancer_check"


def test_a_balancer_that_hangs_up_inside_its_header_is_named_so(setup: Setup) -> None:
    """Found in review: a close in the middle of the header was logged (and counted) as a
    ClientHello cut short."""
    sock = balancer(setup.s.port, b"PROXY TCP4 1.2.3")
    client = f"127.0.0.1:{sock.getsockname()[1]}"
    time.sleep(0.1)
    sock.shutdown(socket.SHUT_WR)
    assert closed_without_answer(sock)
    assert wait_conn(setup.s, client=client)["end"] == "eof_in_proxy_header"
