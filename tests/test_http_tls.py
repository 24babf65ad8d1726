"""TLS termination end to end: each site's own certificate and content for its SNI, with a
passthrough host on the same port; several hosts, wildcards, self-signed certificates;
``sniport check`` on keys and names; protocol versions, ciphers, ALPN; handshakes that fail
or stall, logged with their SNI and ending that connection only.

Real clients throughout: curl, ``openssl s_client`` and Python's ssl, over 127.0.0.1.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from support.backends import TlsBackend, start_tls_backend
from support.clients import (
    RawTls,
    client_label,
    curl,
    curl_site,
    fetch,
    s_client,
    tls_conn,
    wait_closed,
)
from support.configs import (
    passthrough_block,
    route,
    server_table,
    site_block,
    site_config,
    toml_lines,
)
from support.logs import wait_conn
from support.pki import Pki, der_fingerprint, insecure_client_context, peer_der, pem_fingerprint
from support.process import Sniport, SniportWith, run_cli, start_sniport
from support.waiting import TIMEOUT


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    backend: TlsBackend
    backend_fp: str
    fp: dict[str, str]  # site name -> fingerprint of its leaf

    @property
    def port(self) -> int:
        return self.s.port


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("http_tls")
    certs = tmp / "certs"
    a_chain, a_key = pki.cert("site-a.tls.test", "www.site-a.tls.test", directory=certs)
    w_chain, w_key = pki.cert("*.wild.tls.test", directory=certs)
    r_chain, r_key = pki.cert("rsa.tls.test", rsa=True, directory=certs)
    # No CN in the backend's subject: s_client prints the subject after the certificate,
    # where the test looks for the backend's own answer (its name).
    backend = start_tls_backend(pki, "pass.tls.test", common_name=False)
    backend_fp = pem_fingerprint(backend.pem)
    config = (
        server_table(extra='handshake_timeout = "1s"')
        + passthrough_block("lan", ["pass.tls.test"], [backend.address])
        + site_block("a", ["site-a.tls.test", "www.site-a.tls.test"], (a_chain, a_key),
                     route("/", respond={"body": "this is site a"}))
        + site_block("wild", ["*.wild.tls.test"], (w_chain, w_key),
                     route("/", respond={"body": "this is the wildcard site"}))
        + site_block("rsa", ["rsa.tls.test"], (r_chain, r_key),
                     route("/", respond={"body": "this is the rsa site"})))
    fp = {name: pem_fingerprint(chain.read_text())
          for name, chain in (("a", a_chain), ("wild", w_chain), ("rsa", r_chain))}
    with start_sniport(config, tmp) as s:
        yield Setup(s, pki, backend, backend_fp, fp)
    backend.close()


def curl_certs_fingerprint(out: bytes) -> str:
    """The leaf's fingerprint from curl's ``-w '%{certs}'`` output (printed after the body)."""
    return pem_fingerprint(out.decode("latin-1"))


# --------------------------------------------------------------------------------------------
# Each client gets the site's own certificate and content, and passthrough keeps working


def test_curl_site_and_passthrough_on_one_port(setup: Setup) -> None:
    for host in ("site-a.tls.test", "www.site-a.tls.test"):
        r = curl_site(setup.pki, setup.port, host, "/x", "-o", "/dev/null",
                      "-w", "%{http_code} %{ssl_verify_result}\n%{certs}")
        assert r.returncode == 0, r.stderr
        first, _, certs = r.stdout.partition(b"\n")
        assert first == b"200 0"
        assert curl_certs_fingerprint(certs) == setup.fp["a"]
        plain = curl_site(setup.pki, setup.port, host, "/x")
        assert plain.returncode == 0 and plain.stdout == b"this is site a"
    # The passthrough host, same port: the backend's own certificate and answer.
    r = curl_site(setup.pki, setup.port, "pass.tls.test", "/p?q=1", "-w", "\n%{certs}")
    assert r.returncode == 0, r.stderr
    body, _, certs = r.stdout.partition(b"\n")
    assert body == b"hello from pass.tls.test path=/p?q=1"
    assert curl_certs_fingerprint(certs) == setup.backend_fp


def test_openssl_s_client_site_and_passthrough(setup: Setup) -> None:
    ca = str(setup.pki.ca_file)
    request = b"GET /o HTTP/1.1\r\nHost: site-a.tls.test\r\nConnection: close\r\n\r\n"
    r = s_client(setup.port, "-servername", "site-a.tls.test", "-CAfile", ca,
                 "-verify_return_error", "-alpn", "http/1.1", "-ign_eof", stdin=request)
    out = r.stdout.decode("latin-1")
    assert r.returncode == 0, out + r.stderr.decode()
    assert "Verify return code: 0 (ok)" in out
    assert "ALPN protocol: http/1.1" in out
    assert pem_fingerprint(out) == setup.fp["a"]
    assert "HTTP/1.1 200 OK\r\n" in out
    assert out.count("this is site a") == 1

    r = s_client(setup.port, "-servername", "pass.tls.test", "-CAfile", ca,
                 "-verify_return_error", "-ign_eof", stdin=b"WHO")
    out = r.stdout.decode("latin-1")
    assert "Verify return code: 0 (ok)" in out
    assert pem_fingerprint(out) == setup.backend_fp
    # The backend's answer to "WHO" is its name (printed among s_client's session notes).
    assert "pass.tls.test" in out.split("-----END CERTIFICATE-----")[-1]


def test_python_ssl_site_and_passthrough(setup: Setup) -> None:
    ctx = setup.pki.client_context()
    for host in ("site-a.tls.test", "www.site-a.tls.test"):
        with tls_conn(setup.port, host, ctx) as c:
            assert der_fingerprint(peer_der(c.sock)) == setup.fp["a"]
            c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            r = c.response()
            assert (r.status, r.body) == (200, b"this is site a")
    with tls_conn(setup.port, "pass.tls.test", ctx) as c:
        assert der_fingerprint(peer_der(c.sock)) == setup.backend_fp
        c.send(b"WHO")
        assert c.read_to_close() == b"pass.tls.test"


def test_wildcard_certificate_covers_one_label(setup: Setup) -> None:
    r = curl_site(setup.pki, setup.port, "a.wild.tls.test", "/", "-w", "\n%{certs}")
    assert r.returncode == 0, r.stderr
    body, _, certs = r.stdout.partition(b"\n")
    assert body == b"this is the wildcard site"
    assert curl_certs_fingerprint(certs) == setup.fp["wild"]
    resp = fetch(setup.port, "b.wild.tls.test", setup.pki.client_context(), "/")
    assert (resp.status, resp.body) == (200, b"this is the wildcard site")
    # Two labels are not one: no block claims the name, [default] rejects it.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(setup.port, "a.b.wild.tls.test", insecure_client_context(), "/")


# --------------------------------------------------------------------------------------------
# Protocol versions, ciphers, ALPN


def _old_tls_ctx(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = insecure_client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it at all
    return ctx


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_refused(setup: Setup, version: str) -> None:
    ctx = _old_tls_ctx(getattr(ssl.TLSVersion, version))
    c = RawTls.connect(("127.0.0.1", setup.port), ctx, "site-a.tls.test")
    try:
        hello = c.hello()
        assert hello[:1] == b"\x16", "the client did not produce a ClientHello"
        c.sock.sendall(hello)
        reply = wait_closed(c.sock, TIMEOUT)
        label = client_label(c.sock)
    finally:
        c.close()
    # Whatever came back is an alert record (type 21), never a ServerHello (22).
    assert reply[:1] in (b"", b"\x15")
    rec = wait_conn(setup.s, client=label)
    assert rec["sni"] == "site-a.tls.test"
    assert rec["end"] == "tls_handshake_failed: UNSUPPORTED_PROTOCOL"


def test_openssl_tls_1_1_refused_tls_1_2_accepted(setup: Setup) -> None:
    r = s_client(setup.port, "-servername", "site-a.tls.test", "-tls1_1",
                 "-cipher", "DEFAULT@SECLEVEL=0", stdin=b"")
    out = r.stdout.decode("latin-1")
    assert r.returncode != 0
    assert "no peer certificate available" in out
    assert "New, (NONE), Cipher is (NONE)" in out
    r = s_client(setup.port, "-servername", "site-a.tls.test", "-tls1_2",
                 "-CAfile", str(setup.pki.ca_file), "-verify_return_error", stdin=b"")
    out = r.stdout.decode("latin-1")
    assert "Protocol  : TLSv1.2" in out
    assert re.search(r"Cipher is ECDHE-ECDSA-", out), out


def test_tls_1_2_ecdhe_works_and_non_forward_secret_refused(setup: Setup) -> None:
    for host, cipher in (("site-a.tls.test", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                         ("rsa.tls.test", "ECDHE-RSA-AES256-GCM-SHA384")):
        ctx = setup.pki.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
        with tls_conn(setup.port, host, ctx) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            assert c.sock.version() == "TLSv1.2"
            negotiated = c.sock.cipher()
            assert negotiated is not None and negotiated[0] == cipher
            c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert c.response().status == 200
    # Plain RSA key exchange (no forward secrecy), with an RSA certificate that could do it.
    ctx = setup.pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        fetch(setup.port, "rsa.tls.test", ctx, "/")


def test_tls_1_3_default_and_alpn_selects_http11(setup: Setup) -> None:
    """HTTP/1.1 for a client that offers only it (h2 is preferred when offered: issue 9)."""
    with tls_conn(setup.port, "site-a.tls.test",
                  setup.pki.client_context(alpn=["h2", "http/1.1"])) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.selected_alpn_protocol() == "h2"
    ctx = setup.pki.client_context(alpn=["http/1.1"])
    with tls_conn(setup.port, "site-a.tls.test", ctx) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() == "TLSv1.3"
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        label = client_label(c)
        c.send(b"GET / HTTP/1.1\r\nHost: site-a.tls.test\r\nConnection: close\r\n\r\n")
        assert c.response().status == 200
    rec = wait_conn(setup.s, client=label)
    assert rec["alpn"] == "http/1.1"
    assert rec["route"] == "site:a"


# --------------------------------------------------------------------------------------------
# Handshakes that fail or stall: logged with SNI and reason, nobody else affected


def test_handshake_failures_are_logged_and_isolated(setup: Setup) -> None:
    ctx = setup.pki.client_context()
    bystander = tls_conn(setup.port, "site-a.tls.test", ctx)
    try:
        bystander.send(b"GET /1 HTTP/1.1\r\nHost: site-a.tls.test\r\n\r\n")
        assert bystander.response().status == 200

        # A ClientHello, then bytes that are not TLS records.
        garbage = RawTls.connect(("127.0.0.1", setup.port), ctx, "site-a.tls.test")
        garbage.sock.sendall(garbage.hello() + b"\x00\xffthis is not a TLS record\r\n" * 4)
        wait_closed(garbage.sock, TIMEOUT)
        garbage_label = client_label(garbage.sock)
        garbage.close()

        # A client that refuses the certificate (it does not trust the test CA).
        refusing = ssl.create_default_context()
        with pytest.raises(ssl.SSLCertVerificationError):
            fetch(setup.port, "www.site-a.tls.test", refusing, "/")

        # The connection opened before is untouched, and new ones work.
        bystander.send(b"GET /2 HTTP/1.1\r\nHost: site-a.tls.test\r\n\r\n")
        r = bystander.response()
        assert (r.status, r.body) == (200, b"this is site a")
        assert fetch(setup.port, "site-a.tls.test", ctx, "/3").status == 200
    finally:
        bystander.close()
    rec = wait_conn(setup.s, client=garbage_label)
    assert rec["sni"] == "site-a.tls.test"
    assert rec["route"] == "site:a"
    assert rec["end"].startswith("tls_handshake_failed: ")
    assert len(rec["end"]) > len("tls_handshake_failed: ")
    rec = wait_conn(setup.s, sni="www.site-a.tls.test",
                    end="tls_handshake_failed: TLSV1_ALERT_UNKNOWN_CA")
    assert rec["route"] == "site:a"
    assert setup.s.proc.poll() is None


def test_handshake_timeout(setup: Setup) -> None:
    c = RawTls.connect(("127.0.0.1", setup.port), setup.pki.client_context(), "rsa.tls.test")
    try:
        started = time.monotonic()
        c.sock.sendall(c.hello())  # then nothing: the handshake never completes
        label = client_label(c.sock)
        reply = wait_closed(c.sock, 6.0)
        waited = time.monotonic() - started
    finally:
        c.close()
    assert reply[:1] == b"\x16"  # the server's flight came, then the close
    assert 0.9 <= waited < 4.0, waited
    rec = wait_conn(setup.s, client=label)
    assert rec["sni"] == "rsa.tls.test"
    assert rec["end"].startswith("tls_handshake_failed: ")
    assert "handshake" in rec["end"].lower().removeprefix("tls_handshake_failed: ")
    assert 0.9 <= float(rec["duration"]) < 4.0


# --------------------------------------------------------------------------------------------
# Self-signed certificates


def test_self_signed_generated_covers_hosts_and_survives_restart(
        tmp_path: Path, sniport_with: SniportWith) -> None:
    state = tmp_path / "state"
    config = site_config("dev", ["dev.tls.test", "www.dev.tls.test"], "self-signed",
                         route("/", respond={"body": "dev site"}),
                         server=toml_lines(state_dir=state))

    def served_cert(s: Sniport) -> bytes:
        with tls_conn(s.port, "www.dev.tls.test", insecure_client_context()) as c:
            der = peer_der(c.sock)
            c.send(b"GET / HTTP/1.1\r\nHost: www.dev.tls.test\r\n\r\n")
            r = c.response()
            assert (r.status, r.body) == (200, b"dev site")
        return der

    s = sniport_with(config)
    first = served_cert(s)
    s.stop()
    files = sorted((state / "self-signed").glob("dev-*.pem"))
    assert len(files) == 1, files
    assert pem_fingerprint(files[0].read_text()) == der_fingerprint(first)
    cert = x509.load_der_x509_certificate(first)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["dev.tls.test", "www.dev.tls.test"]
    # curl, verifying against the generated certificate itself, accepts it for the host.
    s = sniport_with(config)
    second = served_cert(s)
    r = curl_site_with_ca(s.port, "dev.tls.test", files[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"dev site"
    s.stop()
    assert der_fingerprint(second) == der_fingerprint(first)
    assert sorted((state / "self-signed").glob("dev-*.pem")) == files


def curl_site_with_ca(port: int, host: str, ca: Path) -> subprocess.CompletedProcess[bytes]:
    return curl("--resolve", f"{host}:{port}:127.0.0.1", "--cacert", str(ca),
                f"https://{host}:{port}/")


# --------------------------------------------------------------------------------------------
# sniport check


def test_check_refuses_key_that_does_not_match(pki: Pki, tmp_path: Path) -> None:
    chain, _ = pki.cert("mismatch.tls.test", directory=tmp_path / "one")
    _, other_key = pki.cert("other.tls.test", directory=tmp_path / "two")
    config = tmp_path / "sniport.toml"
    config.write_text(site_config("bad", ["mismatch.tls.test"], (chain, other_key),
                                  route("/", respond={"body": "x"})))
    r = run_cli("check", "-c", str(config))
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: {config}: site[0](bad).tls: ")
    assert "does not match" in errors[0]
    assert str(other_key) in errors[0] and str(chain) in errors[0]


def test_check_warns_naming_an_uncovered_host(pki: Pki, tmp_path: Path) -> None:
    chain, key = pki.cert("covered.tls.test", directory=tmp_path)
    config = tmp_path / "sniport.toml"
    config.write_text(site_config("partial", ["covered.tls.test", "uncovered.tls.test"],
                                  (chain, key), route("/", respond={"body": "x"})))
    r = run_cli("check", "-c", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1, r.stdout
    assert warned[0].startswith(f"warning: {config}: site[0](partial).hosts[1]: ")
    assert "'uncovered.tls.test'" in warned[0]
    assert f"{config}: ok" in r.stdout
