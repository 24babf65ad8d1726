"""A first end-to-end check: a real TLS client reaches a passthrough backend via sniport."""

from __future__ import annotations

from support.backends import start_tls_backend
from support.clients import connect_tls
from support.configs import passthrough_config
from support.pki import Pki, peer_dns_names
from support.process import SniportWith


def test_passthrough_sees_backend_certificate(pki: Pki, sniport_with: SniportWith) -> None:
    backend = start_tls_backend(pki, "vpn.example.com")
    s = sniport_with(passthrough_config([backend.address]))
    with connect_tls(pki.client_context(), "vpn.example.com", port=s.port) as tls:
        assert peer_dns_names(tls) == ["vpn.example.com"]
        tls.sendall(b"WHO")
        assert tls.recv(100) == b"vpn.example.com"
    s.wait_log(r"route=passthrough:lan upstream=127\.0\.0\.1:\d+ .* end=eof")
    s.stop()
    backend.close()
