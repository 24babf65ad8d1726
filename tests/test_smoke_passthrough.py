"""A first end-to-end check: a real TLS client reaches a passthrough backend via sniport."""

from __future__ import annotations

from pathlib import Path

from helpers import Pki, peer_common_names, running, start_sniport, start_tls_backend, tls_client


def test_passthrough_sees_backend_certificate(pki: Pki, tmp_path: Path) -> None:
    backend = start_tls_backend(pki, "vpn.example.com")
    config = f"""
[server]
listen = ["127.0.0.1:0"]
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com"]
upstreams = ["127.0.0.1:{backend.port}"]
"""
    with running(start_sniport(config, tmp_path)) as s:
        with tls_client(s.port, "vpn.example.com", pki.client_context()) as tls:
            assert peer_common_names(tls) == ["vpn.example.com"]
            tls.sendall(b"WHO")
            assert tls.recv(100) == b"vpn.example.com"
        s.wait_log(r"route=passthrough:lan upstream=127\.0\.0\.1:\d+ .* end=eof")
    backend.close()
