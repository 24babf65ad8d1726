"""Issue 14, items 14-16 and 18-21, end to end: what a request may not get past sniport.

- 14: routes match the normalised path (an ``/admin/`` route is not bypassed by escapes, dot
  segments or doubled slashes; an encoded slash is 400), and the upstream gets that path.
- 15: redirects built with URL semantics (the Location's host is always the configured one;
  queries joined with "&"); ``sniport check`` on redirect targets; the static handler's
  directory redirect never starts with "//".
- 16: the Host header is validated (a wildcard site, the plain-HTTP redirector).
- 18: nothing a client sends forges a line of the text access log.
- 19: requests before bad bytes are answered in full, then 400 and a close.
- 20: HTTP/0.9 and "HTTP/2.0" request lines get 505; HTTP/1.0 without Host is given the
  site's name.
- 21: TLS key exchange groups; the self-signed certificate's key identifiers.

Request targets and Host values are sent raw (``HttpConn``) since curl and client libraries
normalise or refuse them; curl (``--path-as-is``) and ``openssl s_client`` where a real
client is what a user would use. One sniport serves most groups (module scope); the log and
self-signed tests have their own.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.backends import App, Rec, stopping
from support.clients import (
    HttpConn,
    Response,
    connect_tls,
    curl_site,
    plain_conn,
    request_bytes,
    s_client,
    tls_conn,
)
from support.configs import route, server_table, site_block, site_config, toml_lines
from support.data import Files, pattern_bytes, pattern_sha256
from support.pki import Pki, insecure_client_context, peer_der
from support.process import Sniport, run_cli, start_sniport
from support.waiting import wait_until

APP = "app.hard.test"  # proxy site: /admin/ answers 403, the rest goes to the App
WILD = "a.w.example.com"  # a name of the same site, through its wildcard
FILES = "files.hard.test"  # static site, root "/"
REDIR = "redir.hard.test"  # redirect site
RSA = "rsa.hard.test"  # an RSA certificate: TLS 1.2 ECDHE with any group
ADMIN_BODY = b"admin"
BIG_SIZE = 3 * 1024 * 1024
MALFORMED = b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    app: App

    @property
    def port(self) -> int:
        return self.s.port

    @property
    def http_port(self) -> int:
        return self.s.listen_port(1)

    def conn(self, sni: str | None = APP) -> HttpConn:
        ctx = self.pki.client_context(check_hostname=sni is not None)
        return HttpConn(connect_tls(ctx, sni, port=self.port, nodelay=True))

    def one(self, target: str, host: str | None = APP, *, sni: str | None = APP) -> Response:
        """One raw request (``target`` and ``host`` exactly as given) on a new connection."""
        with self.conn(sni) as c:
            c.send(request_bytes(target, host, headers=[("Connection", "close")]))
            return c.response()

    def app_count(self) -> int:
        return len(self.app.requests)

    def app_since(self, mark: int) -> list[Rec]:
        return self.app.requests[mark:]


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("hardening_requests")
    certs = tmp / "certs"
    www = Files(tmp / "www")
    www.add("big.bin", pattern_bytes(BIG_SIZE))
    www.add("a.txt", b"first file\n")
    www.add("b.txt", b"second file, a bit longer\n")
    www.add("evil.example/index.html", b"<p>a directory named like a host</p>\n")
    app = App("hard")
    server = toml_lines(workers=1, state_dir=tmp / "state", access_log=tmp / "access.log",
                        http_listen=["127.0.0.2:0"])
    config = (
        server_table(("127.0.0.1:0",), server)
        + site_block("app", [APP, "*.w.example.com"],
                     pki.cert(APP, "*.w.example.com", directory=certs),
                     route("/admin/", respond={"status": 403, "body": "admin"})
                     + route("/", proxy={"upstreams": [app.url]}))
        + site_block("files", [FILES], pki.cert(FILES, directory=certs),
                     route("/", static={"root": www.root}))
        + site_block("redir", [REDIR], pki.cert(REDIR, directory=certs),
                     route("/", redirect={"to": "https://www.example.com"})
                     + route("/q/", redirect={"to": "https://www.example.com/base?a=1"}))
        # With an ECDSA certificate, TLS 1.2 also needs the certificate's curve among the
        # client's groups (RFC 8422 section 5.1.1): an RSA one lets one group be offered.
        + site_block("rsa", [RSA], pki.cert(RSA, directory=certs, rsa=True),
                     route("/", respond={"body": "rsa"}))
        + '[default]\nto = "site:app"\n'
    )
    with stopping([app]), start_sniport(config, tmp) as s:
        yield Setup(s, pki, app)


# --------------------------------------------------------------------------------------------
# Issue 14 item 14: routes match the normalised path


BYPASSES = ["/x/../admin/secret", "/%61dmin/secret", "//admin/secret", "/./admin/secret",
            "/%2E/admin/secret", "/admin/./secret", "/ADMIN/../admin/secret"]
REFUSED_PATHS = ["/admin%2fsecret", "/admin%2Fsecret", "/admin%5Csecret", "/admin%5csecret",
                 "/admin%00secret", "/admin%0Asecret", "/%01/admin/secret", "/admin\\secret",
                 "/x/..;/admin/secret", "/..;/admin/secret"]


def test_route_matches_the_normalised_path(setup: Setup) -> None:
    """Issue 14 item 14. With an ``/admin/`` route (403 "admin") and a ``/`` proxy route,
    escapes, dot segments and doubled slashes reach ``/admin/``; before, they all went to
    the proxy's upstream verbatim (the route was bypassed)."""
    mark = setup.app_count()
    got = {}
    for target in BYPASSES:
        r = setup.one(target)
        got[target] = (r.status, r.body)
    assert got == {t: (403, ADMIN_BODY) for t in BYPASSES}
    assert setup.app_since(mark) == [], [r.target for r in setup.app_since(mark)]


