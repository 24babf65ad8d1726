"""Issue 10 items 3-6: what workers and the master do with certificates and challenges,
on real sockets, without a CA (``test_acme_e2e.py`` runs the whole thing against pebble).

One sniport with an ACME site (its directory unreachable, so it keeps its temporary
self-signed certificate until the test puts one in the storage), a site with certificate
files, and a passthrough block whose backend is a TLS server of the test's own (and whose
``http_upstream`` is a plain HTTP server of the test's own). Challenges are published into
the storage with ``DirectoryStorage``, as the ACME service does.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.clients import fetch, plain_conn, request_bytes, tls_conn
from support.configs import route, site_block, toml_lines
from support.load import Load
from support.pki import Pki, insecure_client_context, pem_fingerprint
from support.process import Sniport, run_cli, start_sniport

from sniport.certs.directory import DirectoryStorage
from sniport.wire import acme

AUTO = "auto.acme.test"
FILES = "files.acme.test"
LAN = "lan.acme.test"
CLOSED = "closed.acme.test"  # a passthrough block that denies the tests' address
SWAP_WAIT = 15.0  # the watcher looks every 3 s; workers apply at once


class Backend:
    """The machine behind the passthrough block: TLS with its own certificate, offering
    ``acme-tls/1`` (as an ACME client answering its own challenge would); it records the
    protocol each handshake chose."""

    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki.cert(LAN, directory=tmp / "backend"))
        self.ctx.set_alpn_protocols([acme.ACME_TLS_ALPN, "http/1.1"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.chosen: list[str | None] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    self.chosen.append(tls.selected_alpn_protocol())
            except (OSError, ssl.SSLError):
                raw.close()


class PlainBackend(http.server.BaseHTTPRequestHandler):
    """The passthrough machine's own port 80: says what it received."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        text = f"backend {self.command} {self.path} {self.headers['Host']} {len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    tmp: Path
    storage: DirectoryStorage
    backend: Backend
    files: tuple[Path, Path]

    @property
    def http_port(self) -> int:
        return self.s.listen_port(1)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("acme_serving")
    backend = Backend(pki, tmp)
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PlainBackend)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    files = pki.cert(FILES, directory=tmp / "files")
    config = (
        "[server]\n" + toml_lines(listen=["127.0.0.1:0"], http_listen=["127.0.0.1:0"],
                                  workers=2, state_dir=tmp / "state")
        # Nothing listens on port 1: the ACME service fails, backs off, and the site keeps
        # what the test gives it.
        + "\n[acme]\n" + toml_lines(directory="https://127.0.0.1:1/dir")
        + "\n" + site_block("auto", [AUTO], "acme", route("/", respond={"body": "auto"}))
        + site_block("files", [FILES], files, route("/", respond={"body": "files"}))
        + "[[passthrough]]\n" + toml_lines(
            name="lan", hosts=[LAN], upstreams=[f"127.0.0.1:{backend.port}"],
            http_upstream=f"127.0.0.1:{plain.server_address[1]}")
        + "[[passthrough]]\n" + toml_lines(
            name="closed", hosts=[CLOSED], upstreams=[f"127.0.0.1:{backend.port}"],
            http_upstream=f"127.0.0.1:{plain.server_address[1]}", deny=["127.0.0.1/32"]))
    s = start_sniport(config, tmp)
    try:
        yield Setup(s, pki, tmp, DirectoryStorage(str(tmp / "state" / "acme")), backend, files)
    finally:
        s.stop()
        plain.shutdown()
        backend.sock.close()


def served_certificate(port: int, name: str, alpn: list[str] | None = None) -> x509.Certificate:
    ctx = insecure_client_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def handshake_alpn(port: int, name: str, alpn: list[str]) -> tuple[str | None, x509.Certificate]:
    ctx = insecure_client_context()
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return tls.selected_alpn_protocol(), x509.load_der_x509_certificate(der)


def challenge(kind: str, name: str, token: str) -> acme.Challenge:
    return acme.Challenge(kind, name, "https://ca.invalid/chall/1", token, f"{token}.thumb")


