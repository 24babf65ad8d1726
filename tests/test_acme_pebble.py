"""Issue 10 item 2: the sans-IO ACME machine gets a certificate from a real ACME server.

Debian's ``pebble`` on loopback, with validation skipped (PEBBLE_VA_ALWAYS_VALID=1: challenges
are not under test here, the protocol steps are) and pebble's default 5% of nonces rejected,
so badNonce retries happen for real. The HTTP calls are plain ``http.client`` in this test
only; sniport's own driver comes later.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.backends import free_port

from sniport.wire import acme

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port, mgmt = free_port(), free_port()
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(tmp_path / "cert.pem"),
        "privateKey": str(tmp_path / "key.pem"),
        "httpPort": free_port(), "tlsPort": free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
    }}))
    env = {**os.environ, "PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_VA_NOSLEEP": "1"}
    log = open(tmp_path / "pebble.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([PEBBLE, "-config", str(tmp_path / "pebble.json")],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "pebble.log").read_text()
                assert time.monotonic() < deadline, "pebble did not start"
                time.sleep(0.1)
        yield f"https://127.0.0.1:{port}/dir", context
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def call(context: ssl.SSLContext, method: str, url: str, body: bytes | None = None,
         headers: tuple[tuple[str, str], ...] = ()) -> acme.Response:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=context,
                                       timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=dict(headers))
        resp = conn.getresponse()
        data = resp.read() if method != "HEAD" else b""
        return acme.Response(resp.status, tuple(resp.getheaders()), data)
    finally:
        conn.close()


def test_pebble_issues_a_certificate(pebble: tuple[str, ssl.SSLContext]) -> None:
    directory_url, context = pebble
    directory = json.loads(call(context, "GET", directory_url).body)
    names = ("one.sniport.test", "two.sniport.test")
    machine = acme.OrderMachine(directory, ec.generate_private_key(ec.SECP256R1()), names,
                                email="ops@sniport.test", max_bad_nonce=8, default_poll=0.2)
    outcome: acme.Outcome = machine.start()
    published = []
    for _ in range(200):
        if isinstance(outcome, acme.Request):
            outcome = machine.receive(call(context, outcome.method, outcome.url, outcome.body,
                                           outcome.headers))
        elif isinstance(outcome, acme.Publish):
            published.append(outcome.challenge)
            outcome = machine.published()
        elif isinstance(outcome, acme.Wait):
            time.sleep(min(outcome.seconds, 1.0))
            outcome = machine.waited()
        else:
            break
    assert isinstance(outcome, acme.Done), outcome
    chain = x509.load_pem_x509_certificates(outcome.chain_pem)
    assert len(chain) == 2  # leaf + pebble's intermediate
    leaf = chain[0]
    leaf.verify_directly_issued_by(chain[1])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(names)
    key = serialization.load_pem_private_key(outcome.key_pem, None)
    assert key.public_key() == leaf.public_key()
    assert {c.type for c in published} <= {"tls-alpn-01", "http-01"}
    assert published  # pebble made fresh authorizations for a fresh account