def test_encoded_slash_and_friends_are_400(setup: Setup) -> None:
    """Issue 14 item 14. An encoded slash or backslash, escaped control characters, a raw
    backslash and ``/..;/`` (a dot segment to servlet containers) are 400, and the upstream
    sees none of them; before, ``/admin%2fsecret`` and the like reached the upstream."""
    mark = setup.app_count()
    got = {t: setup.one(t).status for t in REFUSED_PATHS}
    assert got == {t: 400 for t in REFUSED_PATHS}
    assert setup.app_since(mark) == [], [r.target for r in setup.app_since(mark)]


def test_upstream_receives_the_normalised_path(setup: Setup) -> None:
    """Issue 14 item 14. What the upstream receives is the path the route matched, in its
    normal form; the query exactly as sent. Before, the raw target was forwarded."""
    cases = {
        "/a/./b/../c%7e?q=%2F": "/a/c~?q=%2F",
        "/%41pi//v1/./users/%3a?x=%2e%2E&y=..": "/Api/v1/users/%3A?x=%2e%2E&y=..",
        "/a/b/../../../../etc/passwd": "/etc/passwd",
    }
    for sent, expected in cases.items():
        mark = setup.app_count()
        r = setup.one(sent)
        assert r.status == 200, (sent, r.status, r.body[:200])
        recs = setup.app_since(mark)
        assert [rec.target for rec in recs] == [expected], sent


