"""Issue 12 item 1: SSH, plaintext HTTP and silent clients on the TLS port.

End to end with real processes: a real OpenSSH server behind a ``protocol = "ssh"`` block
and the real ``ssh`` client, curl over HTTPS and plaintext HTTP on the same port, raw
sockets for the bad input (bytes that stop, banners too long, bytes of no protocol) and for
a client that waits for the server to speak first.
"""

from __future__ import annotations

import getpass
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import greeter_handler, recorder_handler, start_tcp_server
from support.clients import curl, curl_site, recv_to_eof
from support.configs import site_block, toml_lines
from support.logs import conn_lines, wait_conn
from support.pki import Pki
from support.process import Sniport, run_cli, start_sniport
from support.sshd import Sshd, start_sshd
from support.waiting import wait_until

SITE = "www.example.test"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = start_sshd(tmp_path)
    yield server
    server.stop()


def _config(tmp_path: Path, pki: Pki, ssh_upstream: str, *, server: str = "",
            default: str = 'non_tls = "http"\n', extra: str = "") -> str:
    cert = pki.cert(SITE, directory=tmp_path / "site")
    return ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=2,
                                      state_dir=tmp_path / "state") + server
            + "\n[[passthrough]]\n" + toml_lines(name="ssh", protocol="ssh",
                                                 upstreams=[ssh_upstream])
            + "\n" + extra
            + site_block("www", [SITE], cert,
                         '[[site.route]]\npath = "/"\nrespond = { body = "tls ok" }\n')
            + "[default]\n" + default)


def test_ssh_https_and_plain_http_share_one_port(tmp_path: Path, pki: Pki,
                                                 sshd: Sshd) -> None:
    s = start_sniport(_config(tmp_path, pki, sshd.address), tmp_path)
    try:
        # A real ssh session through sniport: the command runs on the far side.
        ssh = sshd.run(s.port, "echo", "over-sniport")
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout == b"over-sniport\n"
        line = wait_conn(s, route="passthrough:ssh")
        assert line["proto"] == "ssh" and line["upstream"] == sshd.address
        # HTTPS on the same port.
        https = curl_site(pki, s.port, SITE, "/")
        assert https.returncode == 0 and https.stdout == b"tls ok", https.stderr
        # Plaintext HTTP on the same port: 308 to https, path and query kept.
        plain = curl("-i", "--resolve", f"{SITE}:{s.port}:127.0.0.1",
                     f"http://{SITE}:{s.port}/a/b?c=d")
        assert plain.returncode == 0, plain.stderr
        head = plain.stdout.decode("latin-1")
        assert head.startswith("HTTP/1.1 308"), head
        assert f"location: https://{SITE}:{s.port}/a/b?c=d" in head.lower(), head
        # A name no site has: 404, as on http_listen.
        other = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: nobody.test",
                     f"http://127.0.0.1:{s.port}/")
        assert other.stdout == b"404"
        http_line = wait_conn(s, route="http")
        assert http_line["proto"] == "http" and http_line["sni"] in ("", "-")
        # The TLS connection's line has no proto field: TLS lines are unchanged.
        tls_line = wait_conn(s, route="site:www")
        assert "proto" not in tls_line
    finally:
        s.stop()


