"""Routing (sniport/routing.py): decide(), Route.label, Acl and explain(), table-driven.

Precedence (DESIGN.md house rule 4): the exact name, then the wildcard of its parent
(``*.example.com`` matches exactly one label, RFC 6125 section 6.4.3), then ``[default]``.
"""

from __future__ import annotations

import ipaddress

import pytest

from sniport.config import Block, ConfigError, loads
from sniport.routing import Acl, Route, RouteTable, explain

CONFIG = """
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com", "*.lan.example.com", "*.example.net"]
upstreams = ["10.8.0.2:443"]
allow = ["10.0.0.0/8", "2001:db8::/32"]
deny = ["10.66.0.0/16"]

[[passthrough]]
name = "exact"
hosts = ["a.lan.example.com", "Bücher.example", "UPPER.example.org."]
upstreams = ["10.8.0.3:443", "unix:/run/exact.sock"]

[[passthrough]]
name = "fallback"
hosts = ["fallback.example"]
upstreams = ["10.8.0.4:443"]
deny = ["192.0.2.0/24"]

[[site]]
name = "blog"
hosts = ["blog.example", "*.blog.example", "www.lan.example.com"]
tls = "self-signed"
allow = ["192.0.2.0/24"]
  [[site.route]]
  path = "/"
  respond = { status = 200, body = "ok" }

[default]
to = "passthrough:fallback"
non_tls = "passthrough:exact"
"""

SITE_DEFAULT = """
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com"]
upstreams = ["10.8.0.2:443"]

[[site]]
name = "blog"
hosts = ["blog.example"]
tls = "self-signed"
  [[site.route]]
  path = "/"
  respond = {}

[default]
to = "site:blog"
"""

REJECTING = """
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com", "*.lan.example.com"]
upstreams = ["10.8.0.2:443"]
"""


def table(text: str = CONFIG) -> RouteTable:
    return RouteTable(loads(text, "test.toml").config)


