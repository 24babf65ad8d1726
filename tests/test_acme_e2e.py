"""Issue 10, done when: end to end against a real ACME server on loopback.

Debian's pebble validates for real (no PEBBLE_VA_ALWAYS_VALID), with pebble-challtestsrv as
its DNS (every name is 127.0.0.1): its TLS-ALPN-01 checks connect to sniport's main port and
its HTTP-01 checks to sniport's ``http_listen``. A fresh sniport obtains its certificates,
serves them (curl verifies against the root pebble issued this run), renews one when it is
due, and keeps serving throughout; on the same port a passthrough backend (the test's own
ACME client and TLS/HTTP server) completes its own challenge through sniport.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from support.backends import free_port
from support.configs import route, site_block, toml_lines
from support.load import Load
from support.memstorage import MemoryStorage
from support.pebble import PebbleInfo, start_challtestsrv, start_pebble
from support.pki import insecure_client_context
from support.process import Sniport, start_sniport

from sniport.certs.acme_client import AcmeHttp, fetch_directory, obtain
from sniport.wire import acme

SITE = "alpn.sniport.test"
WWW = "www.alpn.sniport.test"
WEB = "web.sniport.test"
LAN = "lan.sniport.test"
OBTAIN_WITHIN = 60.0


@dataclass
class Ca:
    """pebble validating on ``tls_port`` (TLS-ALPN-01) and ``http_port`` (HTTP-01), where
    the test's sniport is to listen."""

    tmp: Path
    pebble: PebbleInfo
    tls_port: int
    http_port: int


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[Ca]:
    dns = start_challtestsrv(tmp_path)
    tls_port, http_port = free_port(), free_port()
    # 60-second certificates: with renew_before = "45s", one is due 15 s after issuance.
    pebble = start_pebble(tmp_path, always_valid=False, validity=60, dns_port=dns.dns_port,
                          http_port=http_port, tls_port=tls_port)
    try:
        yield Ca(tmp_path, pebble, tls_port, http_port)
    finally:
        pebble.stop()
        dns.stop()


def pebble_root(tmp: Path, info: PebbleInfo) -> Path:
    """The root that issued this run's certificates (it changes at every pebble start)."""
    ctx = ssl.create_default_context(cafile=info.ca_file)
    with urllib.request.urlopen(f"{info.mgmt_url}/roots/0", context=ctx, timeout=10) as r:
        pem = r.read()
    path = tmp / "pebble-root.pem"
    path.write_bytes(pem)
    return path


def curl_verified(root: Path, name: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--http1.1", "--max-time", "5", "--cacert", str(root),
         "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
        capture_output=True, text=True, timeout=15)


def wait_verified(root: Path, name: str, port: int, s: Sniport, pebble: PebbleInfo) -> str:
    deadline = time.monotonic() + OBTAIN_WITHIN
    while True:
        out = curl_verified(root, name, port)
        if out.returncode == 0:
            return out.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: no verified certificate: {out.stderr}\n{s.log()}"
                                 f"\npebble:\n{pebble.log()[-3000:]}")
        time.sleep(0.5)


def served(port: int, name: str) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            insecure_client_context().wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


class BackendTls:
    """The passthrough machine: answers TLS-ALPN-01 for its own name, from its own ACME
    client's storage, when the CA's hello comes through sniport."""

    def __init__(self, storage: MemoryStorage) -> None:
        self.storage = storage
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_alpn_protocols([acme.ACME_TLS_ALPN])
        key_auth = self.storage.tls_alpn01(LAN)
        if key_auth is None:
            raw.close()
            return
        cert_pem, key_pem = acme.tls_alpn01_certificate(LAN, key_auth)
        path = Path(f"/dev/shm/backend-{id(raw)}.pem")
        path.write_bytes(cert_pem + key_pem)
        ctx.load_cert_chain(str(path))
        path.unlink()
        try:
            with ctx.wrap_socket(raw, server_side=True) as tls:
                if tls.selected_alpn_protocol() == acme.ACME_TLS_ALPN:
                    self.answered += 1
        except (OSError, ssl.SSLError):
            raw.close()


def backend_order(info: PebbleInfo, storage: MemoryStorage, challenge: str) -> acme.Done:
    """The passthrough machine's own ACME client orders its own name."""
    async def run() -> acme.Done:
        http = AcmeHttp(ca=info.ca_file)
        directory = await fetch_directory(http, info.directory_url)
        return await obtain(http, directory, acme.generate_key(), [LAN], email="",
                            challenges=[challenge], storage=storage, default_poll=0.2)
    return uvloop.run(run())


