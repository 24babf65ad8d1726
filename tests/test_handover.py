"""Issue 14 item 4, the pure part: which relays a reload may move to the new workers
(``handover.routes_the_same``), and the control messages that carry them."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from sniport import handover
from sniport.config import loads
from sniport.handover import Relayed
from sniport.routing import RouteTable

BASE = """
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com", "*.lan.example.com"]
upstreams = ["10.8.0.2:443", "10.8.0.3:443"]
{acl}

[[passthrough]]
name = "plain"
hosts = ["plain.example.com"]
upstreams = ["10.9.0.1:22"]

[[site]]
name = "blog"
hosts = ["blog.example.com"]
tls = "self-signed"
  [[site.route]]
  path = "/"
  respond = {{ body = "x" }}

[default]
non_tls = "passthrough:plain"
"""

RELAYED = Relayed(block="lan", non_tls=False, sni="vpn.example.com", alpn=["h2"], hello=517,
                  route="passthrough:lan", upstream="10.8.0.2:443", peer=["192.0.2.7", 40000],
                  ip="192.0.2.7", listener="0.0.0.0:443", up=10, down=20, age=3.5,
                  up_eof=False, down_eof=True)


# A protocol block, put before [default] (the config's last table).
SSH_BLOCK = """
[[passthrough]]
name = "ssh"
protocol = "ssh"
upstreams = ["10.9.0.2:22"]
"""
SSH_RELAYED = replace(RELAYED, block="ssh", non_tls=True, sni=None, upstream="10.9.0.2:22",
                      route="passthrough:ssh", proto="ssh")


def new_config(text: str) -> tuple[RouteTable, dict[str, list[str]]]:
    config = loads(text, "new.toml").config
    upstreams = {b.name: [str(u) for u in b.upstreams] for b in config.passthrough}
    return RouteTable(config), upstreams


@pytest.mark.parametrize(("why", "new", "relayed", "same"), [
    ("nothing changed", BASE.format(acl=""), RELAYED, True),
    ("a wildcard name still routes to the block", BASE.format(acl=""),
     replace(RELAYED, sni="a.lan.example.com"), True),
    ("the other upstream of the block", BASE.format(acl=""),
     replace(RELAYED, upstream="10.8.0.3:443"), True),
    ("the upstream is gone from the block", BASE.format(acl="").replace(
        '"10.8.0.2:443", ', ""), RELAYED, False),
    ("the name moved to another block", BASE.format(acl="").replace(
        '"vpn.example.com", ', "").replace('hosts = ["plain.example.com"]',
                                          'hosts = ["plain.example.com", "vpn.example.com"]'),
     RELAYED, False),
    ("the name is now a terminated site", BASE.format(acl="").replace(
        '"vpn.example.com", ', "").replace('hosts = ["blog.example.com"]',
                                          'hosts = ["blog.example.com", "vpn.example.com"]'),
     RELAYED, False),
    ("the client is denied now", BASE.format(acl='deny = ["192.0.2.0/24"]'), RELAYED, False),
    ("the client is still allowed", BASE.format(acl='allow = ["192.0.2.0/24"]'), RELAYED,
     True),
    ("the block was renamed", BASE.format(acl="").replace('name = "lan"', 'name = "vpn"'),
     RELAYED, False),
    ("non-TLS bytes still go to [default].non_tls", BASE.format(acl=""),
     replace(RELAYED, block="plain", non_tls=True, sni=None, upstream="10.9.0.1:22",
             route="passthrough:plain"), True),
    ("non-TLS bytes are closed now", BASE.format(acl="").replace(
        'non_tls = "passthrough:plain"', 'non_tls = "close"'),
     replace(RELAYED, block="plain", non_tls=True, sni=None, upstream="10.9.0.1:22"), False),
    ("an SSH relay still goes to the ssh block", BASE.format(acl="") + SSH_BLOCK,
     SSH_RELAYED, True),
    ("an SSH relay, the ssh block gone: its bytes now go to [default].non_tls",
     BASE.format(acl=""), SSH_RELAYED, False),
    ("a silent client's relay still goes to [default].silent",
     BASE.format(acl="") + 'silent = "passthrough:plain"\n',
     replace(SSH_RELAYED, proto="silent", block="plain", upstream="10.9.0.1:22"), True),
    ("a silent client's relay, [default].silent gone", BASE.format(acl=""),
     replace(SSH_RELAYED, proto="silent", block="plain", upstream="10.9.0.1:22"), False),
])
def test_routes_the_same(why: str, new: str, relayed: Relayed, same: bool) -> None:
    table, upstreams = new_config(new)
    assert handover.routes_the_same(table, upstreams, relayed) is same, why


TEMPLATED = """
[[passthrough]]
name = "lan"
hosts = ["*.lan.example.com"]
upstreams = ["{label}.lan:443", "unix:/run/lan/{label}.sock"]
"""


@pytest.mark.parametrize(("upstream", "sni", "same"), [
    ("nas.lan:443", "nas.lan.example.com", True),
    ("unix:/run/lan/nas.sock", "nas.lan.example.com", True),
    ("nas.lan:443", "other.lan.example.com", False),  # not what the template makes of it
    ("10.8.0.2:443", "nas.lan.example.com", False),
])
def test_routes_the_same_with_a_template(upstream: str, sni: str, same: bool) -> None:
    """A relay to a filled template moves when the new config's template fills the same."""
    table, upstreams = new_config(TEMPLATED)
    relayed = replace(RELAYED, sni=sni, upstream=upstream)
    assert handover.routes_the_same(table, upstreams, relayed) is same


def test_messages_round_trip_with_their_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = socket.socketpair()
    try:
        assert handover.send(a, handover.encode("offer", 7, RELAYED), [r.fileno(), w.fileno()])
        got = handover.receive(b)
        assert got is not None
        data, fds = got
        assert handover.decode(data) == ("offer", 7, RELAYED)
        assert len(fds) == 2
        # The descriptors are new ones for the same sockets.
        passed = socket.socket(fileno=fds[0])
        w.sendall(b"ping")
        assert passed.recv(4) == b"ping"
        passed.close()
        import os

        os.close(fds[1])
        assert handover.send(b, handover.encode("taken", 7))
        got = handover.receive(a)
        assert got is not None and handover.decode(got[0]) == ("taken", 7, None)
        b.setblocking(False)
        assert handover.receive(b) is None  # nothing waiting
        a.close()
        assert handover.receive(b) == (b"", [])  # the peer is gone
    finally:
        for s in (a, b, r, w):
            s.close()


@pytest.mark.parametrize("data", [b"", b"[]", b'{"id": 1}', b"not json", b'{"op": 3}'])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        handover.decode(data)