def test_an_acme_site_serves_a_temporary_self_signed_certificate_and_says_why(
        setup: Setup) -> None:
    cert = served_certificate(setup.s.port, AUTO)
    assert cert.issuer == cert.subject  # self-signed
    setup.s.wait_log(rf"no ACME certificate for {AUTO} yet: serving a temporary self-signed")


def test_tls_alpn_01_for_our_acme_name_gets_the_challenge_certificate(setup: Setup) -> None:
    """RFC 8737 section 3: ALPN acme-tls/1 negotiated, one dNSName, the critical
    acmeIdentifier extension holding SHA-256 of the key authorization."""
    ch = challenge("tls-alpn-01", AUTO, "tok-alpn-1")
    setup.storage.publish_challenge(ch)
    try:
        mark = setup.s.mark()
        chosen, cert = handshake_alpn(setup.s.port, AUTO, [acme.ACME_TLS_ALPN])
        assert chosen == acme.ACME_TLS_ALPN
        ext = cert.extensions.get_extension_for_oid(acme.ID_PE_ACME_IDENTIFIER)
        assert ext.critical
        assert isinstance(ext.value, x509.UnrecognizedExtension)
        assert ext.value.value == b"\x04\x20" + hashlib.sha256(ch.key_authorization.encode()
                                                                ).digest()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [AUTO]
        setup.s.wait_log(rf"sni={AUTO}.*acme_tls_alpn_01", start=mark)
    finally:
        setup.storage.withdraw_challenge(ch)


@pytest.mark.parametrize(("name", "alpn", "why"), [
    (AUTO, [acme.ACME_TLS_ALPN], "no challenge pending"),
    (FILES, [acme.ACME_TLS_ALPN], "not an ACME name"),
    (AUTO, [acme.ACME_TLS_ALPN, "http/1.1"], "acme-tls/1 offered with other protocols"),
])
def test_other_acme_tls_hellos_fail_the_handshake(setup: Setup, name: str, alpn: list[str],
                                                   why: str) -> None:
    ch = challenge("tls-alpn-01", AUTO, "tok-alpn-2")
    if why != "no challenge pending":
        setup.storage.publish_challenge(ch)
    try:
        mark = setup.s.mark()
        with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application"):
            handshake_alpn(setup.s.port, name, alpn)
        setup.s.wait_log(rf"sni={name}.*acme_tls_alpn_refused: {why}", start=mark)
    finally:
        setup.storage.withdraw_challenge(ch)
    # The site itself goes on serving normal hellos.
    assert fetch(setup.s.port, name, insecure_client_context(), "/").status == 200


def test_acme_tls_hello_for_a_passthrough_name_is_relayed_untouched(setup: Setup) -> None:
    before = len(setup.backend.chosen)
    chosen, cert = handshake_alpn(setup.s.port, LAN, [acme.ACME_TLS_ALPN])
    assert chosen == acme.ACME_TLS_ALPN
    assert cert.subject.rfc4514_string() != ""  # the backend's own certificate:
    assert LAN in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    deadline = time.monotonic() + 5  # the backend's thread notes it after the client
    while len(setup.backend.chosen) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert setup.backend.chosen[before:] == [acme.ACME_TLS_ALPN]


def test_http_01_answers_before_the_redirect(setup: Setup) -> None:
    ch = challenge("http-01", AUTO, "tok-http-1")
    setup.storage.publish_challenge(ch)
    try:
        with plain_conn(setup.http_port) as c:
            c.send(request_bytes(acme.http01_path(ch.token), AUTO))
            r = c.response()
            assert r.status == 200
            assert r.body == ch.key_authorization.encode()
            c.send(request_bytes(acme.http01_path("unknown-token"), AUTO))
            assert c.response().status == 404
            c.send(request_bytes("/elsewhere", AUTO))
            r = c.response()
            assert r.status == 308
            assert r.header("location") == f"https://{AUTO}:{setup.s.port}/elsewhere"
    finally:
        setup.storage.withdraw_challenge(ch)
    with plain_conn(setup.http_port) as c:  # withdrawn: gone at once
        c.send(request_bytes(acme.http01_path(ch.token), AUTO))
        assert c.response().status == 404
        # A site with certificate files may be renewed by another ACME client (certbot
        # --webroot) that the CA reaches through the redirect: not intercepted.
        c.send(request_bytes(acme.http01_path(ch.token), FILES))
        r = c.response()
        assert r.status == 308
        assert r.header("location") == \
            f"https://{FILES}:{setup.s.port}{acme.http01_path(ch.token)}"


