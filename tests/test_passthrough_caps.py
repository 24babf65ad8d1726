"""Caps and access: max_connections waits instead of refusing, max_connections_per_ip,
allow/deny per block, and unix-socket listeners with what may already be at their path."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import RawTls, client_label, make_hello, readable_within, wait_closed
from support.configs import passthrough_block, passthrough_config, short_unix_path, toml_lines
from support.logs import wait_conn
from support.pki import Pki
from support.process import Sniport, SniportWith, run_cli
from support.waiting import TIMEOUT


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[TlsBackend]:
    b = start_tls_backend(pki, "vpn.example.com")
    yield b
    b.close()


# The caps are counted per worker process (DESIGN.md: max_connections is "per worker"); with
# one worker the numbers below are exact.
ONE_WORKER = "workers = 1\n"


def config(backend: TlsBackend, server: str = "", listen: Sequence[str] = ()) -> str:
    return passthrough_config([backend.address], server=server,
                              listen=["127.0.0.1:0", *listen])


def open_relay(address: tuple[str, int] | str, pki: Pki, source: str | None = None,
               name: str = "vpn.example.com") -> RawTls:
    """A client with its handshake done through sniport, holding the relay open."""
    c = RawTls.connect(address, pki.client_context(check_hostname=False), name,
                       source=source)
    c.send_raw(c.hello())
    c.handshake()
    return c


def refused(port: int, pki: Pki, source: str | None = None,
            name: str = "vpn.example.com", answer: bytes = b"") -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                    source_address=(source, 0) if source else None)
    client = client_label(sock)
    sock.sendall(make_hello(pki.client_context(), name))
    assert wait_closed(sock) == answer
    sock.close()
    return client


# ---------------------------------------------------------------------------------------------
# max_connections


def test_max_connections_queues_the_next_clients(backend: TlsBackend, pki: Pki,
                                                 sniport_with: SniportWith) -> None:
    s = sniport_with(config(backend, ONE_WORKER + "max_connections = 5"))
    held = [open_relay(("127.0.0.1", s.port), pki) for _ in range(5)]
    # The 6th and 7th are not refused (the kernel completes their connect) but wait.
    waiting = []
    for _ in range(2):
        c = RawTls.connect(("127.0.0.1", s.port), pki.client_context(), "vpn.example.com")
        c.send_raw(c.hello())
        waiting.append(c)
    assert not readable_within(waiting[0].sock, 0.5)
    assert not readable_within(waiting[1].sock, 0.01)
    # One ends: exactly one waiting client (the first in the queue) gets in.
    held.pop(0).close_clean()
    waiting[0].handshake()
    assert waiting[0].peer_der() == backend.der
    assert not readable_within(waiting[1].sock, 0.3)
    held.pop(0).close_clean()
    waiting[1].handshake()
    for c in waiting:
        assert c.ask_who() == b"vpn.example.com"
    for c in held:
        assert c.ask_who() == b"vpn.example.com"
    for c in waiting:
        rec = wait_conn(s, client=c.label)
        assert (rec["route"], rec["end"]) == ("passthrough:lan", "eof")


# ---------------------------------------------------------------------------------------------
# max_connections_per_ip


def test_max_connections_per_ip(backend: TlsBackend, pki: Pki,
                                sniport_with: SniportWith) -> None:
    s = sniport_with(config(backend, ONE_WORKER + "max_connections_per_ip = 2"))
    address = ("127.0.0.1", s.port)
    held = [open_relay(address, pki) for _ in range(2)]
    client = refused(s.port, pki)
    rec = wait_conn(s, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["end"]) == (
        "-", "-", "-", "per_ip_limit")
    # Another address is not limited by this one's count.
    other = open_relay(address, pki, source="127.0.0.2")
    other2 = open_relay(address, pki, source="127.0.0.2")
    # One of 127.0.0.1's ends: 127.0.0.1 may connect again.
    first = held.pop(0)
    first.close_clean()
    wait_conn(s, client=first.label)
    again = open_relay(address, pki)
    for c in [*held, other, other2, again]:
        assert c.ask_who() == b"vpn.example.com"


# ---------------------------------------------------------------------------------------------
# allow / deny


@pytest.fixture
def acl(backend: TlsBackend, sniport_with: SniportWith) -> Sniport:
    both = passthrough_block("both", ["both.example.com"], [backend.address],
                             toml_lines(allow=["127.0.0.0/8"], deny=["127.0.0.3"]))
    return sniport_with(passthrough_config(
        [backend.address], block=toml_lines(allow=["127.0.0.2/32"]),
        extra=both + '[default]\nto = "passthrough:lan"\n'))


@pytest.mark.parametrize(("source", "name", "block"), [
    ("127.0.0.1", "vpn.example.com", "lan"),  # not in allow
    ("127.0.0.3", "both.example.com", "both"),  # in allow and in deny: deny wins
    ("127.0.0.1", "unknown.example.com", "lan"),  # [default].to is checked too
])
def test_denied(acl: Sniport, pki: Pki, source: str, name: str, block: str) -> None:
    # RFC 8446 section 6.2: a fatal access_denied alert, then the close (a FIN: the hello
    # was read off first, so no reset can destroy the alert).
    client = refused(acl.port, pki, source=source, name=name,
                     answer=bytes([21, 3, 3, 0, 2, 2, 49]))
    rec = wait_conn(acl, client=client)
    assert (rec["sni"], rec["route"], rec["upstream"], rec["end"]) == (
        name, f"passthrough:{block}", "-", "denied")


@pytest.mark.parametrize(("source", "name", "block"), [
    ("127.0.0.2", "vpn.example.com", "lan"),
    ("127.0.0.1", "both.example.com", "both"),
    ("127.0.0.4", "both.example.com", "both"),
])
def test_allowed(acl: Sniport, pki: Pki, backend: TlsBackend, source: str, name: str,
                 block: str) -> None:
    c = open_relay(("127.0.0.1", acl.port), pki, source=source, name=name)
    client = client_label(c.sock)
    assert c.ask_who() == b"vpn.example.com"
    rec = wait_conn(acl, client=client)
    assert (rec["route"], rec["upstream"], rec["end"]) == (
        f"passthrough:{block}", backend.address, "eof")


# ---------------------------------------------------------------------------------------------
# unix listeners and what may already be at their path


def unix_listen(path: Path) -> list[str]:
    return [f"unix:{short_unix_path(path)}"]


def test_unix_listener_serves_and_removes_its_file(backend: TlsBackend, pki: Pki,
                                                   tmp_path: Path,
                                                   sniport_with: SniportWith) -> None:
    path = tmp_path / "in.sock"
    s = sniport_with(config(backend, listen=unix_listen(path)))
    assert s.addresses == [f"127.0.0.1:{s.port}", f"unix:{path}"]
    c = open_relay(str(path), pki)
    assert c.peer_der() == backend.der
    assert c.ask_who() == b"vpn.example.com"
    rec = wait_conn(s, listener=f"unix:{path}")
    assert (rec["client"], rec["route"], rec["end"]) == ("unix", "passthrough:lan", "eof")
    assert s.stop() == 0
    assert not path.exists()


def test_stale_socket_file_does_not_stop_the_start(backend: TlsBackend, pki: Pki,
                                                   tmp_path: Path,
                                                   sniport_with: SniportWith) -> None:
    path = tmp_path / "in.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: what a crash leaves behind
    assert path.is_socket()
    sniport_with(config(backend, listen=unix_listen(path)))
    assert open_relay(str(path), pki).ask_who() == b"vpn.example.com"


def test_live_socket_stops_the_start(backend: TlsBackend, tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(8)
    try:
        cfg = tmp_path / "sniport.toml"
        cfg.write_text(config(backend, listen=unix_listen(path)))
        r = run_cli("run", "-c", str(cfg))
        assert r.returncode != 0
        assert f"unix:{path}" in r.stderr
        assert "another process is serving here" in r.stderr
        assert "serving" not in r.stderr.replace("another process is serving here", "")
        # The other process's socket is untouched and still accepts.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(TIMEOUT)
        probe.connect(str(path))
        probe.close()
    finally:
        live.close()


def test_regular_file_at_the_path_is_never_deleted(backend: TlsBackend, tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    path.write_text("precious\n")
    cfg = tmp_path / "sniport.toml"
    cfg.write_text(config(backend, listen=unix_listen(path)))
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode != 0
    assert f"unix:{path}" in r.stderr
    assert path.read_text() == "precious\n"


def test_socket_file_replaced_while_running_is_left_alone(backend: TlsBackend,
                                                          tmp_path: Path,
                                                          sniport_with: SniportWith) -> None:
    """sniport removes its file at exit only if the inode is still its own."""
    path = tmp_path / "in.sock"
    s = sniport_with(config(backend, listen=unix_listen(path)))
    os.unlink(path)
    path.write_text("someone else's\n")
    assert s.stop() == 0
    assert path.read_text() == "someone else's\n"
