"""Real clients (curl, openssl s_client, Python ssl) through a passthrough; SNI forms;
[default] for no SNI, unknown names and bytes that are not TLS.

Each client must see the *upstream's* certificate (compared byte for byte with the leaf the
backend serves) and the upstream's content: sniport does not terminate TLS here.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest
from support.backends import (
    TcpServer,
    TlsBackend,
    echo_handler,
    free_port,
    start_tcp_server,
    start_tls_backend,
)
from support.clients import client_label, recv_to_eof, wait_closed
from support.configs import passthrough_block, server_table
from support.logs import conn_mark, wait_conn
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.waiting import TIMEOUT


@pytest.fixture(scope="module")
def backends(pki: Pki) -> Iterator[dict[str, TlsBackend]]:
    made = {
        "lan": start_tls_backend(pki, "vpn.example.com"),
        "wild": start_tls_backend(pki, "*.lan.example.com"),
        "special": start_tls_backend(pki, "x.lan.example.com"),
        "fallback": start_tls_backend(pki, "fallback.example.com"),
    }
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[TcpServer]:
    server = start_tcp_server(echo_handler)
    yield server
    server.close()


def config(backends: dict[str, TlsBackend], echo: TcpServer, default: str) -> str:
    """Every block (the backends' and "plain" to the echo server), then ``default``."""
    blocks = [passthrough_block(name, [b.name], [b.address]) for name, b in backends.items()]
    blocks.append(passthrough_block("plain", ["plain.example.net"], [echo.address]))
    return server_table() + "".join(blocks) + default


@pytest.fixture(scope="module")
def rejecting(backends: dict[str, TlsBackend], echo: TcpServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    """[default] rejects names it does not know and closes non-TLS connections."""
    text = config(backends, echo, '[default]\nto = "reject"\nnon_tls = "close"\n')
    with start_sniport(text, tmp_path_factory.mktemp("sniport")) as s:
        yield s
        assert s.proc.poll() is None, "sniport died"


@pytest.fixture(scope="module")
def defaulting(backends: dict[str, TlsBackend], echo: TcpServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sniport]:
    """[default] sends unknown names to a passthrough block, non-TLS to a plain upstream."""
    text = config(backends, echo,
                  '[default]\nto = "passthrough:fallback"\nnon_tls = "passthrough:plain"\n')
    with start_sniport(text, tmp_path_factory.mktemp("sniport")) as s:
        yield s
        assert s.proc.poll() is None, "sniport died"


# ---------------------------------------------------------------------------------------------
# curl


@pytest.mark.parametrize("host", ["vpn.example.com", "VPN.Example.COM"])
def test_curl_gets_upstream_content_and_certificate(rejecting: Sniport, pki: Pki,
                                                    backends: dict[str, TlsBackend],
                                                    host: str) -> None:
    local = free_port()
    port = rejecting.port
    r = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "10", "--local-port", str(local),
         "--resolve", f"{host}:{port}:127.0.0.1", "--cacert", str(pki.ca_file),
         f"https://{host}:{port}/some/path"],
        capture_output=True, text=True, timeout=TIMEOUT + 5)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from vpn.example.com path=/some/path\n"
    assert backends["lan"].subject_curl() + "\n" in r.stderr
    assert "*  SSL certificate verify ok." in r.stderr
    rec = wait_conn(rejecting, client=f"127.0.0.1:{local}")
    # curl lower-cases the host name before it writes the SNI.
    assert (rec["sni"], rec["alpn"], rec["route"], rec["upstream"], rec["end"]) == (
        "vpn.example.com", "h2,http/1.1", "passthrough:lan", backends["lan"].address, "eof")


# ---------------------------------------------------------------------------------------------
# openssl s_client


def s_client(port: int, pki: Pki, *name_args: str, request: bytes = b"GET /s HTTP/1.0\r\n\r\n"
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *name_args,
         "-CAfile", str(pki.ca_file), "-ign_eof"],
        input=request.decode(), capture_output=True, text=True, timeout=TIMEOUT + 5)


@pytest.mark.parametrize(("name", "block", "upstream_name"), [
    ("vpn.example.com", "lan", "vpn.example.com"),
    ("VPN.Example.COM.", "lan", "vpn.example.com"),
    ("a.lan.example.com", "wild", "*.lan.example.com"),
])
def test_openssl_s_client_sees_upstream_subject(rejecting: Sniport, pki: Pki,
                                                backends: dict[str, TlsBackend], name: str,
                                                block: str, upstream_name: str) -> None:
    before = conn_mark(rejecting)
    r = s_client(rejecting.port, pki, "-servername", name)
    backend = backends[block]
    assert backend.subject_openssl() + "\n" in r.stdout, r.stdout
    # The PEM s_client prints is the upstream's own leaf, byte for byte.
    printed = r.stdout.split("Server certificate\n", 1)[1]
    printed = printed[: printed.index("-----END CERTIFICATE-----\n") + 26]
    assert printed == backend.pem
    assert "Verify return code: 0 (ok)" in r.stdout
    assert f"hello from {upstream_name} path=/s\n" in r.stdout
    rec = wait_conn(rejecting, after=before, sni=name)
    assert (rec["route"], rec["upstream"], rec["end"]) == (
        f"passthrough:{block}", backend.address, "eof")


def test_openssl_no_servername_is_rejected_with_alert(rejecting: Sniport, pki: Pki) -> None:
    before = conn_mark(rejecting)
    r = s_client(rejecting.port, pki, "-noservername")
    assert "no peer certificate available" in r.stdout
    assert "tlsv1 unrecognized name" in r.stderr
    assert "SSL alert number 112" in r.stderr
    assert r.returncode != 0
    rec = wait_conn(rejecting, after=before, end="rejected_no_sni")
    assert (rec["sni"], rec["route"], rec["upstream"], rec["up"], rec["down"]) == (
        "-", "reject", "-", "0", "0")