def test_curl_path_as_is_cannot_bypass_the_admin_route(setup: Setup) -> None:
    """Issue 14 item 14, with a real client: ``curl --path-as-is`` sends dot segments as
    they are; before, ``/x/../admin/secret`` reached the upstream."""
    mark = setup.app_count()
    out = curl_site(setup.pki, setup.port, APP, "/x/../admin/secret", "--path-as-is",
                    "-w", "\n%{http_code}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"admin\n403"
    assert setup.app_since(mark) == []


# --------------------------------------------------------------------------------------------
# Issue 14 item 15: redirects built with URL semantics


def test_redirect_joins_path_with_a_slash(setup: Setup) -> None:
    """Issue 14 item 15. ``to = "https://www.example.com"`` (no path) on route ``/``:
    ``/about`` goes to ``https://www.example.com/about``; before,
    ``https://www.example.comabout``."""
    r = setup.one("/about", REDIR, sni=REDIR)
    assert (r.status, r.all("Location")) == (308, ["https://www.example.com/about"])
    r = setup.one("/", REDIR, sni=REDIR)
    assert (r.status, r.all("Location")) == (308, ["https://www.example.com/"])


HOSTILE = ["/@evil.com/", "//evil.com", "/\\evil.com", "/%2F%2Fevil.com", "/@evil.com:443/",
           "/:443@evil.com/", "///evil.com/x", "/.//evil.com", "/%40evil.com",
           "/x?@evil.com", "/#@evil.com"]


def test_redirect_location_host_is_always_the_configured_one(setup: Setup) -> None:
    """Issue 14 item 15. Whatever the path, the Location's scheme and host are the
    configured ones; before, ``/@evil.com/`` gave ``https://www.example.com@evil.com/``
    (host evil.com: an open redirect). ``/%2F%2Fevil.com`` is 400 now (encoded slash)."""
    seen = {}
    for target in HOSTILE:
        r = setup.one(target, REDIR, sni=REDIR)
        location = r.header("Location")
        seen[target] = (r.status, location)
        if r.status == 400:
            assert location is None
            continue
        assert r.status == 308, (target, r.status)
        parts = urlsplit(location or "")
        assert (parts.scheme, parts.hostname, parts.port, parts.username) == (
            "https", "www.example.com", None, None), (target, location)
    assert seen["/@evil.com/"] == (308, "https://www.example.com/@evil.com/")
    assert seen["/%2F%2Fevil.com"] == (400, None)
    assert seen["//evil.com"] == (308, "https://www.example.com/evil.com")


def test_redirect_joins_queries_with_ampersand(setup: Setup) -> None:
    """Issue 14 item 15. ``to`` with a path and a query: the rest goes under the path and
    the queries are joined with "&"; before, ``https://www.example.com/base?a=1x?b=2``."""
    r = setup.one("/q/x?b=2", REDIR, sni=REDIR)
    assert (r.status, r.all("Location")) == (308, ["https://www.example.com/base/x?a=1&b=2"])
    r = setup.one("/q/?b=2&c=%263", REDIR, sni=REDIR)
    assert (r.status, r.all("Location")) == (308, ["https://www.example.com/base?a=1&b=2&c=%263"])


def test_check_warns_about_a_redirect_without_path(tmp_path: Path, pki: Pki) -> None:
    """Issue 14 item 15. ``sniport check`` warns about ``to = "https://www.example.com"``
    ('has no path: "/" is used as its path') and still accepts it; before: no warning."""
    path = tmp_path / "sniport.toml"
    path.write_text(site_config("r", [REDIR], pki.cert(REDIR, directory=tmp_path),
                                route("/", redirect={"to": "https://www.example.com"})))
    out = run_cli("check", "-c", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'has no path: "/" is used as its path' in out.stdout + out.stderr


def test_check_refuses_a_redirect_target_that_does_not_parse(tmp_path: Path, pki: Pki) -> None:
    """Issue 14 item 15. ``to = "https://[::1"`` cannot be a URL: ``sniport check`` refuses
    the config, naming it; before, it was accepted (and failed at every request)."""
    path = tmp_path / "sniport.toml"
    path.write_text(site_config("r", [REDIR], pki.cert(REDIR, directory=tmp_path),
                                route("/", redirect={"to": "https://[::1"})))
    out = run_cli("check", "-c", str(path))
    assert out.returncode != 0, out.stdout + out.stderr
    assert "https://[::1" in out.stdout + out.stderr


def test_static_directory_redirect_never_starts_with_two_slashes(setup: Setup) -> None:
    """Issue 14 item 15. A directory requested without its trailing slash gets 301 to the
    slash form, built from the normalised path: ``//evil.example`` gives
    ``Location: /evil.example/``; before, ``//evil.example/`` (a network-path reference: the
    browser goes to the host evil.example)."""
    for target, location in (("//evil.example", "/evil.example/"),
                             ("///evil.example?x=1", "/evil.example/?x=1"),
                             ("/evil.example", "/evil.example/")):
        r = setup.one(target, FILES, sni=FILES)
        assert (r.status, r.all("Location")) == (301, [location]), target


# --------------------------------------------------------------------------------------------
# Issue 14 item 16: Host validated


BAD_HOSTS = ["evil/.w.example.com", "a b.w.example.com", "2130706433/.w.example.com",
             "evil@.w.example.com", "a%2e.w.example.com", "a\\.w.example.com"]


def test_bad_host_on_a_wildcard_site_is_400(setup: Setup) -> None:
    """Issue 14 item 16. On a site with ``*.w.example.com``, a Host that is not a host name
    but ends in ``.w.example.com`` is 400 and never reaches the upstream; before, it was
    served and forwarded as the upstream's Host."""
    mark = setup.app_count()
    got = {h: setup.one("/p", h, sni=WILD).status for h in BAD_HOSTS}
    assert got == {h: 400 for h in BAD_HOSTS}
    assert setup.app_since(mark) == [], [r.get("Host") for r in setup.app_since(mark)]
    # Good names are served, through the wildcard, in any case, with a trailing dot and port.
    for host in (WILD, "A.W.EXAMPLE.COM.:443", "b-1.w.example.com"):
        mark = setup.app_count()
        r = setup.one("/p", host, sni=WILD)
        assert r.status == 200, (host, r.status)
        assert [rec.target for rec in setup.app_since(mark)] == ["/p"]


def test_bad_host_on_the_http_port_is_400(setup: Setup) -> None:
    """Issue 14 item 16. The plain-HTTP redirector answers 400 to a Host that is not a host
    name; before, ``Host: 2130706433/.w.example.com`` got
    ``Location: https://2130706433/.w.example.com:PORT/p`` (a redirect to 127.0.0.1)."""
    got = {}
    for host in BAD_HOSTS:
        with plain_conn(setup.http_port, host="127.0.0.2") as c:
            c.send(request_bytes("/p", host))
            r = c.response()
            got[host] = (r.status, r.header("Location"))
    assert got == {h: (400, None) for h in BAD_HOSTS}
    with plain_conn(setup.http_port, host="127.0.0.2") as c:
        c.send(request_bytes("/p?q=1", WILD))
        r = c.response()
    assert (r.status, r.all("Location")) == (308, [f"https://{WILD}:{setup.port}/p?q=1"])


# --------------------------------------------------------------------------------------------
# Issue 14 item 19: answer what was asked, then close


def _then_400_and_close(c: HttpConn) -> None:
    r = c.response()
    assert r.status == 400, (r.status, r.body[:200])
    assert r.header("Connection") == "close"
    assert c.closed_within(5.0)


def test_static_response_complete_before_the_400(setup: Setup) -> None:
    """Issue 14 item 19. ``GET /big.bin`` (3 MiB) and a malformed request in one write: the
    whole 200 arrives, then 400 with ``Connection: close``, then EOF; before, the response
    stopped at 2 MiB."""
    with setup.conn(FILES) as c:
        c.send(request_bytes("/big.bin", FILES) + MALFORMED)
        r = c.response()
        assert r.status == 200
        assert len(r.body) == BIG_SIZE
        assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(BIG_SIZE)
        _then_400_and_close(c)


def test_proxied_response_complete_before_the_400(setup: Setup) -> None:
    """Issue 14 item 19. Through the proxy: the upstream's 200 (1 MiB) arrives complete,
    then 400 and the close; before, the request ran upstream and the client got nothing."""
    size = 1024 * 1024
    mark = setup.app_count()
    with setup.conn(APP) as c:
        c.send(request_bytes(f"/dl/_/download/{size}/cl", APP) + MALFORMED)
        r = c.response()
        assert r.status == 200, (r.status, r.body[:200])
        assert len(r.body) == size
        assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(size)
        _then_400_and_close(c)
    assert [rec.target for rec in setup.app_since(mark)] == [f"/dl/_/download/{size}/cl"]


def test_pipelined_requests_answered_in_order_before_the_400(setup: Setup) -> None:
    """Issue 14 item 19. Two valid pipelined requests (the first proxied, the second a fixed
    answer) and garbage: both answered, in order, then 400 and the close; before, the
    connection closed with neither answer."""
    mark = setup.app_count()
    with setup.conn(APP) as c:
        c.send(request_bytes("/pipe/1?n=1", APP) + request_bytes("/admin/x", APP)
               + b"\x00\x01garbage\r\n\r\n")
        first, second = c.response(), c.response()
        assert first.status == 200, (first.status, first.body[:200])
        assert b'"target": "/pipe/1?n=1"' in first.body
        assert (second.status, second.body) == (403, ADMIN_BODY)
        _then_400_and_close(c)
    assert [rec.target for rec in setup.app_since(mark)] == ["/pipe/1?n=1"]


# --------------------------------------------------------------------------------------------
# Issue 14 item 20: HTTP/0.9, HTTP/2.0 request lines, HTTP/1.0 without Host


@pytest.mark.parametrize("head", [b"GET /\r\n\r\n", b"GET /p HTTP/2.0\r\nHost: " +
                                  APP.encode() + b"\r\n\r\n"],
                         ids=["http09", "http2.0"])
def test_unsupported_versions_get_505(setup: Setup, head: bytes) -> None:
    """Issue 14 item 20. An HTTP/0.9 request line and one saying ``HTTP/2.0`` get 505 and
    a close, and nothing reaches the upstream; before, both were forwarded as HTTP/1.1
    (without Host)."""
    mark = setup.app_count()
    with setup.conn(APP) as c:
        c.send(head)
        r = c.response()
        assert r.status == 505, (r.status, r.body[:200])
        assert c.closed_within(5.0)
    assert setup.app_since(mark) == []


@pytest.mark.parametrize(("sni", "expected"), [(WILD, WILD), (APP, APP), (None, APP)],
                         ids=["sni-wildcard-name", "sni-first-name", "no-sni-default-to"])
def test_http10_without_host_gets_the_sites_name(setup: Setup, sni: str | None,
                                                  expected: str) -> None:
    """Issue 14 item 20. HTTP/1.0 without Host is served as if its Host were the site's
    name: the SNI when it is one of the site's names, else (no SNI, ``[default].to``) the
    site's first host; the upstream receives that Host. Before, it was forwarded as HTTP/1.1
    without Host."""
    mark = setup.app_count()
    with setup.conn(sni) as c:
        c.send(b"GET /v10?x=1 HTTP/1.0\r\n\r\n")
        r = c.response()
    assert r.status == 200, (r.status, r.body[:200])
    recs = setup.app_since(mark)
    assert len(recs) == 1
    assert recs[0].target == "/v10?x=1"
    assert recs[0].one("Host") == expected


# --------------------------------------------------------------------------------------------
# Issue 14 item 21: key exchange groups


def _temp_key(port: int, version: str, group: str, ca: Path) -> str | None:
    """``openssl s_client -groups GROUP``: the key exchange it reports ("X25519", "ECDH,
    prime256v1"...), or None when the handshake failed."""
    r = s_client(port, "-servername", RSA, "-CAfile", str(ca), f"-{version}", "-groups", group)
    found = re.search(r"^Server Temp Key: (.*?), \d+ bits$", r.stdout.decode("latin-1"),
                      re.MULTILINE)
    if r.returncode != 0:
        assert found is None, r.stdout
        return None
    assert found is not None, r.stdout
    return found.group(1)


@pytest.mark.parametrize("version", ["tls1_3", "tls1_2"])
def test_key_exchange_groups(setup: Setup, version: str) -> None:
    """Issue 14 item 21. Only X25519, P-256 and P-384: ``openssl s_client -groups X448`` and
    ``-groups P-521`` fail the handshake, the three others succeed with the group asked for
    (TLS 1.3 and 1.2); before, X448 and P-521 were accepted."""
    outcome = {g: _temp_key(setup.port, version, g, setup.pki.ca_file)
               for g in ("X25519", "P-256", "P-384", "X448", "P-521")}
    assert outcome == {"X25519": "X25519", "P-256": "ECDH, prime256v1",
                       "P-384": "ECDH, secp384r1", "X448": None, "P-521": None}


# --------------------------------------------------------------------------------------------
# Issue 14 item 21: the self-signed certificate's key identifiers


FRESH = "fresh.selfsigned.test"  # no certificate in state_dir: generated at start
STALE = "stale.selfsigned.test"  # a certificate of the old kind (no AKI) waits in state_dir


def _self_signed_paths(state_dir: Path, site: str, hosts: Sequence[str]) -> tuple[Path, Path]:
    """Where sniport keeps a site's self-signed certificate and key (net/tls.py
    ``self_signed``): ``state_dir/self-signed/SITE-TAG.pem`` and ``.key``, the tag naming
    the hosts."""
    tag = hashlib.sha256("\n".join(sorted(hosts)).encode()).hexdigest()[:12]
    base = state_dir / "self-signed" / f"{site}-{tag}"
    return base.with_suffix(".pem"), base.with_suffix(".key")


def _write_old_self_signed(cert_path: Path, key_path: Path, host: str) -> x509.Certificate:
    """A certificate as the old version made it: valid for a year, without key identifiers
    (neither AuthorityKeyIdentifier nor SubjectKeyIdentifier)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


@dataclass
class SelfSigned:
    s: Sniport
    state_dir: Path
    planted: x509.Certificate  # the old-style certificate STALE had before the start

    def served(self, sni: str) -> x509.Certificate:
        with connect_tls(insecure_client_context(), sni, port=self.s.port) as tls:
            return x509.load_der_x509_certificate(peer_der(tls))


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SelfSigned]:
    tmp = tmp_path_factory.mktemp("hardening_self_signed")
    state_dir = tmp / "state"
    planted = _write_old_self_signed(*_self_signed_paths(state_dir, "stale", [STALE]), STALE)
    config = (server_table(("127.0.0.1:0",), toml_lines(workers=1, state_dir=state_dir))
              + site_block("fresh", [FRESH], "self-signed", route("/", respond={"body": "f"}))
              + site_block("stale", [STALE], "self-signed", route("/", respond={"body": "s"})))
    with start_sniport(config, tmp) as s:
        yield SelfSigned(s, state_dir, planted)


def _assert_key_identifiers(cert: x509.Certificate) -> None:
    present = {type(ext.value) for ext in cert.extensions}
    assert {x509.AuthorityKeyIdentifier, x509.SubjectKeyIdentifier} <= present, present
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    # Self-signed: both name the certificate's own key.
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert aki.key_identifier == ski.digest


def test_self_signed_certificate_has_both_key_identifiers(self_signed: SelfSigned) -> None:
    """Issue 14 item 21. ``tls = "self-signed"`` generates a certificate with both the
    Subject and the Authority Key Identifier (RFC 5280 sections 4.2.1.1-2), in state_dir
    and as served; before, it had no AKI (strict validators refuse it)."""
    cert_path, _ = _self_signed_paths(self_signed.state_dir, "fresh", [FRESH])
    stored = x509.load_pem_x509_certificate(cert_path.read_bytes())
    _assert_key_identifiers(stored)
    served = self_signed.served(FRESH)
    assert served == stored
    _assert_key_identifiers(served)


def test_old_self_signed_certificate_is_replaced(self_signed: SelfSigned) -> None:
    """Issue 14 item 21. A self-signed certificate made by the old version (no AKI), still
    valid for a year, is replaced at the next start by one with both identifiers; before,
    it was reused until 30 days before its expiry."""
    cert_path, key_path = _self_signed_paths(self_signed.state_dir, "stale", [STALE])
    stored = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert stored != self_signed.planted
    _assert_key_identifiers(stored)
    served = self_signed.served(STALE)
    assert served == stored
    # The key on disk is the one of the new certificate.
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == stored.public_key()


# --------------------------------------------------------------------------------------------
# Issue 14 item 18: log injection


LOGGED = "log.hard.test"
FORGED = "2099-01-01T00:00:00Z\tconn\tclient:6.6.6.6:6666\tend:forged"
# No space, quote or "=" (the old code quoted a value holding one of those): only the newline
# stands between the ALPN name and a line of its own.
FORGED_ALPN = "x\r\n" + FORGED
CONN_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ conn client=127\.0\.0\.1:\d+ ")
REQUEST_LINE = re.compile(r'127\.0\.0\.1 - - \[[^\]]+\] "')


def test_text_log_escapes_what_clients_send(pki: Pki, tmp_path: Path) -> None:
    """Issue 14 item 18. An ALPN name holding CR LF and a fake log line, a Host with a tab, a
    Host with an escape character (400 from the parser), a User-Agent and a Referer with a
    tab, quotes and bytes above 0x7E: the text access log has exactly one line per
    connection and per request, no line starts with the forged content, and the escaped
    forms are there (JSON-string style in ``key=value`` fields, ``\\xHH`` in the combined
    format's quoted fields). Before, the ALPN name and ``host=`` went in unquoted: the
    newline forged a line."""
    log = tmp_path / "access.log"
    config = site_config("log", [LOGGED], pki.cert(LOGGED, directory=tmp_path),
                         route("/", respond={"body": "ok"}),
                         server=toml_lines(workers=1, access_log=log, log_format="text"))
    close = [("Connection", "close")]
    requests: list[tuple[bytes, int]] = [
        (request_bytes("/tab", f"a\tb.{LOGGED}", headers=close), 400),
        (request_bytes("/esc", f"\x1b[2J.{LOGGED}", headers=close), 400),
        (request_bytes("/agent", LOGGED, headers=[("User-Agent", 'ua\t"q" \xe9\xff'),
                                                   ("Referer", "r\x80\\"), *close]), 200),
    ]
    with start_sniport(config, tmp_path) as s:
        ctx = pki.client_context(alpn=["http/1.1", FORGED_ALPN])
        with HttpConn(connect_tls(ctx, LOGGED, port=s.port)) as c:
            c.send(request_bytes("/alpn", LOGGED, headers=close))
            assert c.response().status == 200
        statuses = []
        for head, _ in requests:
            with tls_conn(s.port, LOGGED, pki.client_context()) as c:
                c.send(head)
                statuses.append(c.response().status)
        connections = 1 + len(requests)

        def lines() -> list[str]:
            # Lines as a file reader sees them: split at "\n" only (str.splitlines would
            # also split at "\r", "\x1c"...), the last one ended.
            return log.read_text(encoding="utf-8").split("\n")[:-1] if log.exists() else []

        wait_until(lambda: sum(1 for x in lines() if CONN_LINE.match(x)) >= connections
                   and sum(1 for x in lines() if REQUEST_LINE.match(x)) >= connections,
                   what=lambda: "\n".join(lines()))
    text = log.read_text(encoding="utf-8")
    found = lines()
    assert len(found) == 2 * connections, text
    assert [x for x in found if not (CONN_LINE.match(x) or REQUEST_LINE.match(x))] == []
    assert not any(x.startswith("2099-") for x in found)
    # Nothing but printable ASCII: every control character and byte above 0x7E is escaped.
    assert re.fullmatch(r"[\x20-\x7e\n]*", text), [x for x in found if not x.isprintable()]
    # key=value fields as JSON strings; combined-format fields as nginx writes them.
    assert "alpn=" + json.dumps("http/1.1," + FORGED_ALPN) + " " in text
    assert 'host="a\\tb.log.hard.test" ' in text
    assert '"r\\x80\\\\" "ua\\x09\\"q\\" \\xE9\\xFF"' in text
    # The request with an escape character in its Host was refused by the parser, and
    # still logged: one request line, its Host not taken.
    assert sum(1 for x in found if '"GET /esc HTTP/1.1" 400 ' in x) == 1
    assert statuses == [status for _, status in requests]
