"""TLS session resumption works whichever worker a client reaches, and is off when asked.

Workers are forked after the master built the TLS contexts, so they share the session-ticket
keys (DESIGN.md, operations contract). With two workers, connections spread over both; if
the keys were per worker, about half of the resumptions would fail.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from support.configs import route, site_config, toml_lines
from support.pki import Pki
from support.process import SniportWith

CONNECTIONS = 40


def config(pki: Pki, tmp_path: Path, tickets: bool) -> str:
    return site_config("s", ["resume.example.test"], pki.cert("resume.example.test"),
                       route("/", respond={"body": "ok"}),
                       server=toml_lines(workers=2, state_dir=tmp_path / "state",
                                         tls_session_tickets=tickets))


def connect_many(port: int, pki: Pki, version: ssl.TLSVersion) -> list[bool]:
    ctx = pki.client_context()
    ctx.maximum_version = version
    session = None
    reused = []
    for _ in range(CONNECTIONS):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="resume.example.test",
                             session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: resume.example.test\r\n"
                        b"Connection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
            assert data.endswith(b"\r\n\r\nok")
            reused.append(tls.session_reused)
            session = tls.session
    return reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_resumption_works_on_every_worker(pki: Pki, tmp_path: Path, sniport_with: SniportWith,
                                          version: ssl.TLSVersion) -> None:
    s = sniport_with(config(pki, tmp_path, True))
    reused = connect_many(s.port, pki, version)
    # The first handshake is full; every later one resumes, on either worker.
    assert reused == [False] + [True] * (CONNECTIONS - 1)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_tickets_off_means_no_resumption(pki: Pki, tmp_path: Path, sniport_with: SniportWith,
                                         version: ssl.TLSVersion) -> None:
    s = sniport_with(config(pki, tmp_path, False))
    reused = connect_many(s.port, pki, version)
    assert reused == [False] * CONNECTIONS