def test_plain_http_for_a_passthrough_name_goes_to_its_http_upstream(setup: Setup) -> None:
    with plain_conn(setup.http_port) as c:
        c.send(request_bytes("/.well-known/acme-challenge/abc", f"{LAN}:80"))
        r = c.response()
        assert r.status == 200
        assert r.body == f"backend GET /.well-known/acme-challenge/abc {LAN}:80 0".encode()
        c.send(request_bytes("/upload", LAN, method="POST", body=b"x" * 1000))
        assert c.response().body == f"backend POST /upload {LAN} 1000".encode()


def test_http_upstream_keeps_the_blocks_deny_list_but_lets_its_challenges_through(
        setup: Setup) -> None:
    with plain_conn(setup.http_port) as c:
        c.send(request_bytes("/private", CLOSED))
        assert c.response().status == 403
        c.send(request_bytes("/.well-known/acme-challenge/abc", CLOSED))
        r = c.response()
        assert r.status == 200
        assert r.body == f"backend GET /.well-known/acme-challenge/abc {CLOSED} 0".encode()


def wait_served(port: int, name: str, fingerprint: str, timeout: float = SWAP_WAIT) -> float:
    """Seconds until a new handshake gets the certificate with ``fingerprint``."""
    start = time.monotonic()
    while True:
        der = served_certificate(port, name).public_bytes(serialization.Encoding.DER)
        if hashlib.sha256(der).hexdigest() == fingerprint:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "the new certificate was not served"
        time.sleep(0.2)


def test_a_certificate_in_the_acme_storage_is_served_without_a_reload(setup: Setup) -> None:
    """What the ACME service saves reaches every worker: new handshakes get it, a
    connection made before goes on with the old one."""
    ctx = insecure_client_context()
    with tls_conn(setup.s.port, AUTO, ctx) as before:
        before.send(request_bytes("/", AUTO))
        assert before.response().body == b"auto"
        chain, key = setup.pki.cert(AUTO, directory=setup.tmp / "obtained")
        setup.storage.save_certificate([AUTO], chain.read_bytes(), key.read_bytes())
        wait_served(setup.s.port, AUTO, pem_fingerprint(chain.read_bytes()))
        # Every worker: a dozen new connections all verify against the test CA.
        for _ in range(12):
            assert fetch(setup.s.port, AUTO, setup.pki.client_context(), "/").body == b"auto"
        before.send(request_bytes("/", AUTO))
        assert before.response().body == b"auto"
    assert "reloading" not in setup.s.log()
    setup.s.wait_log(rf"certificate ACME {AUTO} changed: serving the new one")


def test_status_lists_each_certificate(setup: Setup) -> None:
    status = json.loads((setup.tmp / "state" / "sniport.status.json").read_text())
    by_site = {c["site"]: c for c in status["certificates"]}
    assert set(by_site) == {"auto", "files"}
    assert by_site["files"]["source"] == "file"
    assert by_site["files"]["names"] == [FILES]
    assert by_site["files"]["not_after"] > time.time()
    assert by_site["auto"]["source"] in ("acme", "self-signed (until ACME obtains one)")
    out = run_cli("status", "-c", str(setup.s.config), cwd=setup.tmp)
    assert out.returncode == 0, out.stderr
    assert f"certificate: site files (file)\n  names:        {FILES}" in out.stdout
    assert "certificate: site auto" in out.stdout
    out = run_cli("status", "--json", "-c", str(setup.s.config), cwd=setup.tmp)
    assert json.loads(out.stdout)["certificates"] == status["certificates"]


