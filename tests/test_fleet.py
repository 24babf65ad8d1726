"""Issue 11, done when: a fleet of real parts, started by the test.

HAProxy (Debian package) in ``mode tcp`` with ``send-proxy-v2`` in front of two sniport
instances that share a ``redis-server`` for their ACME state, and pebble (validating for
real, pebble-challtestsrv as its DNS) whose TLS-ALPN-01 checks come in through HAProxy, so
they reach either instance. A client from another loopback address (127.0.0.2) reaches a
proxied application, which sees that address in X-Forwarded-For, and both instances' logs
show it; a passthrough name goes through the same chain; the two instances obtain one
certificate between them and both serve it; each instance's /metrics counts its share.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.backends import App, echo_of, free_port, header_values, start_tls_backend
from support.clients import recv_to_eof
from support.configs import proxy_route, site_block, toml_lines
from support.logs import conn_lines
from support.pebble import start_challtestsrv, start_pebble
from support.pki import Pki
from support.process import Sniport, start_sniport
from support.redis import start_redis
from support.waiting import wait_until

from sniport.certs.redis_store import RedisStorage
from sniport.wire import acme, proxyproto

APP = "app.fleet.test"
PT = "pt.fleet.test"
CLIENT_IP = "127.0.0.2"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
METRICS_AT = r"metrics at http://127\.0\.0\.1:(\d+)/metrics"


def haproxy_config(front: int, servers: list[int], check: str = "") -> str:
    lines = [
        "global", "    maxconn 256",
        # retries + redispatch: a connection refused by an instance not started yet (the
        # CA validates at once) goes to the other, as a production balancer would.
        "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 30s",
        "    timeout server 30s", "    retries 3", "    option redispatch 1",
        "frontend https", f"    bind 127.0.0.1:{front}", "    default_backend sniports",
        "backend sniports", "    balance roundrobin",
    ]
    lines += [f"    server s{i} 127.0.0.1:{port} send-proxy-v2{check}"
              for i, port in enumerate(servers)]
    return "\n".join(lines) + "\n"


def instance_config(tmp: Path, name: str, *, port: int, redis: str, directory: str, ca: str,
                    app_url: str, backend: str) -> str:
    return (
        "[server]\n" + toml_lines(workers=2, state_dir=tmp / name, metrics_listen="127.0.0.1:0",
                                  trusted_proxies=["127.0.0.1/32"])
        + f'listen = [{{ address = "127.0.0.1:{port}", proxy_protocol = true }}]\n'
        + "\n[acme]\n" + toml_lines(directory=directory, ca=ca, storage=redis,
                                    challenges=["tls-alpn-01"], email="ops@fleet.test")
        + "\n" + site_block("app", [APP], "acme", proxy_route("/", [app_url]))
        + "[[passthrough]]\n" + toml_lines(name="pt", hosts=[PT], upstreams=[backend]))


def via_haproxy(front: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((CLIENT_IP, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", front))
    return sock


def served_fingerprint(front: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(via_haproxy(front), server_hostname=APP) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def test_haproxy_two_instances_redis_and_pebble(tmp_path: Path, pki: Pki) -> None:
    redis = start_redis(tmp_path)
    dns = start_challtestsrv(tmp_path)
    front = free_port()
    pebble = start_pebble(tmp_path, always_valid=False, dns_port=dns.dns_port, tls_port=front)
    app = App("app")
    backend = start_tls_backend(pki, PT)
    instances: list[Sniport] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        # HAProxy first: the instances order at once, and the CA comes through it.
        ports = [free_port(), free_port()]
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, ports))
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: _accepts(front), 10, "haproxy listening")
        for name, port in zip(("a", "b"), ports, strict=True):
            instances.append(start_sniport(instance_config(
                tmp_path, name, port=port, redis=redis.url, directory=pebble.directory_url,
                ca=pebble.ca_file, app_url=app.url, backend=backend.address),
                tmp_path / name))
        # One certificate between the two, served by both.
        root = tmp_path / "root.pem"
        ctx = ssl.create_default_context(cafile=pebble.ca_file)
        with urllib.request.urlopen(f"{pebble.mgmt_url}/roots/0", context=ctx) as r:
            root.write_bytes(r.read())
        verified = ssl.create_default_context(cafile=str(root))

        def obtained() -> bool:
            try:
                with verified.wrap_socket(via_haproxy(front), server_hostname=APP):
                    return True
            except (ssl.SSLError, OSError):
                return False

        wait_until(obtained, 60, lambda: "a verified certificate; logs:\n" + "\n".join(
            line for s in instances for line in s.log().splitlines() if " conn " not in line))
        wait_until(lambda: len({served_fingerprint(front) for _ in range(6)}) == 1, 15,
                   "both instances serving the same certificate")
        logs = [s.log() for s in instances]
        ordered = [len(re.findall(rf"acme: certificate for {APP} (obtained|renewed)", log))
                   for log in logs]
        assert sum(ordered) == 1, ordered
        # The CA's checks came through HAProxy (which instance got them depends on which was
        # up first). That any instance answers any challenge, whichever published it: a
        # challenge put in Redis as a service does is answered by each instance directly.
        challenge = acme.Challenge("tls-alpn-01", APP, "https://ca.invalid/c", "tok-fleet",
                                   "tok-fleet.key-authorization")
        store = RedisStorage(redis.url)
        store.publish_challenge(challenge)
        digest = hashlib.sha256(challenge.key_authorization.encode()).digest()
        for s in instances:
            raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            raw.sendall(proxyproto.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]))  # LOCAL
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.set_alpn_protocols([acme.ACME_TLS_ALPN])
            with ctx.wrap_socket(raw, server_hostname=APP) as tls:
                assert tls.selected_alpn_protocol() == acme.ACME_TLS_ALPN
                der = tls.getpeercert(binary_form=True)
                assert der is not None
            ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(
                acme.ID_PE_ACME_IDENTIFIER)
            assert ext.value.public_bytes() == b"\x04\x20" + digest
        store.withdraw_challenge(challenge)
        # The client's address, through HAProxy's PROXY v2, for the app and both logs.
        for _ in range(4):
            with verified.wrap_socket(via_haproxy(front), server_hostname=APP) as tls:
                tls.sendall(f"GET /who HTTP/1.1\r\nHost: {APP}\r\nConnection: close\r\n\r\n"
                            .encode())
                reply = recv_to_eof(tls)
            echo = echo_of(reply.split(b"\r\n\r\n", 1)[1])
            assert header_values(echo, "X-Forwarded-For") == [CLIENT_IP]
        for s in instances:
            wait_until(lambda s=s: any(c.get("client", "").startswith(f"{CLIENT_IP}:")
                                       and c.get("sni") == APP for c in conn_lines(s)),
                       10, "a connection line with the client's address")
        # A passthrough name through the same chain.
        with pki.client_context().wrap_socket(via_haproxy(front), server_hostname=PT) as tls:
            tls.sendall(b"WHO")
            assert tls.recv(100) == PT.encode()
        # Each instance's /metrics: its share of the requests, summed over its 2 workers.
        urls = [f"http://127.0.0.1:{s.wait_log(METRICS_AT).group(1)}/metrics"
                for s in instances]
        counted = sum(metric(u, "sniport_http_requests_total", site="app") for u in urls)
        assert counted == 4
        # HAProxy's health checks (``check`` on a send-proxy-v2 server) send a LOCAL header
        # and close: logged as such, never as bad input, and not counted as a failure. (A
        # second HAProxy, started now: checks that fail at start mark a server down at once,
        # which would have sent the CA's first validations nowhere.)
        (tmp_path / "checks.cfg").write_text(haproxy_config(
            free_port(), [s.port for s in instances], " check inter 200ms"))
        checker = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "checks.cfg")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: all(any(c.get("end") == "balancer_check"
                                       for c in conn_lines(s)) for s in instances),
                       10, "HAProxy's checks reaching both instances")
        finally:
            checker.terminate()
            checker.wait(10)
        for s, url in zip(instances, urls, strict=True):
            ends = {c.get("end", "") for c in conn_lines(s) if c.get("sni") == "-"}
            assert "balancer_check" in ends, ends
            assert not {e for e in ends if e.startswith(("proxy_protocol", "eof", "client_"))}, \
                ends
            assert metric(url, "sniport_clienthello_failures_total") == 0
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for s in instances:
            s.stop()
        app.stop()
        backend.close()
        pebble.stop()
        dns.stop()
        redis.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
