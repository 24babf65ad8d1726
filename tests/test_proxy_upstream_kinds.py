"""Reverse proxy, kinds of upstream: HTTP over a unix socket, and https:// upstreams whose
certificate is verified against ``ca`` (with SNI sent), refused with the wrong CA or against
the system store, and accepted with ``verify = false``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme
from support.backends import App, echo_of, stopping
from support.clients import Response, curl_site, fetch
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.pki import Pki, server_context
from support.process import Sniport, start_sniport


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    apps: dict[str, App]

    def get(self, target: str, method: str = "GET", body: bytes = b"") -> Response:
        return fetch(self.s.port, HOST, self.pki.client_context(), target, method=method,
                     body=body)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("proxy_kinds")
    certs = tmp / "upstream-certs"
    other_ca = trustme.CA()
    apps = {
        "unix": App("unix", unix_path=tmp / "app.sock"),
        # Certificates for the address sniport connects to: an IP, and a name.
        "tls-ip": App("tls-ip", tls=server_context(pki.cert("127.0.0.1", directory=certs / "ip"))),
        "tls-name": App("tls-name", tls=server_context(pki.cert("localhost",
                                                                directory=certs / "name"))),
        "tls-other-ca": App("tls-other-ca", tls=server_context(
            Pki(other_ca, certs / "other").cert("127.0.0.1"))),
    }
    ca = str(pki.ca_file)
    name_url = f"https://localhost:{apps['tls-name'].port}"
    routes = "".join([
        proxy_route("/unix/", [apps["unix"].url]),
        proxy_route("/tls/", [apps["tls-ip"].url], ca=ca),
        proxy_route("/tlsname/", [name_url], ca=ca),
        proxy_route("/tlsname-host/", [name_url], ca=ca, host="upstream"),
        proxy_route("/wrongca/", [apps["tls-other-ca"].url], ca=ca, max_fails=0),
        proxy_route("/systemstore/", [apps["tls-ip"].url], max_fails=0),
        proxy_route("/noverify/", [apps["tls-other-ca"].url], verify=False),
    ])
    with stopping(apps.values()), start_sniport(proxy_site_config(pki, tmp, routes), tmp) as s:
        yield Setup(s, pki, apps)


def test_unix_socket_upstream(setup: Setup) -> None:
    app = setup.apps["unix"]
    body = b"over a unix socket" * 1000
    r = setup.get("/unix/path?q=1", method="POST", body=body)
    assert r.status == 200
    echo = echo_of(r.body)
    assert echo["app"] == "unix"
    assert echo["target"] == "/unix/path?q=1"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["host"] == HOST
    assert headers["x-forwarded-for"] == "127.0.0.1"
    # Pooled like TCP ones.
    for i in range(4):
        assert setup.get(f"/unix/{i}").status == 200
    assert app.connections == 1
    c = curl_site(setup.pki, setup.s.port, HOST, "/unix/curl")
    assert c.returncode == 0, c.stderr
    assert echo_of(c.stdout)["target"] == "/unix/curl"


def test_https_upstream_verified_with_ca(setup: Setup) -> None:
    app = setup.apps["tls-ip"]
    body = b"secret" * 10000
    r = setup.get("/tls/x?y=2", method="PUT", body=body)
    assert r.status == 200
    echo = echo_of(r.body)
    assert (echo["app"], echo["method"], echo["target"]) == ("tls-ip", "PUT", "/tls/x?y=2")
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    for i in range(3):
        assert setup.get(f"/tls/{i}").status == 200
    assert app.connections == 1  # TLS connections are pooled too


def test_https_upstream_by_name_gets_sni(setup: Setup) -> None:
    app = setup.apps["tls-name"]
    r = setup.get("/tlsname/x")
    assert r.status == 200
    assert echo_of(r.body)["app"] == "tls-name"
    assert app.snis == ["localhost"]


def test_https_upstream_host_upstream_sends_its_name(setup: Setup) -> None:
    """host = "upstream": the Host the application sees is its own name, as written."""
    app = setup.apps["tls-name"]
    r = setup.get("/tlsname-host/x")
    assert r.status == 200
    headers = {k.lower(): v for k, v in echo_of(r.body)["headers"]}
    assert headers["host"] == f"localhost:{app.port}"


def test_https_upstream_with_a_certificate_from_another_ca_is_refused(setup: Setup) -> None:
    app = setup.apps["tls-other-ca"]
    before = len(app.requests)
    r = setup.get("/wrongca/x")
    assert r.status == 502
    assert len(r.body) <= 100
    assert len(app.requests) == before
    setup.s.wait_log(rf"{re.escape(app.label)}\b[^\n]*(?i:certificate|verify|tls)", timeout=5)


def test_https_upstream_is_verified_against_the_system_store_by_default(setup: Setup) -> None:
    app = setup.apps["tls-ip"]
    before = len(app.requests)
    r = setup.get("/systemstore/x")
    assert r.status == 502  # the test CA is in no system store
    assert len(app.requests) == before


def test_https_upstream_with_verify_false(setup: Setup) -> None:
    r = setup.get("/noverify/x")
    assert r.status == 200
    assert echo_of(r.body)["app"] == "tls-other-ca"