def test_rewritten_certificate_files_are_picked_up_and_a_broken_pair_is_refused(
        setup: Setup) -> None:
    chain, key = setup.files
    # A broken pair: the certificate of another key. Logged, and the old one kept.
    other_chain, _ = setup.pki.cert(FILES, directory=setup.tmp / "other")
    old = pem_fingerprint(chain.read_bytes())
    mark = setup.s.mark()
    shutil.copy(other_chain, chain)
    setup.s.wait_log(r"certificate .*files.acme.test.pem .* changed but cannot be used: the key "
                     "does not match", timeout=SWAP_WAIT, start=mark)
    assert wait_served(setup.s.port, FILES, old, timeout=1) < 1
    # A good pair: served from the next handshake on.
    new_chain, new_key = setup.pki.cert(FILES, directory=setup.tmp / "renewed")
    shutil.copy(new_key, key)
    shutil.copy(new_chain, chain)
    wait_served(setup.s.port, FILES, pem_fingerprint(new_chain.read_bytes()))
    assert fetch(setup.s.port, FILES, setup.pki.client_context(), "/").body == b"files"


def test_certificate_files_rewritten_under_load_fail_no_request(setup: Setup) -> None:
    """Three renewals in a row while clients keep connecting (a new handshake each) and a
    keep-alive connection made before the first keeps asking: no request fails, and each
    new certificate is served."""
    chain, key = setup.files
    load = Load(setup.s.port, FILES)
    try:
        with tls_conn(setup.s.port, FILES, insecure_client_context()) as kept:
            for n in range(3):
                new_chain, new_key = setup.pki.cert(FILES, directory=setup.tmp / f"load{n}")
                shutil.copy(new_key, key)
                shutil.copy(new_chain, chain)
                wait_served(setup.s.port, FILES, pem_fingerprint(new_chain.read_bytes()))
                kept.send(request_bytes("/", FILES))
                assert kept.response().body == b"files"
    finally:
        load.stop()
    assert load.ok > 20 and load.failures == []


def test_a_site_whose_hosts_grew_keeps_its_certificate_until_the_new_one_comes(
        pki: Pki, tmp_path: Path) -> None:
    """Found in review: adding a host to an ACME site made its certificate (keyed by its
    set of names) missing, and every host fell back to the self-signed stand-in until the
    new order succeeded. The certificate of the former hosts serves meanwhile."""
    one, two = "one.grow.test", "two.grow.test"
    storage = DirectoryStorage(str(tmp_path / "state" / "acme"))
    chain, key = pki.cert(one, directory=tmp_path / "obtained")
    storage.save_certificate([one], chain.read_bytes(), key.read_bytes())

    def config(hosts: list[str]) -> str:
        return ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=1,
                                          state_dir=tmp_path / "state")
                + "\n[acme]\n" + toml_lines(directory="https://127.0.0.1:1/dir")
                + "\n" + site_block("grow", hosts, "acme", route("/", respond={"body": "g"})))

    s = start_sniport(config([one]), tmp_path)
    try:
        assert fetch(s.port, one, pki.client_context(), "/").body == b"g"
        (tmp_path / "sniport.toml").write_text(config([one, two]))
        mark = s.mark()
        assert run_cli("reload", "-c", str(tmp_path / "sniport.toml"),
                       cwd=tmp_path).returncode == 0
        s.wait_log(rf"no ACME certificate for {one}, {two} yet: serving the certificate for "
                   rf"{one} until it is obtained", start=mark)
        assert fetch(s.port, one, pki.client_context(), "/").body == b"g"  # verified
        status = json.loads((tmp_path / "state" / "sniport.status.json").read_text())
        assert status["certificates"][0]["source"] == \
            f"the certificate for {one} (until ACME obtains one)"
        both_chain, both_key = pki.cert(one, two, directory=tmp_path / "both")
        storage.save_certificate([two, one], both_chain.read_bytes(), both_key.read_bytes())
        wait_served(s.port, two, pem_fingerprint(both_chain.read_bytes()))
        assert fetch(s.port, two, pki.client_context(), "/").body == b"g"
    finally:
        s.stop()