def status(tmp: Path) -> dict[str, dict[str, object]]:
    data = json.loads((tmp / "state" / "sniport.status.json").read_text())
    return {c["site"]: c for c in data["certificates"]}


def test_tls_alpn_01_obtains_and_renews_while_a_passthrough_backend_answers_its_own(
        ca: Ca) -> None:
    tmp, tls_port, pebble = ca.tmp, ca.tls_port, ca.pebble
    backend_storage = MemoryStorage()
    backend = BackendTls(backend_storage)
    config = (
        "[server]\n" + toml_lines(listen=[f"127.0.0.1:{tls_port}"], workers=2,
                                  state_dir=tmp / "state")
        + "\n[acme]\n" + toml_lines(directory=pebble.directory_url,
                                    ca=pebble.ca_file, email="ops@sniport.test",
                                    challenges=["tls-alpn-01"], renew_before="45s")
        + "\n" + site_block("alpn", [SITE, WWW], "acme", route("/", respond={"body": "hi"}))
        + "[[passthrough]]\n" + toml_lines(name="lan", hosts=[LAN],
                                           upstreams=[f"127.0.0.1:{backend.port}"]))
    s = start_sniport(config, tmp)
    load = Load(tls_port, SITE)
    try:
        root = pebble_root(tmp, pebble)
        assert wait_verified(root, SITE, tls_port, s, pebble) == "hi"
        assert curl_verified(root, WWW, tls_port).stdout == "hi"
        first = served(tls_port, SITE)
        s.wait_log(r"certificate for .*alpn.sniport.test.* (obtained|renewed)")
        assert "acme_tls_alpn_01" in s.log()  # the CA's checks were answered by a worker
        # The passthrough name's challenge goes through sniport to the backend, untouched.
        done = backend_order(pebble, backend_storage, "tls-alpn-01")
        assert backend.answered >= 1
        leaf = x509.load_pem_x509_certificates(done.chain_pem)[0]
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName
                                                       ).value.get_values_for_type(
            x509.DNSName) == [LAN]
        # Due 15 s after issuance: renewed, and served without a reload.
        deadline = time.monotonic() + OBTAIN_WITHIN
        while served(tls_port, SITE).serial_number == first.serial_number:
            assert time.monotonic() < deadline, f"not renewed:\n{s.log()}"
            time.sleep(0.5)
        assert curl_verified(root, SITE, tls_port).stdout == "hi"
        cert = status(tmp)["alpn"]
        assert cert["source"] == "acme"
        assert sorted(cert["names"]) == sorted([SITE, WWW])  # type: ignore[arg-type]
        assert cert["next_renewal"] is not None and cert["last_error"] == ""
        assert "reloading" not in s.log()
    finally:
        load.stop()
        s.stop()
    assert load.ok > 20 and load.failures == []


class BackendHttp(http.server.BaseHTTPRequestHandler):
    storage: MemoryStorage

    def do_GET(self) -> None:
        token = self.path.removeprefix(acme.HTTP01_PREFIX)
        key_auth = self.storage.http01(token) if self.path.startswith(acme.HTTP01_PREFIX) \
            else None
        body = (key_auth or "no").encode()
        self.send_response(200 if key_auth else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_01_obtains_and_a_passthrough_backend_answers_its_own_through_http_upstream(
        ca: Ca) -> None:
    tmp, tls_port, http_port, pebble = ca.tmp, ca.tls_port, ca.http_port, ca.pebble
    backend_storage = MemoryStorage()
    handler = type("Handler", (BackendHttp,), {"storage": backend_storage})
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    config = (
        "[server]\n" + toml_lines(listen=[f"127.0.0.1:{tls_port}"],
                                  http_listen=[f"127.0.0.1:{http_port}"], workers=2,
                                  state_dir=tmp / "state")
        + "\n[acme]\n" + toml_lines(directory=pebble.directory_url,
                                    ca=pebble.ca_file, challenges=["http-01"])
        + "\n" + site_block("web", [WEB], "acme", route("/", respond={"body": "web"}))
        + "[[passthrough]]\n" + toml_lines(
            name="lan", hosts=[LAN], upstreams=["127.0.0.1:1"],
            http_upstream=f"127.0.0.1:{plain.server_address[1]}"))
    s = start_sniport(config, tmp)
    try:
        root = pebble_root(tmp, pebble)
        assert wait_verified(root, WEB, tls_port, s, pebble) == "web"
        assert "acme_http_01" in s.log()
        done = backend_order(pebble, backend_storage, "http-01")
        assert x509.load_pem_x509_certificates(done.chain_pem)[0]
        assert status(tmp)["web"]["source"] == "acme"
    finally:
        s.stop()
        plain.shutdown()