def test_openssl_no_servername_reaches_default_block(defaulting: Sniport, pki: Pki,
                                                     backends: dict[str, TlsBackend]) -> None:
    before = conn_mark(defaulting)
    r = s_client(defaulting.port, pki, "-noservername")
    assert backends["fallback"].subject_openssl() + "\n" in r.stdout
    assert "hello from fallback.example.com path=/s\n" in r.stdout
    rec = wait_conn(defaulting, after=before, route="passthrough:fallback")
    assert (rec["sni"], rec["upstream"], rec["end"]) == (
        "-", backends["fallback"].address, "eof")


# ---------------------------------------------------------------------------------------------
# Python ssl


def python_who(port: int, ctx: ssl.SSLContext, server_name: str | None
               ) -> tuple[bytes, bytes, str]:
    """Handshake, ask the upstream its name, read to its close: (peer DER, answer, client)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    client = client_label(raw)
    with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"WHO")
        answer = b""
        while chunk := tls.recv(1024):
            answer += chunk
        return der, answer, client


@pytest.mark.parametrize(("name", "block"), [
    ("vpn.example.com", "lan"),
    ("VPN.Example.COM", "lan"),
    ("VPN.Example.COM.", "lan"),
    ("a.lan.example.com", "wild"),
    ("A.Lan.Example.Com.", "wild"),
    ("x.lan.example.com", "special"),  # the exact name wins over the wildcard
])
def test_python_ssl_sni_forms(rejecting: Sniport, pki: Pki, backends: dict[str, TlsBackend],
                              name: str, block: str) -> None:
    # Python's host name check refuses a trailing dot; the chain is still verified, and the
    # certificate is compared with the upstream's own below.
    ctx = pki.client_context(check_hostname=not name.endswith("."))
    der, answer, client = python_who(rejecting.port, ctx, name)
    backend = backends[block]
    assert der == backend.der
    assert answer == backend.name.encode()
    rec = wait_conn(rejecting, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["end"]) == (
        name, f"passthrough:{block}", backend.address, "eof")


@pytest.mark.parametrize("name", [
    "a.b.lan.example.com",  # two labels under the wildcard: not covered
    "lan.example.com",  # the wildcard's parent itself: not covered
    "unknown.example.org",
])
def test_unknown_names_are_rejected_with_unrecognized_name(rejecting: Sniport, pki: Pki,
                                                           name: str) -> None:
    raw = socket.create_connection(("127.0.0.1", rejecting.port), timeout=TIMEOUT)
    client = client_label(raw)
    with pytest.raises(ssl.SSLError) as info:
        pki.client_context().wrap_socket(raw, server_hostname=name)
    assert info.value.reason == "TLSV1_UNRECOGNIZED_NAME"
    raw.close()
    rec = wait_conn(rejecting, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["end"]) == (
        name, "reject", "-", "rejected_unknown_name")


def test_python_without_sni_is_rejected(rejecting: Sniport, pki: Pki) -> None:
    raw = socket.create_connection(("127.0.0.1", rejecting.port), timeout=TIMEOUT)
    client = client_label(raw)
    with pytest.raises(ssl.SSLError) as info:
        pki.client_context(check_hostname=False).wrap_socket(raw, server_hostname=None)
    assert info.value.reason == "TLSV1_UNRECOGNIZED_NAME"
    raw.close()
    rec = wait_conn(rejecting, client=client)
    assert (rec["sni"], rec["route"], rec["end"]) == ("-", "reject", "rejected_no_sni")


@pytest.mark.parametrize("name", [None, "unknown.example.org", "a.b.lan.example.com"])
def test_no_sni_and_unknown_names_reach_default_block(defaulting: Sniport, pki: Pki,
                                                      backends: dict[str, TlsBackend],
                                                      name: str | None) -> None:
    ctx = pki.client_context(check_hostname=False)
    der, answer, client = python_who(defaulting.port, ctx, name)
    assert der == backends["fallback"].der
    assert answer == b"fallback.example.com"
    rec = wait_conn(defaulting, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["end"]) == (
        name or "-", "passthrough:fallback", backends["fallback"].address, "eof")


# ---------------------------------------------------------------------------------------------
# Bytes that are not TLS

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: vpn.example.com\r\nUser-Agent: test\r\n\r\n"


def test_non_tls_is_closed(rejecting: Sniport) -> None:
    sock = socket.create_connection(("127.0.0.1", rejecting.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(HTTP_REQUEST)
    assert wait_closed(sock) == b""
    sock.close()
    rec = wait_conn(rejecting, client=client)
    assert (rec["sni"], rec["hello"], rec["route"], rec["upstream"], rec["end"]) == (
        "-", "0", "reject", "-", "rejected_non_tls")


def test_non_tls_is_relayed_to_non_tls_block(defaulting: Sniport, echo: TcpServer) -> None:
    sock = socket.create_connection(("127.0.0.1", defaulting.port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(HTTP_REQUEST)
    sock.shutdown(socket.SHUT_WR)
    assert recv_to_eof(sock) == HTTP_REQUEST
    sock.close()
    rec = wait_conn(defaulting, client=client)
    n = str(len(HTTP_REQUEST))
    assert (rec["sni"], rec["route"], rec["upstream"], rec["up"], rec["down"], rec["end"]) == (
        "-", "passthrough:plain", echo.address, n, n, "eof")
