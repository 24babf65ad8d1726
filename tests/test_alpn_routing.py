"""Issue 12 item 5: ALPN in routing, end to end.

One name, three blocks: a terminated site for browsers, a passthrough for XMPP clients
(``alpn = ["xmpp-client"]``, XEP-0368 direct TLS) and one for XMPP servers; a wildcard claimed
only by an ALPN block refuses other hellos with ``no_application_protocol`` (RFC 7301 section
3.2). Real clients: curl for the site, ``openssl s_client -alpn`` for the rest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import TlsBackend, start_tls_backend
from support.clients import curl_site
from support.configs import site_block, toml_lines
from support.logs import wait_conn
from support.pki import Pki
from support.process import Sniport, start_sniport

NAME = "example.test"


@pytest.fixture
def running(tmp_path: Path, pki: Pki) -> Iterator[tuple[Sniport, TlsBackend, TlsBackend]]:
    c2s = start_tls_backend(pki, NAME)
    s2s = start_tls_backend(pki, NAME)
    cert = pki.cert(NAME, directory=tmp_path / "site")
    config = ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=1,
                                        state_dir=tmp_path / "state")
              + "\n[[passthrough]]\n"
              + toml_lines(name="c2s", hosts=[NAME, "*.chat.example.test"],
                           alpn=["xmpp-client"], upstreams=[c2s.address])
              + "\n[[passthrough]]\n"
              + toml_lines(name="s2s", hosts=[NAME], alpn=["xmpp-server"],
                           upstreams=[s2s.address])
              + "\n" + site_block("web", [NAME], cert,
                                  '[[site.route]]\npath = "/"\nrespond = { body = "web" }\n'))
    s = start_sniport(config, tmp_path)
    yield s, c2s, s2s
    s.stop()
    c2s.close()
    s2s.close()


def s_client(pki: Pki, port: int, name: str, alpn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
         "-alpn", alpn, "-CAfile", str(pki.ca_file), "-verify_return_error", "-brief",
         "-ign_eof"],
        input="WHO\n", capture_output=True, text=True, timeout=20)


def test_one_name_three_blocks_by_alpn(running: tuple[Sniport, TlsBackend, TlsBackend],
                                       pki: Pki) -> None:
    s, c2s, s2s = running
    web = curl_site(pki, s.port, NAME, "/")
    assert web.returncode == 0 and web.stdout == b"web", web.stderr
    wait_conn(s, route="site:web")
    # An XMPP client: its hello offers xmpp-client, and the backend's own TLS answers it.
    client = s_client(pki, s.port, NAME, "xmpp-client")
    assert peer(c2s) in client.stderr, client.stderr  # TLS end to end with the backend
    assert NAME in client.stdout  # its answer to WHO, through the relay
    assert wait_conn(s, route="passthrough:c2s")["upstream"] == c2s.address
    server = s_client(pki, s.port, NAME, "xmpp-server")
    assert peer(s2s) in server.stderr, server.stderr
    assert wait_conn(s, route="passthrough:s2s")["upstream"] == s2s.address
    # Offered with others, in any order: the block whose protocol is offered.
    both = s_client(pki, s.port, NAME, "h2,xmpp-client")
    assert peer(c2s) in both.stderr, both.stderr
    assert c2s.connections == 2 and s2s.connections == 1


def peer(backend: TlsBackend) -> str:
    """How ``s_client -brief`` names this backend's certificate (its OU is unique)."""
    return "Peer certificate: " + ", ".join(f"{k} = {v}" for k, v in backend.subject)


def test_a_name_only_alpn_blocks_claim_refuses_other_hellos(
        running: tuple[Sniport, TlsBackend, TlsBackend], pki: Pki) -> None:
    s, c2s, _ = running
    refused = s_client(pki, s.port, "room.chat.example.test", "h2,http/1.1")
    assert refused.returncode != 0
    assert "no application protocol" in refused.stderr, refused.stderr
    line = wait_conn(s, end="rejected_alpn")
    assert line["route"] == "reject" and line["alpn"] == "h2,http/1.1"
    assert c2s.connections == 0
    taken = s_client(pki, s.port, "room.chat.example.test", "xmpp-client")
    # The backend's certificate is for example.test, not room.chat...: verification fails
    # at the client, after the relay reached the backend; what matters is where it went.
    assert c2s.connections == 1, taken.stderr