# (sni, label, rule, pattern)
DECISIONS: list[tuple[str | None, str, str, str | None]] = [
    ("vpn.example.com", "passthrough:lan", "exact", "vpn.example.com"),
    # Exact beats the wildcard of its parent.
    ("a.lan.example.com", "passthrough:exact", "exact", "a.lan.example.com"),
    ("b.lan.example.com", "passthrough:lan", "wildcard", "*.lan.example.com"),
    ("x-1.lan.example.com", "passthrough:lan", "wildcard", "*.lan.example.com"),
    ("www.example.net", "passthrough:lan", "wildcard", "*.example.net"),
    # One label only: not two, not zero, not an empty one.
    ("a.b.lan.example.com", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("lan.example.com", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("example.net", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    (".lan.example.com", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("a.b.example.net", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    # Upper case and a trailing dot in the SNI.
    ("VPN.Example.COM", "passthrough:lan", "exact", "vpn.example.com"),
    ("vpn.example.com.", "passthrough:lan", "exact", "vpn.example.com"),
    ("VPN.EXAMPLE.COM.", "passthrough:lan", "exact", "vpn.example.com"),
    ("B.LAN.example.com.", "passthrough:lan", "wildcard", "*.lan.example.com"),
    ("A.Lan.Example.Com", "passthrough:exact", "exact", "a.lan.example.com"),
    # Configured names were normalised: case, trailing dot, IDNA.
    ("upper.example.org", "passthrough:exact", "exact", "upper.example.org"),
    ("xn--bcher-kva.example", "passthrough:exact", "exact", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "passthrough:exact", "exact", "xn--bcher-kva.example"),
    # No SNI, and names nobody claims.
    (None, "passthrough:fallback", "no_sni", "passthrough:fallback"),
    ("", "passthrough:fallback", "no_sni", "passthrough:fallback"),
    ("unknown.example", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("vpn.example.com.evil", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("evil-vpn.example.com", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("fallback.example", "passthrough:fallback", "exact", "fallback.example"),
    # Sites: the same precedence; an exact site name beats a passthrough wildcard.
    ("blog.example", "site:blog", "exact", "blog.example"),
    ("Blog.Example.", "site:blog", "exact", "blog.example"),
    ("www.blog.example", "site:blog", "wildcard", "*.blog.example"),
    ("a.www.blog.example", "passthrough:fallback", "unknown_name", "passthrough:fallback"),
    ("www.lan.example.com", "site:blog", "exact", "www.lan.example.com"),
]


@pytest.mark.parametrize(("sni", "label", "rule", "pattern"), DECISIONS)
def test_decide(sni: str | None, label: str, rule: str, pattern: str | None) -> None:
    route = table().decide(sni)
    assert (route.label, route.rule, route.pattern) == (label, rule, pattern)
    assert route.kind == ("terminate" if label.startswith("site:") else "passthrough")
    assert route.block is not None
    assert route.block.name == label.split(":", 1)[1]


@pytest.mark.parametrize(("sni", "label", "kind", "rule"), [
    (None, "site:blog", "terminate", "no_sni"),
    ("nobody.example", "site:blog", "terminate", "unknown_name"),
    ("blog.example", "site:blog", "terminate", "exact"),
    ("vpn.example.com", "passthrough:lan", "passthrough", "exact"),
])
def test_default_to_a_site(sni: str | None, label: str, kind: str, rule: str) -> None:
    route = table(SITE_DEFAULT).decide(sni)
    assert (route.label, route.kind, route.rule) == (label, kind, rule)
    assert table(SITE_DEFAULT).non_tls().label == "reject"


def test_non_tls_goes_to_default_non_tls() -> None:
    route = table().non_tls()
    assert (route.kind, route.label, route.rule, route.pattern) == (
        "passthrough", "passthrough:exact", "non_tls", "passthrough:exact")


@pytest.mark.parametrize(("sni", "rule"), [
    (None, "no_sni"), ("", "no_sni"), ("nobody.example", "unknown_name"),
    ("a.b.lan.example.com", "unknown_name"), ("lan.example.com", "unknown_name"),
])
def test_reject_by_default(sni: str | None, rule: str) -> None:
    route = table(REJECTING).decide(sni)
    assert (route.kind, route.block, route.rule, route.pattern, route.acl) == (
        "reject", None, rule, None, None)
    assert route.label == "reject"


def test_non_tls_closes_by_default() -> None:
    route = table(REJECTING).non_tls()
    assert route == Route("reject", None, "non_tls")
    assert route.label == "reject"


def test_matched_routes_are_prebuilt() -> None:
    t = table()
    assert t.decide("vpn.example.com") is t.decide("VPN.example.com.")
    assert t.decide("b.lan.example.com") is t.decide("c.lan.example.com")
    assert t.decide(None) is t.decide("")
    assert t.decide("x.example") is t.decide("y.example")
    assert t.non_tls() is t.non_tls()


def test_blocks_entries_and_defaults() -> None:
    t = table()
    assert sorted(t.blocks) == ["passthrough:exact", "passthrough:fallback", "passthrough:lan",
                                "site:blog"]
    assert [(name, r.label, r.rule) for name, r in t.entries()] == [
        ("a.lan.example.com", "passthrough:exact", "exact"),
        ("blog.example", "site:blog", "exact"),
        ("fallback.example", "passthrough:fallback", "exact"),
        ("upper.example.org", "passthrough:exact", "exact"),
        ("vpn.example.com", "passthrough:lan", "exact"),
        ("www.lan.example.com", "site:blog", "exact"),
        ("xn--bcher-kva.example", "passthrough:exact", "exact"),
        ("*.blog.example", "site:blog", "wildcard"),
        ("*.example.net", "passthrough:lan", "wildcard"),
        ("*.lan.example.com", "passthrough:lan", "wildcard"),
    ]
    assert [(r.label, r.rule) for r in t.defaults()] == [
        ("passthrough:fallback", "no_sni"),
        ("passthrough:fallback", "unknown_name"),
        ("passthrough:exact", "non_tls"),
    ]


def test_route_label() -> None:
    block = Block(name="blog", hosts=["example.com"])
    assert Route("terminate", block, "exact", "example.com").label == "site:blog"
    assert Route("passthrough", block, "exact", "example.com").label == "passthrough:blog"
    assert Route("reject", None, "unknown_name").label == "reject"


# ---------------------------------------------------------------------------------------------
# Access lists.


def test_route_carries_the_block_acl() -> None:
    t = table()
    lan = t.decide("vpn.example.com").acl
    assert lan is not None
    assert lan.permits("10.1.2.3") is True
    assert lan.permits("10.66.1.1") is False  # deny wins
    assert lan.permits("192.0.2.1") is False  # not in allow
    # A block without lists: no check at all.
    assert t.decide("a.lan.example.com").acl is None
    # The [default] targets carry their block's lists too.
    fallback = t.decide("nobody.example").acl
    assert fallback is not None
    assert fallback.permits("192.0.2.9") is False
    assert fallback.permits("198.51.100.1") is True
    assert t.non_tls().acl is None
    blog = t.decide("www.blog.example").acl
    assert blog is not None
    assert blog.permits("192.0.2.200") is True
    assert blog.permits("10.1.2.3") is False


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


ACL = Acl(nets("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"),
          nets("10.66.0.0/16", "2001:db8:bad::/48"))
DENY_ONLY = Acl([], nets("10.66.0.0/16", "2001:db8:bad::/48"))
EVERYONE = Acl([], [])

ACL_CASES: list[tuple[str, Acl, str, bool]] = [
    ("allowed v4", ACL, "10.1.2.3", True),
    ("allowed host /32", ACL, "192.0.2.7", True),
    ("neighbour of /32", ACL, "192.0.2.8", False),
    ("denied inside allowed: deny wins", ACL, "10.66.0.1", False),
    ("not allowed v4", ACL, "198.51.100.1", False),
    ("allowed v6", ACL, "2001:db8::1", True),
    ("denied v6 inside allowed", ACL, "2001:db8:bad::1", False),
    ("not allowed v6", ACL, "2001:db9::1", False),
    ("v4-mapped allowed", ACL, "::ffff:10.1.2.3", True),
    ("v4-mapped denied", ACL, "::ffff:10.66.0.1", False),
    ("v4-mapped not allowed", ACL, "::ffff:198.51.100.1", False),
    ("scoped link-local not allowed", ACL, "fe80::1%eth0", False),
    ("unix client with an allow list", ACL, "", False),
    ("deny-only: others pass", DENY_ONLY, "198.51.100.1", True),
    ("deny-only: denied", DENY_ONLY, "10.66.3.4", False),
    ("deny-only: v4-mapped denied", DENY_ONLY, "::ffff:10.66.3.4", False),
    ("deny-only: v6 denied", DENY_ONLY, "2001:db8:bad::2", False),
    ("deny-only: v6 passes", DENY_ONLY, "2001:db8::2", True),
    ("empty lists: v4", EVERYONE, "203.0.113.5", True),
    ("empty lists: v6", EVERYONE, "::1", True),
    ("empty lists: unix client", EVERYONE, "", True),
]


@pytest.mark.parametrize(("acl", "ip", "allowed"), [c[1:] for c in ACL_CASES],
                         ids=[c[0] for c in ACL_CASES])
def test_acl(acl: Acl, ip: str, allowed: bool) -> None:
    assert acl.permits(ip) is allowed


def test_acl_deny_in_ipv4_mapped_form_still_denies() -> None:
    # "deny wins": a deny entry written in the IPv4-mapped form either is refused at load or
    # keeps out the clients it names, whichever form their address arrives in.
    text = REJECTING + 'deny = ["::ffff:10.66.0.0/112"]\n'
    try:
        t = table(text)
    except ConfigError:
        return
    acl = t.decide("vpn.example.com").acl
    assert acl is not None
    assert acl.permits("::ffff:10.66.0.1") is False
    assert acl.permits("10.66.0.1") is False
    assert acl.permits("10.67.0.1") is True


# ---------------------------------------------------------------------------------------------
# explain(): the sentence `sniport routes` prints.


EXPLAIN: list[tuple[str, str | None, str]] = [
    ("config", "vpn.example.com", "passthrough:lan  (exact name vpn.example.com)"),
    ("config", "VPN.example.com.", "passthrough:lan  (exact name vpn.example.com)"),
    ("config", "b.lan.example.com",
     "passthrough:lan  (wildcard *.lan.example.com (matches one label))"),
    ("config", None, "passthrough:fallback  (no server name in the ClientHello: [default].to)"),
    ("config", "Nobody.Example.",
     "passthrough:fallback  (no block claims 'nobody.example': [default].to)"),
    ("config", "a.b.lan.example.com",
     "passthrough:fallback  (no block claims 'a.b.lan.example.com': [default].to)"),
    ("config", "www.blog.example", "site:blog  (wildcard *.blog.example (matches one label))"),
    ("config", "blog.example", "site:blog  (exact name blog.example)"),
    ("site", "nobody.example", "site:blog  (no block claims 'nobody.example': [default].to)"),
    ("rejecting", None, "reject  (no server name in the ClientHello: [default].to)"),
    ("rejecting", "nobody.example", "reject  (no block claims 'nobody.example': [default].to)"),
]


@pytest.mark.parametrize(("which", "sni", "sentence"), EXPLAIN)
def test_explain(which: str, sni: str | None, sentence: str) -> None:
    t = table({"config": CONFIG, "site": SITE_DEFAULT, "rejecting": REJECTING}[which])
    assert explain(t.decide(sni), sni) == sentence


def test_explain_non_tls() -> None:
    assert explain(table().non_tls(), None) == "passthrough:exact  (not TLS: [default].non_tls)"
    assert explain(table(REJECTING).non_tls(), None) == "reject  (not TLS: [default].non_tls)"


# ---------------------------------------------------------------------------------------------
# Bytes that are not TLS (issue 12 item 1): by what they are.

SSH_BLOCK = """
[[passthrough]]
name = "ssh"
protocol = "ssh"
upstreams = ["127.0.0.1:22"]
deny = ["192.0.2.0/24"]

[[passthrough]]
name = "mail"
hosts = ["mail.example"]
upstreams = ["127.0.0.1:25"]
"""


@pytest.mark.parametrize(("default", "detects", "expected"), [
    # No protocol block and no "http": the first byte decides, all to non_tls.
    ('non_tls = "close"', False,
     {"ssh": "reject", "http": "reject", "other": "reject", "silent": "reject"}),
    ('non_tls = "passthrough:mail"', False,
     {"ssh": "passthrough:mail", "http": "passthrough:mail", "other": "passthrough:mail",
      "silent": "reject"}),
    ('non_tls = "http"', True,
     {"ssh": "reject", "http": "http", "other": "reject", "silent": "reject"}),
    ('non_tls = "http"\nsilent = "passthrough:mail"', True,
     {"ssh": "reject", "http": "http", "other": "reject", "silent": "passthrough:mail"}),
])
def test_first_bytes_without_a_protocol_block(default: str, detects: bool,
                                              expected: dict[str, str]) -> None:
    mail = SSH_BLOCK[SSH_BLOCK.index('[[passthrough]]\nname = "mail"'):]
    t = table(mail + f"[default]\n{default}\n")
    assert t.detects is detects
    assert {k: t.by_first_bytes(k).label for k in expected} == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("default", "expected"), [
    ('non_tls = "close"',
     {"ssh": "passthrough:ssh", "http": "reject", "other": "reject", "silent": "reject"}),
    ('non_tls = "passthrough:mail"',
     {"ssh": "passthrough:ssh", "http": "passthrough:mail", "other": "passthrough:mail"}),
    ('non_tls = "http"\nsilent = "passthrough:ssh"',
     {"ssh": "passthrough:ssh", "http": "http", "other": "reject", "silent": "passthrough:ssh"}),
])
def test_first_bytes_with_an_ssh_block(default: str, expected: dict[str, str]) -> None:
    t = table(SSH_BLOCK + f"[default]\n{default}\n")
    assert t.detects
    got = {k: t.by_first_bytes(k) for k in expected}  # type: ignore[arg-type]
    assert {k: r.label for k, r in got.items()} == expected
    ssh = got["ssh"]
    assert ssh.rule == "protocol" and ssh.acl is not None and not ssh.acl.permits("192.0.2.9")
    # An SSH block has no name: no server name reaches it.
    assert t.decide("ssh").label == "reject"


def test_silent_after_is_non_tls_timeout_only_with_a_silent_block() -> None:
    on = table('[server]\nnon_tls_timeout = "700ms"\n' + SSH_BLOCK
                + '[default]\nsilent = "passthrough:ssh"\n')
    assert on.silent_after == pytest.approx(0.7)
    assert table(SSH_BLOCK).silent_after == 0.0


@pytest.mark.parametrize(("default", "first", "why"), [
    ('non_tls = "http"', "http", 'HTTP/1.x, not TLS: [default].non_tls = "http"'),
    ('non_tls = "http"', "other", '[default].non_tls = "http" answers only HTTP/1.x'),
    ('non_tls = "close"', "ssh", 'ssh first bytes: the protocol = "ssh" block'),
    ('silent = "passthrough:ssh"', "silent", "silent for non_tls_timeout: [default].silent"),
    ('non_tls = "close"', "silent", "silent: no [default].silent"),
])
def test_explain_first_bytes(default: str, first: str, why: str) -> None:
    t = table(SSH_BLOCK + f"[default]\n{default}\n")
    assert why in explain(t.by_first_bytes(first), None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# ALPN in routing (issue 12 item 5): after the name.

ALPN_CONFIG = """
[[passthrough]]
name = "c2s"
hosts = ["example.com", "*.chat.example"]
alpn = ["xmpp-client"]
upstreams = ["127.0.0.1:5222"]

[[passthrough]]
name = "both"
hosts = ["example.com"]
alpn = ["xmpp-server", "x-other"]
upstreams = ["127.0.0.1:5269"]

[[passthrough]]
name = "any"
hosts = ["*.example.com"]
upstreams = ["127.0.0.1:443"]

[[site]]
name = "web"
hosts = ["example.com"]
tls = "self-signed"
  [[site.route]]
  path = "/"
  respond = { body = "ok" }

[default]
to = "passthrough:any"
"""


@pytest.mark.parametrize(("sni", "alpn", "label", "rule"), [
    ("example.com", (), "site:web", "exact"),
    ("example.com", ("h2", "http/1.1"), "site:web", "exact"),
    ("example.com", ("xmpp-client",), "passthrough:c2s", "exact"),
    ("example.com", ("h2", "xmpp-client"), "passthrough:c2s", "exact"),
    ("example.com", ("xmpp-server",), "passthrough:both", "exact"),
    ("example.com", ("x-other",), "passthrough:both", "exact"),
    # Two blocks' protocols offered: the block first in the config wins.
    ("example.com", ("xmpp-server", "xmpp-client"), "passthrough:c2s", "exact"),
    # acme-tls/1 is nobody's alpn: a site name's challenge stays the site's.
    ("example.com", ("acme-tls/1",), "site:web", "exact"),
    ("EXAMPLE.com.", ("xmpp-client",), "passthrough:c2s", "exact"),
    ("a.chat.example", ("xmpp-client",), "passthrough:c2s", "wildcard"),
    # Only ALPN blocks claim the wildcard: other hellos are refused, not defaulted.
    ("a.chat.example", ("h2",), "reject", "alpn"),
    ("a.chat.example", (), "reject", "alpn"),
    ("a.b.chat.example", ("xmpp-client",), "passthrough:any", "unknown_name"),
    ("www.example.com", ("xmpp-client",), "passthrough:any", "wildcard"),
])
def test_decide_by_alpn(sni: str, alpn: tuple[str, ...], label: str, rule: str) -> None:
    route = table(ALPN_CONFIG).decide(sni, alpn)
    assert (route.label, route.rule) == (label, rule)


def test_a_name_typed_without_alpn_is_the_block_for_any_hello() -> None:
    """A Host header or ``routes NAME`` has no ALPN: the name's block without alpn."""
    t = table(ALPN_CONFIG)
    assert t.decide("example.com").label == "site:web"
    assert t.decide("x.chat.example").rule == "alpn"


def test_entries_list_the_alpn_blocks_before_the_names_block() -> None:
    rows = [(name, r.label, r.alpn) for name, r in table(ALPN_CONFIG).entries()]
    assert rows[:3] == [("example.com", "passthrough:c2s", ("xmpp-client",)),
                        ("example.com", "passthrough:both", ("xmpp-server", "x-other")),
                        ("example.com", "site:web", ())]
    assert ("*.chat.example", "reject", ()) in rows


def test_explain_says_the_alpn() -> None:
    t = table(ALPN_CONFIG)
    assert explain(t.decide("example.com", ["xmpp-client"]), "example.com") == (
        "passthrough:c2s  (exact name example.com, and the hello offers ALPN xmpp-client)")
    assert "no_application_protocol" in explain(t.decide("q.chat.example", ["h2"]), None)
