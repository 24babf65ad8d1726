"""Upstreams from the name, end to end (README "Upstreams from the name"): a wildcard
passthrough block whose upstream is a template, ``{label}.lan.test:PORT``, reaches a different
backend per name; real sniport, real sockets on loopback, real TLS, the real resolver.

How names resolve on a machine without DNS of its own:

- ``test_names_reach_two_backends_through_the_hosts_file``: sniport runs in a mount namespace
  of its own (``unshare --mount``, as root) where ``/etc/hosts`` is a file of the test's, bind
  mounted: ``alpha.lan.test`` is 127.0.0.2 and ``beta.lan.test`` 127.0.0.3, and a TLS backend
  listens on each, on the same port. glibc's getaddrinfo reads that file as it reads the real
  one (``hosts: files dns``); nothing else on the machine sees it. Skipped where
  ``unshare``/``mount`` are not allowed (not root).
- the others use what every machine has: ``localhost`` in /etc/hosts (the template
  ``{label}:PORT`` filled with ``localhost``), unix socket templates (no resolver at all),
  and names under ``.invalid`` (RFC 6761 section 6.4: never resolve) for failures.

The cache is observed through sniport's own debug lines ("resolver: NAME -> ..."), one per
lookup actually made; one worker, so one cache.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.backends import TlsBackend, free_port, start_tls_backend
from support.clients import RawTls, client_label, make_hello, wait_closed
from support.configs import passthrough_block, server_table, short_unix_path
from support.logs import conn_lines, wait_conn
from support.pki import Pki
from support.process import Sniport, SniportWith, start_sniport
from support.waiting import TIMEOUT


def who(port: int, pki: Pki, name: str) -> tuple[bytes, str]:
    """Through sniport to whichever backend ``name`` reaches: its name, and our client."""
    c = RawTls.connect(("127.0.0.1", port), pki.client_context(check_hostname=False), name)
    client = client_label(c.sock)
    c.send_raw(c.hello())
    c.handshake()
    return c.ask_who(), client


def closed(port: int, pki: Pki, name: str) -> tuple[bytes, str]:
    """Send a hello for ``name``; what came back before sniport closed, and our client."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    client = client_label(sock)
    sock.sendall(make_hello(pki.client_context(check_hostname=False), name))
    got = wait_closed(sock)
    sock.close()
    return got, client


class Setup:
    def __init__(self, s: Sniport, a: TlsBackend, b: TlsBackend, u1: TlsBackend,
                 u2: TlsBackend, sockets: Path) -> None:
        self.s, self.a, self.b, self.u1, self.u2, self.sockets = s, a, b, u1, u2, sockets

    def lookups(self, host: str) -> int:
        return sum(1 for line in self.s.log().splitlines()
                   if f"resolver: {host} " in line or f"resolver: {host}:" in line)


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    a = start_tls_backend(pki, "backend-a.test")
    b = start_tls_backend(pki, "backend-b.test")
    # A short directory: the template's paths hold a 63-character label, and a unix socket
    # path has at most 107 bytes (pytest's own temporary paths grow under pytest-xdist).
    sockets = Path(tempfile.mkdtemp(prefix="tsock", dir="/tmp"))
    u1 = start_tls_backend(pki, "backend-u1.test",
                           unix_path=short_unix_path(sockets / "alpha.sock"))
    u2 = start_tls_backend(pki, "backend-u2.test",
                           unix_path=short_unix_path(sockets / "beta.sock"))
    timeout = 'connect_timeout = "2s"'
    config = (server_table(["127.0.0.1:0"], 'workers = 1\nlog_level = "debug"')
              # localhost resolves (to a); any other name fails over to b, in order.
              + passthrough_block("named", ["*.name.test"], [f"{{label}}:{a.port}",
                                                             b.address], timeout)
              + passthrough_block("only", ["*.only.test"], [f"{{label}}:{a.port}"], timeout)
              + passthrough_block("inv", ["*.inv.test"],
                                  [f"{{label}}.invalid:{a.port}"], timeout)
              + passthrough_block("sock", ["*.sock.test"],
                                  [f"unix:{sockets}/{{label}}.sock"], timeout))
    with start_sniport(config, tmp_path_factory.mktemp("templates")) as s:
        yield Setup(s, a, b, u1, u2, sockets)
    for backend in (a, b, u1, u2):
        backend.close()
    shutil.rmtree(sockets, ignore_errors=True)


def test_unix_template_reaches_a_backend_per_name(setup: Setup, pki: Pki) -> None:
    s = setup.s
    answer, client = who(s.port, pki, "alpha.sock.test")
    assert answer == b"backend-u1.test"
    rec = wait_conn(s, client=client)
    assert (rec["route"], rec["upstream"], rec["end"]) == (
        "passthrough:sock", f"unix:{setup.sockets}/alpha.sock", "eof")
    answer, client = who(s.port, pki, "beta.sock.test")
    assert answer == b"backend-u2.test"
    assert wait_conn(s, client=client)["upstream"] == f"unix:{setup.sockets}/beta.sock"
    # A name whose socket nobody listens on: refused, like a fixed upstream.
    got, client = closed(s.port, pki, "gamma.sock.test")
    assert got == b""
    assert wait_conn(s, client=client)["end"] == "upstream_refused"