def test_an_ssh_session_survives_a_reload(tmp_path: Path, pki: Pki, sshd: Sshd) -> None:
    s = start_sniport(_config(tmp_path, pki, sshd.address), tmp_path)
    try:
        # `sleep 2; echo done`: the reload happens while the session is open.
        proc = subprocess.Popen(
            ["ssh", "-F", "/dev/null", "-i", str(sshd.user_key), "-p", str(s.port),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
             f"{getpass.getuser()}@127.0.0.1", "sleep 2; echo done"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: "Accepted publickey" in sshd.log.read_text(), 10, "the login")
        mark = s.mark()
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out == b"done\n"
        line = wait_conn(s, route="passthrough:ssh")
        assert line["proto"] == "ssh"
    finally:
        s.stop()


# -- bad input: one connection ends, with a line that says why -------------------------------

@pytest.fixture
def bare(tmp_path: Path, pki: Pki) -> Iterator[tuple[Sniport, list[bytes]]]:
    """sniport with an ssh block whose upstream records what it gets, non_tls = "http", and
    a short client_hello_timeout."""
    backend = start_tcp_server(recorder_handler)
    s = start_sniport(_config(tmp_path, pki, backend.address,
                              server='client_hello_timeout = "1s"\n'), tmp_path)
    yield s, backend.received
    s.stop()
    backend.close()


def _send(port: int, data: bytes, *, then_end: bool = True) -> bytes:
    """What comes back for ``data`` (followed by the end of the client's direction, if
    ``then_end``) until the close; b"" if nothing: a reset counts as a close, as the bytes
    sniport did not read may make one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if then_end:
            sock.shutdown(socket.SHUT_WR)
        try:
            return recv_to_eof(sock)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize(("data", "end"), [
    (b"SSH-1.5-OldClient\r\n",
     "rejected_non_tls: SSH identification 'SSH-1.5-OldClien' does not begin SSH-2.0- or "
     "SSH-1.99- (RFC 4253 sections 4.2 and 5)"),
    (b"SSH-2.0-" + b"x" * 300, "rejected_non_tls: SSH banner longer than 255 bytes"),
    (b"\x00\x0e\x38\x01binary", "rejected_non_tls: bytes that start no known protocol"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
     "rejected_non_tls: HTTP/2 with prior knowledge (RFC 9113 section 3.3) is not HTTP/1.x"),
    (b"EHLO mail.example\r\n", "rejected_non_tls: not an HTTP/1.x request line: no "
     "request-target followed by a space (RFC 9112 section 3)"),
    (b"GET / SIP/2.0\r\n", "rejected_non_tls: not an HTTP/1.x request line: the version "
     "is not HTTP/1.x (RFC 9112 section 2.3)"),
])
def test_bytes_of_no_protocol_close_that_connection(bare: tuple[Sniport, list[bytes]],
                                                    data: bytes, end: str) -> None:
    s, received = bare
    assert _send(s.port, data) == b""  # closed, nothing answered
    line = wait_conn(s, route="reject")
    assert line["end"] == end and line["proto"] == "other"
    assert received == []
    # Others are not affected: an SSH client right after is relayed.
    _send(s.port, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    wait_until(lambda: received == [b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"], 10, "the relay")


@pytest.mark.parametrize("data", [b"S", b"SSH-2.0-", b"GET /path HTT"])
def test_a_client_that_sends_a_few_bytes_and_stops(bare: tuple[Sniport, list[bytes]],
                                                   data: bytes) -> None:
    """Bytes that could begin several protocols ("S": SSH or an HTTP method) and then
    nothing: closed at client_hello_timeout, never routed."""
    s, received = bare
    started = time.monotonic()
    assert _send(s.port, data, then_end=False) == b""
    assert 0.8 < time.monotonic() - started < 5
    line = wait_conn(s, end="client_hello_timeout")
    assert line["route"] in ("", "-") and received == []


def test_an_ssh_line_in_pieces_is_relayed_whole(bare: tuple[Sniport, list[bytes]]) -> None:
    s, received = bare
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        for piece in (b"SS", b"H-2.0-piece", b"meal\r", b"\nafter"):
            sock.sendall(piece)
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        recv_to_eof(sock)
    wait_until(lambda: received == [b"SSH-2.0-piecemeal\r\nafter"], 10, "the relayed bytes")


def test_non_tls_http_answers_only_http(bare: tuple[Sniport, list[bytes]]) -> None:
    """With non_tls = "http", a request line that is not HTTP/1.x is not answered 400: the
    connection is closed with the reason (no protocol block claims it)."""
    s, _ = bare
    reply = _send(s.port, b"GET / HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 308"), reply[:100]


# -- silent clients ---------------------------------------------------------------------------

def test_a_silent_client_goes_to_default_silent(tmp_path: Path, pki: Pki) -> None:
    """A client that waits for the server to speak first (SMTP-like) gets the block of
    [default].silent after non_tls_timeout; one that speaks is routed by what it says."""
    greeter = start_tcp_server(greeter_handler(64))
    sink = start_tcp_server(recorder_handler)
    extra = "[[passthrough]]\n" + toml_lines(name="mail", hosts=["mail.example.test"],
                                             upstreams=[greeter.address]) + "\n"
    s = start_sniport(_config(tmp_path, pki, sink.address, extra=extra,
                              server='non_tls_timeout = "300ms"\nclient_hello_timeout = "5s"\n',
                              default='non_tls = "http"\nsilent = "passthrough:mail"\n'),
                      tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            started = time.monotonic()
            greeting = sock.recv(64)
            waited = time.monotonic() - started
        assert len(greeting) > 0
        assert 0.25 < waited < 2.0, waited
        line = wait_conn(s, route="passthrough:mail")
        assert line["proto"] == "silent"
        # A client that speaks after the silence would have begun is not taken for silent:
        # its SSH line is routed as SSH.
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"SSH-2.0-x\r\n")
            sock.shutdown(socket.SHUT_WR)
            recv_to_eof(sock)
        wait_until(lambda: sink.received == [b"SSH-2.0-x\r\n"], 10, "the SSH relay")
        assert len([c for c in conn_lines(s) if c.get("proto") == "silent"]) == 1
    finally:
        s.stop()
        greeter.close()
        sink.close()


def test_without_default_silent_a_silent_client_is_closed_at_the_hello_timeout(
        bare: tuple[Sniport, list[bytes]]) -> None:
    s, received = bare
    started = time.monotonic()
    assert _send(s.port, b"", then_end=False) == b""
    assert time.monotonic() - started > 0.8
    line = wait_conn(s, end="client_hello_timeout")
    assert "proto" not in line and received == []


# -- the decision order, as check and routes print it -----------------------------------------

def test_check_and_routes_print_the_first_bytes_decisions(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "sniport.toml"
    config.write_text(_config(tmp_path, pki, "127.0.0.1:22",
                              default='non_tls = "http"\nsilent = "passthrough:ssh"\n'))
    check = run_cli("check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    out = check.stdout
    for label, target in [("(not TLS: SSH)", "passthrough:ssh"),
                          ("(not TLS: HTTP/1.x)", "http"),
                          ("(not TLS: other bytes)", "close"),
                          ("(silent client)", "passthrough:ssh")]:
        assert any(line.split() == [*label.split(), "->", target]
                   for line in out.splitlines()), (label, out)
    routes = run_cli("routes", "-c", str(config), "--protocol", "other")
    assert routes.returncode == 0, routes.stderr
    assert routes.stdout.strip() == ('(not TLS: other bytes) -> reject  (not TLS, and '
                                     '[default].non_tls = "http" answers only HTTP/1.x)')
    ssh = run_cli("routes", "-c", str(config), "--protocol", "ssh")
    assert "passthrough:ssh" in ssh.stdout and 'protocol = "ssh" block' in ssh.stdout


def _banner_then_echo(server: object, conn: socket.socket) -> None:
    """A server that speaks first (a greeting), then echoes until EOF."""
    conn.sendall(b"220 ready\r\n")
    while data := conn.recv(65536):
        conn.sendall(data)


def test_silence_behind_a_proxy_header_is_counted_like_any_other(tmp_path: Path,
                                                                  pki: Pki) -> None:
    """Behind a load balancer (PROXY header, then nothing): the silent client goes to
    [default].silent after non_tls_timeout counted from its arrival, not a second early (the
    consumed header is data: accept() was not deferred), and an SSH line that comes within
    non_tls_timeout is routed as SSH."""
    greeter = start_tcp_server(greeter_handler(16))
    sink = start_tcp_server(recorder_handler)
    extra = "[[passthrough]]\n" + toml_lines(name="mail", hosts=["mail.example.test"],
                                             upstreams=[greeter.address]) + "\n"
    config = _config(tmp_path, pki, sink.address, extra=extra,
                     server='trusted_proxies = ["127.0.0.1/32"]\n',
                     default='silent = "passthrough:mail"\n')
    config = config.replace('listen = ["127.0.0.1:0"]',
                            'listen = [{ address = "127.0.0.1:0", proxy_protocol = true }]')
    s = start_sniport(config, tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1111 443\r\n")
            assert sock.recv(16)
            waited = time.monotonic() - started
        assert 1.8 < waited < 3.0, waited  # non_tls_timeout is 2 s
        assert wait_conn(s, proto="silent")["client"] == "192.0.2.1:1111"
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1112 443\r\n")
            time.sleep(1.4)
            sock.sendall(b"SSH-2.0-slow\r\n")
            sock.shutdown(socket.SHUT_WR)
            recv_to_eof(sock)
        wait_until(lambda: sink.received == [b"SSH-2.0-slow\r\n"], 10, "the SSH relay")
    finally:
        s.stop()
        greeter.close()
        sink.close()


def test_a_silent_client_routed_during_a_reload_is_carried_over(tmp_path: Path,
                                                                  pki: Pki) -> None:
    """Routed after the old worker began to drain (its non_tls_timeout ended then): the
    relay is offered to the new generation like the others, not cut at drain_timeout."""
    server = start_tcp_server(_banner_then_echo)  # type: ignore[arg-type]
    sink = start_tcp_server(recorder_handler)
    extra = "[[passthrough]]\n" + toml_lines(name="mail", hosts=["mail.example.test"],
                                             upstreams=[server.address]) + "\n"
    s = start_sniport(_config(tmp_path, pki, sink.address, extra=extra,
                              server='non_tls_timeout = "1s"\ndrain_timeout = "1s"\n',
                              default='silent = "passthrough:mail"\n'), tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            time.sleep(0.3)
            mark = s.mark()
            s.signal(signal.SIGHUP)  # the drain begins before the silence ends
            assert sock.recv(64) == b"220 ready\r\n"
            s.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
            time.sleep(2.0)  # past drain_timeout
            sock.sendall(b"still here")
            assert sock.recv(64) == b"still here"
    finally:
        s.stop()
        server.close()
        sink.close()