def test_resolved_name_then_failover_to_a_fixed_upstream(setup: Setup, pki: Pki) -> None:
    s = setup.s
    answer, client = who(s.port, pki, "localhost.name.test")
    assert answer == b"backend-a.test"
    rec = wait_conn(s, client=client)
    assert (rec["route"], rec["upstream"], rec["end"]) == (
        "passthrough:named", f"localhost:{setup.a.port}", "eof")
    # Unresolvable: the next upstream in order (a fixed one) takes it.
    answer, client = who(s.port, pki, "nosuch-failover.name.test")
    assert answer == b"backend-b.test"
    assert wait_conn(s, client=client)["upstream"] == setup.b.address


def test_unresolvable_name_closes_that_connection_only(setup: Setup, pki: Pki) -> None:
    s = setup.s
    got, client = closed(s.port, pki, "nosuch.inv.test")
    assert got == b""
    rec = wait_conn(s, client=client)
    assert (rec["route"], rec["upstream"]) == ("passthrough:inv", "-")
    assert rec["end"].startswith("upstream_unresolved: nosuch.invalid: "), rec
    # Others go on: the same block's neighbour block, and the worker is alive.
    answer, _ = who(s.port, pki, "localhost.only.test")
    assert answer == b"backend-a.test"
    assert s.proc.poll() is None


@pytest.mark.parametrize(("name", "why"), [
    ("a_b.only.test", "upstream_template: label 'a_b' is not a host name label"),
    ("127.only.test", "upstream_template: '127' ends in a number"),
    ("0x7f.only.test", "upstream_template: '0x7f' ends in a number"),
    ("a" * 63 + ".sock.test", None),  # valid (refused by nobody listening: below)
])
def test_bad_labels_end_with_upstream_template(setup: Setup, pki: Pki, name: str,
                                               why: str | None) -> None:
    s = setup.s
    got, client = closed(s.port, pki, name)
    assert got == b""
    rec = wait_conn(s, client=client)
    if why is None:
        assert rec["end"] == "upstream_refused"
    else:
        assert rec["end"].startswith(why), rec
        assert rec["upstream"] == "-"
    answer, _ = who(s.port, pki, "alpha.sock.test")  # others unaffected
    assert answer == b"backend-u1.test"


def test_punycode_label_is_a_name(setup: Setup, pki: Pki) -> None:
    """An A-label (``xn--...``, what IDNA makes of "bücher") is LDH: it is looked up."""
    got, client = closed(setup.s.port, pki, "xn--bcher-kva.inv.test")
    assert got == b""
    assert wait_conn(setup.s, client=client)["end"].startswith(
        "upstream_unresolved: xn--bcher-kva.invalid: ")


def test_cache_answers_and_failures(setup: Setup, pki: Pki) -> None:
    """Later connections for a name take the cached answer (30 s) or failure (5 s): one
    lookup each, however many connections."""
    s = setup.s
    before = setup.lookups("localhost")  # earlier tests may have looked it up (<30 s ago)
    for _ in range(3):
        answer, client = who(s.port, pki, "localhost.only.test")
        assert answer == b"backend-a.test"
        wait_conn(s, client=client)
    for _ in range(3):
        _, client = closed(s.port, pki, "cached.inv.test")
        assert wait_conn(s, client=client)["end"].startswith("upstream_unresolved")
    assert setup.lookups("localhost") - before <= 1 and setup.lookups("localhost") >= 1
    assert setup.lookups("cached.invalid") == 1


# --------------------------------------------------------------------------------------------
# Two backends by name, resolved by glibc through a hosts file of the test's own


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --mount (root)")
def test_names_reach_two_backends_through_the_hosts_file(pki: Pki, tmp_path: Path,
                                                         sniport_with: SniportWith) -> None:
    alpha = start_tls_backend(pki, "alpha.lan.test", host="127.0.0.2")
    beta = start_tls_backend(pki, "beta.lan.test", host="127.0.0.3", port=alpha.port)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 alpha.lan.test\n"
                     "127.0.0.3 beta.lan.test\n")
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    config = (server_table(["127.0.0.1:0"], "workers = 1")
              + passthrough_block("lan", ["*.home.test"],
                                  [f"{{label}}.lan.test:{alpha.port}"]))
    try:
        s = sniport_with(config, prefix=prefix)
        for name, backend in (("alpha", alpha), ("beta", beta), ("alpha", alpha)):
            answer, client = who(s.port, pki, f"{name}.home.test")
            assert answer == backend.name.encode()
            rec = wait_conn(s, client=client)
            assert (rec["upstream"], rec["end"]) == (f"{name}.lan.test:{alpha.port}", "eof")
        got, client = closed(s.port, pki, "gamma.home.test")
        assert got == b""
        assert wait_conn(s, client=client)["end"].startswith(
            "upstream_unresolved: gamma.lan.test: ")
    finally:
        alpha.close()
        beta.close()


def test_a_template_that_leads_back_to_sniport_is_cut(tmp_path: Path, pki: Pki) -> None:
    """``{label}:PORT`` with sniport's own port, and the label ``localhost``: the upstream is
    the address the client reached, and relaying would make one new connection per hop until
    max_connections. The loop is cut: the client's connection closes, and only the
    connections the cut itself involves are logged."""
    port = free_port()
    config = (server_table([f"127.0.0.1:{port}"], "workers = 1")
              + passthrough_block("loop", ["*.loop.test"], [f"{{label}}:{port}"],
                                  'connect_timeout = "2s"'))
    with start_sniport(config, tmp_path) as s:
        got, _ = closed(s.port, pki, "localhost.loop.test")
        assert got == b""
        line = wait_conn(s, end="upstream_loop: the upstream is the address this client "
                                "reached")
        assert line["upstream"] == f"localhost:{port}"
        time.sleep(0.5)
        assert len(conn_lines(s)) <= 3, conn_lines(s)
