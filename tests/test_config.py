"""The config contract (DESIGN.md "Config contract (v1)"; sniport/config.py): what is refused,
with which TOML path and reason, and what a valid file turns into."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sniport.addresses import TcpAddress, UnixAddress
from sniport.config import (
    NOT_SUPPORTED_YET,
    Config,
    ConfigError,
    LoadedConfig,
    Problem,
    from_dict,
    load,
    loads,
    parse_duration,
    parse_size,
)
from sniport.hostnames import HostNameError, normalize

SRC = "test.toml"

PASSTHROUGH = """
[[passthrough]]
name = "lan"
hosts = ["vpn.example.com", "*.lan.example.com"]
upstreams = ["10.8.0.2:443"]
"""

SITE = """
[[site]]
name = "blog"
hosts = ["blog.example"]
tls = "self-signed"
  [[site.route]]
  path = "/"
  respond = { status = 200, body = "ok" }
"""


def ok(text: str) -> Config:
    loaded = loads(text, SRC)
    assert isinstance(loaded, LoadedConfig)
    assert loaded.source == SRC
    return loaded.config


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        loads(text, SRC)
    found = info.value.problems
    assert found, "a ConfigError lists at least one problem"
    assert str(info.value) == "\n".join(map(str, found))
    return found


def only(text: str) -> tuple[str, str]:
    """The one problem of ``text``: (TOML path, reason)."""
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].file == SRC
    return found[0].path, found[0].reason


# ---------------------------------------------------------------------------------------------
# Defaults (DESIGN.md, each key of the contract shows its default).


def test_server_defaults_match_design() -> None:
    server = ok("").server
    assert [entry.address for entry in server.listen] == [TcpAddress("0.0.0.0", 443),
                                                          TcpAddress("::", 443)]
    assert all(entry.mode is None and entry.owner is None for entry in server.listen)
    assert server.http_listen == []
    assert server.workers == "auto"
    assert server.max_connections == 4096
    assert server.max_connections_per_ip == 0
    assert server.client_hello_timeout == 10.0
    assert server.handshake_timeout == 10.0
    assert server.header_timeout == 15.0
    assert server.keepalive_timeout == 75.0
    assert server.drain_timeout == 30.0
    assert server.trusted_proxies == []
    assert (server.user, server.group) == ("", "")
    # state_dir "" means "the default place" (/var/lib/sniport as root, else the XDG state
    # directory), resolved when sniport starts rather than in the config model.
    assert server.state_dir == ""
    assert server.pid_file == "{state_dir}/sniport.pid"
    assert server.access_log == "stderr"
    assert server.log_format == "text"
    assert server.log_level == "info"
    assert server.tls_session_tickets is True


def test_default_section_defaults_match_design() -> None:
    config = ok("")
    assert (config.default.to, config.default.non_tls) == ("reject", "close")
    assert config.passthrough == []
    assert config.blocks() == []


def test_passthrough_defaults_match_design() -> None:
    (block,) = ok(PASSTHROUGH).passthrough
    assert block.name == "lan"
    assert block.hosts == ["vpn.example.com", "*.lan.example.com"]
    assert block.upstreams == [TcpAddress("10.8.0.2", 443)]
    assert block.proxy_protocol == "off"
    assert block.connect_timeout == 5.0
    assert block.idle_timeout == 3600.0
    assert (block.allow, block.deny) == ([], [])


def test_site_defaults_match_design() -> None:
    text = SITE + """
  [[site.route]]
  path = "/static/"
  static = { root = "/var/www/html" }
  [[site.route]]
  path = "/old/"
  redirect = { to = "https://example.com/new/" }
  [[site.route]]
  path = "/empty"
  respond = {}
"""
    (site,) = ok(text).site
    assert site.tls == "self-signed"
    assert site.error_pages == {}
    assert (site.allow, site.deny) == ([], [])
    respond, static, redirect, empty = site.route
    for route in site.route:
        assert route.headers == {}
        assert route.remove_headers == []
        assert route.max_body_size is None  # the handler's default (1 MiB unless proxy)
    assert static.static is not None
    assert static.static.root == "/var/www/html"
    assert static.static.index == ["index.html"]
    assert (static.static.autoindex, static.static.dotfiles) == (False, False)
    assert static.static.fallback == ""
    assert static.static.precompressed is True
    assert redirect.redirect is not None
    assert (redirect.redirect.status, redirect.redirect.keep_path) == (308, True)
    assert respond.respond is not None
    assert (respond.respond.status, respond.respond.body) == (200, "ok")
    assert empty.respond is not None
    assert empty.respond.content_type == "text/plain; charset=utf-8"


# ---------------------------------------------------------------------------------------------
# Durations and sizes.


@pytest.mark.parametrize(("value", "seconds"), [
    ('"10s"', 10.0), ('"500ms"', 0.5), ('"2m"', 120.0), ('"1h"', 3600.0),
    ('"1.5s"', 1.5), ('"250ms"', 0.25), ("7", 7.0), ("2.5", 2.5), ('"0s"', 0.0), ("0", 0.0),
])
def test_durations(value: str, seconds: float) -> None:
    config = ok(PASSTHROUGH + f"idle_timeout = {value}\n" + f"[server]\ndrain_timeout = {value}\n")
    assert config.passthrough[0].idle_timeout == seconds
    assert config.server.drain_timeout == seconds


BAD_DURATION = 'is not a duration: write "10s", "500ms", "2m", "1h" or seconds'


@pytest.mark.parametrize(("value", "reason"), [
    ('"10x"', f"'10x' {BAD_DURATION}"),
    ('"ten seconds"', f"'ten seconds' {BAD_DURATION}"),
    ('"1d"', f"'1d' {BAD_DURATION}"),
    ('"s"', f"'s' {BAD_DURATION}"),
    ('"-1s"', f"'-1s' {BAD_DURATION}"),
    ("-1", "-1: a duration must be a finite number >= 0"),
    ("-0.5", "-0.5: a duration must be a finite number >= 0"),
    ("inf", "inf: a duration must be a finite number >= 0"),
    ("nan", "nan: a duration must be a finite number >= 0"),
    ("true", 'expected a duration such as "10s", "500ms", "2m" or seconds'),
    ("[1]", f"[1] {BAD_DURATION}"),
])
def test_bad_durations(value: str, reason: str) -> None:
    assert only(PASSTHROUGH + f"connect_timeout = {value}\n") == (
        "passthrough[0](lan).connect_timeout", reason)


def test_client_hello_timeout_must_be_positive() -> None:
    assert only(f"[server]\nclient_hello_timeout = {0}\n") == (
        "server.client_hello_timeout", "must be more than 0")
    assert ok('[server]\nclient_hello_timeout = "500ms"\n').server.client_hello_timeout == 0.5


@pytest.mark.parametrize(("value", "seconds"), [
    ("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (" 3s ", 3.0), (4, 4.0),
    (0.25, 0.25),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(("value", "size"), [
    ('"10M"', 10 * 1024 * 1024), ('"512K"', 512 * 1024), ('"1G"', 1024**3), ('"10m"', 10485760),
    ('"0"', 0), ("0", 0), ("1234", 1234), ('"1234"', 1234),
])
def test_sizes(value: str, size: int) -> None:
    config = ok(SITE + f"  max_body_size = {value}\n")
    assert config.site[0].route[0].max_body_size == size


@pytest.mark.parametrize(("value", "reason"), [
    ('"10X"', '\'10X\' is not a size: write "10M", "512K" or bytes'),
    ('"1.5M"', '\'1.5M\' is not a size: write "10M", "512K" or bytes'),
    ('"M"', '\'M\' is not a size: write "10M", "512K" or bytes'),
    ('"-1"', '\'-1\' is not a size: write "10M", "512K" or bytes'),
    ("-1", "-1: a size must be >= 0"),
    ("true", 'expected a size such as "10M", "512K" or bytes'),
    ("1.5", '1.5 is not a size: write "10M", "512K" or bytes'),
])
def test_bad_sizes(value: str, reason: str) -> None:
    assert only(SITE + f"  max_body_size = {value}\n") == (
        "site[0](blog).route[0].max_body_size", reason)


def test_parse_size() -> None:
    assert parse_size("10M") == 10 * 2**20
    assert parse_size("512k") == 512 * 2**10
    assert parse_size(" 2G ") == 2 * 2**30
    assert parse_size(99) == 99
    with pytest.raises(ValueError):
        parse_size(True)
    assert math.isclose(parse_duration("1.5h"), 5400.0)


# ---------------------------------------------------------------------------------------------
# Unknown keys.


@pytest.mark.parametrize(("text", "path"), [
    ("colour = 1\n", "colour"),
    ("[logging]\nlevel = 1\n", "logging"),
    ("[[upstream]]\nname = 1\n", "upstream"),
    ("[server]\nverbose = true\n", "server.verbose"),
    ("[server]\nlisten = [{ address = \"unix:/run/s.sock\", perms = \"0660\" }]\n",
     "server.listen[0].perms"),
    ("[default]\nfallback = \"reject\"\n", "default.fallback"),
    (PASSTHROUGH + "upstream = [\"10.0.0.1:443\"]\n", "passthrough[0](lan).upstream"),
    (PASSTHROUGH + "proxy-protocol = \"v2\"\n", "passthrough[0](lan).proxy-protocol"),
    (SITE.replace("tls = ", "certificate = 1\ntls = "), "site[0](blog).certificate"),
    (SITE + "  cache = true\n", "site[0](blog).route[0].cache"),
    (SITE.replace('body = "ok"', 'body = "ok", length = 2'),
     "site[0](blog).route[0].respond.length"),
])
def test_unknown_keys(text: str, path: str) -> None:
    assert only(text) == (path, "unknown key")


def test_unknown_key_in_the_tls_table_is_named_by_its_toml_path() -> None:
    # pydantic's union member tags ("TlsFiles", "literal['self-signed']") are not TOML keys.
    text = SITE.replace('tls = "self-signed"',
                        'tls = { cert = "/etc/c.pem", key = "/etc/k.pem", chain = "/etc/x" }')
    found = problems(text)
    assert Problem(SRC, "site[0](blog).tls.chain", "unknown key") in found
    assert all(p.path.startswith("site[0](blog).tls") for p in found), found
    assert not [p for p in found if "TlsFiles" in p.path or "literal[" in p.path]


def test_bad_tls_value_is_named_by_its_toml_path() -> None:
    found = problems(SITE.replace('tls = "self-signed"', 'tls = "self"'))
    assert {p.path for p in found} == {"site[0](blog).tls"}


# ---------------------------------------------------------------------------------------------
# Checks across blocks.


def test_host_claimed_twice_names_both_places() -> None:
    text = PASSTHROUGH + SITE.replace('["blog.example"]', '["blog.example", "vpn.example.com"]')
    assert only(text) == ("site[0](blog).hosts[1]",
                          "host 'vpn.example.com' is already claimed by "
                          "passthrough[0](lan).hosts[0]")


@pytest.mark.parametrize("spelling", [
    "VPN.example.com", "vpn.example.com.", "Vpn.Example.Com.", " vpn.example.com ",
])
def test_host_claimed_twice_after_normalisation(spelling: str) -> None:
    text = PASSTHROUGH + PASSTHROUGH.replace('"lan"', '"lan2"').replace(
        '"vpn.example.com", "*.lan.example.com"', f'"other.example", "{spelling}"')
    assert only(text) == ("passthrough[1](lan2).hosts[1]",
                          "host 'vpn.example.com' is already claimed by "
                          "passthrough[0](lan).hosts[0]")


def test_host_claimed_twice_in_one_block() -> None:
    text = PASSTHROUGH.replace('"*.lan.example.com"', '"*.lan.example.com", "*.LAN.example.com."')
    assert only(text) == ("passthrough[0](lan).hosts[2]",
                          "host '*.lan.example.com' is already claimed by "
                          "passthrough[0](lan).hosts[1]")


def test_idna_and_a_label_are_the_same_host() -> None:
    text = """
[[passthrough]]
name = "books"
hosts = ["Bücher.example", "xn--bcher-kva.example"]
upstreams = ["10.0.0.1:443"]
"""
    assert only(text) == ("passthrough[0](books).hosts[1]",
                          "host 'xn--bcher-kva.example' is already claimed by "
                          "passthrough[0](books).hosts[0]")


def test_exact_name_under_a_wildcard_of_another_block_is_fine() -> None:
    text = PASSTHROUGH + SITE.replace('["blog.example"]', '["a.lan.example.com"]')
    config = ok(text)
    assert config.site[0].hosts == ["a.lan.example.com"]


@pytest.mark.parametrize(("text", "path", "reason"), [
    (PASSTHROUGH + PASSTHROUGH.replace("vpn.example.com", "vpn2.example.com")
     .replace("*.lan", "*.lan2"),
     "passthrough[1](lan).name", "name 'lan' is already used by passthrough[0](lan)"),
    (PASSTHROUGH + SITE.replace('"blog"', '"lan"'),
     "site[0](lan).name", "name 'lan' is already used by passthrough[0](lan)"),
    (SITE + SITE.replace('"blog.example"', '"blog2.example"'),
     "site[1](blog).name", "name 'blog' is already used by site[0](blog)"),
])
def test_name_used_twice(text: str, path: str, reason: str) -> None:
    assert only(text) == (path, reason)


def test_cross_block_problems_name_the_block_by_its_place_in_the_file() -> None:
    # passthrough[1] has a problem of its own; the duplicate is the third block in the file.
    text = PASSTHROUGH + """
[[passthrough]]
name = "broken"
hosts = ["broken.example"]
upstreams = ["no-port"]
""" + PASSTHROUGH.replace('"*.lan.example.com"', '"other.example"')
    assert Counter(problems(text)) == Counter([
        Problem(SRC, "passthrough[1](broken).upstreams[0]",
                "'no-port': expected HOST:PORT, [IPV6]:PORT or unix:PATH"),
        Problem(SRC, "passthrough[2](lan).name",
                "name 'lan' is already used by passthrough[0](lan)"),
        Problem(SRC, "passthrough[2](lan).hosts[0]",
                "host 'vpn.example.com' is already claimed by passthrough[0](lan).hosts[0]"),
    ])


@pytest.mark.parametrize(("default", "path", "reason"), [
    ('to = "passthrough:nope"', "default.to", "'passthrough:nope' names no block of that kind"),
    ('to = "site:nope"', "default.to", "'site:nope' names no block of that kind"),
    ('to = "site:lan"', "default.to", "'site:lan' names no block of that kind"),
    ('to = "passthrough:blog"', "default.to", "'passthrough:blog' names no block of that kind"),
    ('to = "lan"', "default.to",
     "'lan': expected \"reject\", \"site:NAME\" or \"passthrough:NAME\""),
    ('to = "close"', "default.to",
     "'close': expected \"reject\", \"site:NAME\" or \"passthrough:NAME\""),
    ('non_tls = "passthrough:nope"', "default.non_tls",
     "'passthrough:nope' names no passthrough block"),
    ('non_tls = "passthrough:blog"', "default.non_tls",
     "'passthrough:blog' names no passthrough block"),
    ('non_tls = "site:blog"', "default.non_tls",
     "'site:blog': expected \"close\", \"http\" or \"passthrough:NAME\""),
    ('non_tls = "reject"', "default.non_tls",
     "'reject': expected \"close\", \"http\" or \"passthrough:NAME\""),
])
def test_default_names_a_missing_block(default: str, path: str, reason: str) -> None:
    assert only(PASSTHROUGH + SITE + f"[default]\n{default}\n") == (path, reason)


def test_default_naming_existing_blocks() -> None:
    config = ok(PASSTHROUGH + SITE + '[default]\nto = "site:blog"\nnon_tls = "passthrough:lan"\n')
    assert (config.default.to, config.default.non_tls) == ("site:blog", "passthrough:lan")
    config = ok(PASSTHROUGH + '[default]\nto = "passthrough:lan"\n')
    assert config.default.to == "passthrough:lan"


def test_default_naming_a_block_with_errors_is_not_told_the_block_is_missing() -> None:
    # The block exists; its own problem is the one to report, not a false "names no block".
    text = (PASSTHROUGH.replace('"10.8.0.2:443"', '"10.8.0.2"')
            + '[default]\nto = "passthrough:lan"\n')
    assert problems(text) == [Problem(SRC, "passthrough[0](lan).upstreams[0]",
                                      "'10.8.0.2': expected HOST:PORT, [IPV6]:PORT or unix:PATH")]


def test_route_path_used_twice() -> None:
    text = SITE + '  [[site.route]]\n  path = "/"\n  respond = {}\n'
    assert only(text) == ("site[0](blog).route[1].path", "'/' is already the path of route[0]")


# ---------------------------------------------------------------------------------------------
# Host names.


@pytest.mark.parametrize(("host", "reason"), [
    ("a.*.example.com",
     "'a.*.example.com': a wildcard is allowed only as the whole leftmost label"),
    ("*a.example.com", "'*a.example.com': a wildcard is allowed only as the whole leftmost label"),
    ("a*.example.com", "'a*.example.com': a wildcard is allowed only as the whole leftmost label"),
    ("*.*.example.com",
     "'*.*.example.com': a wildcard is allowed only as the whole leftmost label"),
    ("example.*", "'example.*': a wildcard is allowed only as the whole leftmost label"),
    ("*", "'*': a wildcard is allowed only as the whole leftmost label"),
    ("*.com", "'*.com': a wildcard needs a parent domain of two labels or more"),
    ("", "empty host name"),
    ("   ", "empty host name"),
    ("a..example", "'a..example': invalid label ''"),
    ("-a.example", "'-a.example': invalid label '-a'"),
    ("a b.example", "'a b.example': invalid label 'a b'"),
    ("192.0.2.1", "'192.0.2.1' is an IP address; SNI never carries one (RFC 6066)"),
    ("[2001:db8::1]", "'[2001:db8::1]' is an IP address; SNI never carries one (RFC 6066)"),
    ("x" * 64 + ".example", f"'{'x' * 64}.example': invalid label '{'x' * 64}'"),
])
def test_bad_hosts(host: str, reason: str) -> None:
    text = PASSTHROUGH.replace('"vpn.example.com"', f'"{host}"')
    assert only(text) == ("passthrough[0](lan).hosts[0]", reason)


@pytest.mark.parametrize(("host", "normal"), [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("WWW.Example.Com.", "www.example.com"),
    ("Bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("*.Example.COM", "*.example.com"),
    ("*.bücher.example.", "*.xn--bcher-kva.example"),
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("_acme.example", "_acme.example"),
])
def test_host_normalisation(host: str, normal: str) -> None:
    assert normalize(host) == normal
    text = PASSTHROUGH.replace('"vpn.example.com"', f'"{host}"')
    assert ok(text).passthrough[0].hosts[0] == normal


def test_invalid_a_label_is_refused() -> None:
    with pytest.raises(HostNameError):
        normalize("xn--zz.example")


# ---------------------------------------------------------------------------------------------
# Addresses.


@pytest.mark.parametrize(("entry", "path", "reason"), [
    ('"localhost:443"', "server.listen[0]",
     "'localhost:443': a listen address must be an IP address, not a name"),
    ('"0.0.0.0:65536"', "server.listen[0]",
     "'0.0.0.0:65536': port must be a number from 0 to 65535"),
    ('"0.0.0.0:-1"', "server.listen[0]",
     "'0.0.0.0:-1': port must be a number from 0 to 65535"),
    ('"0.0.0.0:https"', "server.listen[0]",
     "'0.0.0.0:https': port must be a number from 0 to 65535"),
    ('"0.0.0.0"', "server.listen[0]",
     "'0.0.0.0': expected HOST:PORT, [IPV6]:PORT or unix:PATH"),
    ('"::1:443"', "server.listen[0]",
     "'::1:443': write IPv6 addresses in brackets, [::1]:PORT"),
    ('"[::1]"', "server.listen[0]", "'[::1]': expected [IPV6]:PORT"),
    ('"[nothex]:443"', "server.listen[0]",
     "'[nothex]:443': 'nothex' is not an IPv6 address"),
    ('"unix:"', "server.listen[0]", "'unix:': empty unix socket path"),
    ('"unix:@"', "server.listen[0]", "'unix:@': empty unix socket path"),
    ('"unix:run/s.sock"', "server.listen[0]",
     "'unix:run/s.sock': a unix socket path must be absolute (or @name)"),
    ('"unix:/' + "a" * 107 + '"', "server.listen[0]",
     f"'unix:/{'a' * 107}': unix socket path longer than 107 bytes"),
    ("443", "server.listen[0]",
     "443: expected an address string or a table { address = \"...\" }"),
    ('{ address = "unix:/run/s.sock", mode = "999" }', "server.listen[0].mode",
     "'999' is not an octal file mode such as \"0660\""),
])
def test_bad_listen(entry: str, path: str, reason: str) -> None:
    assert only(f"[server]\nlisten = [{entry}]\n") == (path, reason)


def test_listen_checks_across_entries() -> None:
    text = """
[server]
listen = ["[::1]:8443", "[::1]:8443", { address = "127.0.0.1:8443", owner = "www-data" }]
http_listen = ["127.0.0.1:8443"]
"""
    assert Counter(problems(text)) == Counter([
        Problem(SRC, "server.listen[1]", "[::1]:8443 is already listed at server.listen[0]"),
        Problem(SRC, "server.listen[2]", "mode and owner apply to unix sockets only"),
        Problem(SRC, "server.http_listen[0]", "127.0.0.1:8443 is also in server.listen"),
    ])


def test_listen_forms() -> None:
    text = """
[server]
listen = ["127.0.0.1:0", "[::1]:8443", "unix:@sniport",
          { address = "unix:/run/sniport.sock", mode = "0660", owner = "www-data" }]
"""
    listen = ok(text).server.listen
    assert [e.address for e in listen] == [
        TcpAddress("127.0.0.1", 0), TcpAddress("::1", 8443), UnixAddress("@sniport"),
        UnixAddress("/run/sniport.sock")]
    assert (listen[3].mode, listen[3].owner) == ("0660", "www-data")


@pytest.mark.parametrize(("upstream", "reason"), [
    ("10.0.0.1:0", "'10.0.0.1:0': port must be a number from 1 to 65535"),
    ("10.0.0.1:70000", "'10.0.0.1:70000': port must be a number from 1 to 65535"),
    ("10.0.0.1", "'10.0.0.1': expected HOST:PORT, [IPV6]:PORT or unix:PATH"),
    ("2001:db8::1:443", "'2001:db8::1:443': write IPv6 addresses in brackets, [2001:db8::1]:PORT"),
    ("unix:relative.sock", "'unix:relative.sock': a unix socket path must be absolute (or @name)"),
])
def test_bad_upstreams(upstream: str, reason: str) -> None:
    text = PASSTHROUGH.replace('"10.8.0.2:443"', f'"{upstream}"')
    assert only(text) == ("passthrough[0](lan).upstreams[0]", reason)


def test_upstream_forms() -> None:
    text = PASSTHROUGH.replace(
        '"10.8.0.2:443"', '"10.8.0.2:443", "[2001:db8::2]:8443", "unix:/run/o.sock", "unix:@o"')
    assert ok(text).passthrough[0].upstreams == [
        TcpAddress("10.8.0.2", 443), TcpAddress("2001:db8::2", 8443),
        UnixAddress("/run/o.sock"), UnixAddress("@o")]


@pytest.mark.parametrize(("cidr", "reason"), [
    ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR such as \"10.0.0.0/8\" or an address"),
    ("lan", "'lan' is not a CIDR such as \"10.0.0.0/8\" or an address"),
])
def test_bad_cidrs(cidr: str, reason: str) -> None:
    assert only(PASSTHROUGH + f'allow = ["{cidr}"]\n') == ("passthrough[0](lan).allow[0]", reason)


# ---------------------------------------------------------------------------------------------
# Keys of the contract that are not built yet: refused, never silently ignored.

_VALUES: dict[str, Any] = {
    "http_listen": ["0.0.0.0:80"], "workers": 2, "handshake_timeout": "5s",
    "header_timeout": "5s", "keepalive_timeout": "5s", "drain_timeout": "5s",
    "trusted_proxies": ["10.0.0.0/8"], "user": "www-data", "group": "www-data",
    "state_dir": "/var/lib/x", "pid_file": "/run/x.pid", "tls_session_tickets": False,
    "proxy": {"upstreams": ["http://127.0.0.1:8080"]},
}
_BASE: dict[str, Any] = {
    "server": {"listen": [{"address": "127.0.0.1:0"}]},
    "passthrough": [{"name": "lan", "hosts": ["vpn.example.com"], "upstreams": ["10.0.0.1:1"]}],
    "site": [{"name": "blog", "hosts": ["blog.example"], "tls": "self-signed",
              "route": [{"path": "/", "respond": {}}]}],
}
_HANDLERS = {"static", "redirect", "respond", "proxy"}


def _with_key(key_path: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The base config with ``key_path`` set ("*" = the first entry), and its TOML path."""
    raw = copy.deepcopy(_BASE)
    node: Any = raw
    toml = ""
    for part in key_path[:-1]:
        if part == "*":
            node = node[0]
            toml += "[0]" + (f"({node['name']})" if "name" in node else "")
        else:
            node = node.setdefault(part, {})
            toml += f".{part}" if toml else part
    last = key_path[-1]
    if last in _HANDLERS:
        for other in _HANDLERS:
            node.pop(other, None)
    node[last] = _VALUES.get(last, "x" if key_path[:-1] else {})
    toml += f".{last}" if toml else last
    return raw, toml


def test_base_of_the_not_supported_cases_is_valid() -> None:
    from_dict(_BASE, SRC)


@pytest.mark.parametrize("key_path", NOT_SUPPORTED_YET or [()], ids=".".join)
def test_not_supported_yet(key_path: tuple[str, ...]) -> None:
    if not key_path:  # everything is built: nothing may be refused as "not supported yet"
        assert NOT_SUPPORTED_YET == ()
        return
    raw, toml = _with_key(key_path)
    with pytest.raises(ConfigError) as info:
        from_dict(raw, SRC)
    assert info.value.problems == [Problem(SRC, toml, "not supported yet")]


# ---------------------------------------------------------------------------------------------
# Many problems at once, each naming the file, the TOML path and the reason.

MANY = """
colour = "blue"

[server]
listen = ["0.0.0.0:443", "localhost:8443"]
client_hello_timeout = "ten seconds"
verbose = true

[[passthrough]]
name = "lan"
hosts = ["vpn.example.com", "*.lan.example.com"]
upstreams = ["10.8.0.2:443"]

[[passthrough]]
name = "lan"
hosts = ["VPN.example.com."]
upstreams = ["10.8.0.4:443"]

[[passthrough]]
name = "broken"
hosts = ["a.*.example.com"]
upstreams = ["10.8.0.3"]
proxy_protocol = "v3"

[[site]]
name = "blog"
hosts = ["blog.example", "x.lan.example.com"]
tls = "self-signed"
  [[site.route]]
  path = "/"
  respond = { status = 200, body = "ok" }
  [[site.route]]
  path = "/"
  redirect = { to = "https://example.com/" }

[default]
to = "site:nope"
non_tls = "passthrough:blog"
"""


def test_many_problems_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        loads(MANY, "/etc/sniport/sniport.toml")
    expected = [
        ("colour", "unknown key"),
        ("server.listen[1]",
         "'localhost:8443': a listen address must be an IP address, not a name"),
        ("server.client_hello_timeout", f"'ten seconds' {BAD_DURATION}"),
        ("server.verbose", "unknown key"),
        ("passthrough[1](lan).name", "name 'lan' is already used by passthrough[0](lan)"),
        ("passthrough[1](lan).hosts[0]",
         "host 'vpn.example.com' is already claimed by passthrough[0](lan).hosts[0]"),
        ("passthrough[2](broken).hosts[0]",
         "'a.*.example.com': a wildcard is allowed only as the whole leftmost label"),
        ("passthrough[2](broken).upstreams[0]",
         "'10.8.0.3': expected HOST:PORT, [IPV6]:PORT or unix:PATH"),
        ("passthrough[2](broken).proxy_protocol", "Input should be 'off', 'v1' or 'v2'"),
        ("site[0](blog).route[1].path", "'/' is already the path of route[0]"),
        ("default.to", "'site:nope' names no block of that kind"),
        ("default.non_tls", "'passthrough:blog' names no passthrough block"),
    ]
    found = info.value.problems
    assert Counter((p.path, p.reason) for p in found) == Counter(expected)
    assert {p.file for p in found} == {"/etc/sniport/sniport.toml"}
    lines = str(info.value).splitlines()
    assert Counter(lines) == Counter(
        f"/etc/sniport/sniport.toml: {path}: {reason}" for path, reason in expected)


def test_problem_text() -> None:
    assert str(Problem("a.toml", "server.verbose", "unknown key")) == (
        "a.toml: server.verbose: unknown key")
    assert str(Problem("a.toml", "", "TOML syntax: x")) == "a.toml: TOML syntax: x"


def test_toml_syntax_error() -> None:
    found = problems('[server]\nlisten = ["0.0.0.0:443"\n')
    assert len(found) == 1
    assert (found[0].file, found[0].path) == (SRC, "")
    assert found[0].reason.startswith("TOML syntax: ")


@pytest.mark.parametrize(("text", "path", "reason"), [
    ("server = 1\n", "server", "must be a table: [server]"),
    ("default = []\n", "default", "must be a table: [default]"),
    ("passthrough = 3\n", "passthrough", "must be an array of tables: [[passthrough]]"),
    ("[passthrough]\nname = \"x\"\n", "passthrough", "must be an array of tables: [[passthrough]]"),
    ("site = [1]\n", "site", "must be an array of tables: [[site]]"),
])
def test_sections_of_the_wrong_shape(text: str, path: str, reason: str) -> None:
    assert only(text) == (path, reason)


@pytest.mark.parametrize(("text", "paths"), [
    ("[[passthrough]]\n", ["passthrough[0].name", "passthrough[0].hosts",
                           "passthrough[0].upstreams"]),
    ("[[site]]\nname = \"s\"\n", ["site[0](s).hosts", "site[0](s).tls", "site[0](s).route"]),
])
def test_required_keys(text: str, paths: list[str]) -> None:
    found = problems(text)
    assert sorted(p.path for p in found) == sorted(paths)
    assert {p.reason for p in found} == {"required key missing"}


def test_load_from_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(PASSTHROUGH, encoding="utf-8")
    loaded = load(good)
    assert loaded.source == str(good)
    assert loaded.config.passthrough[0].name == "lan"

    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.problems == [
        Problem(str(missing), "", "cannot read: No such file or directory")]

    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[server]\naccess_log = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load(latin)
    (problem,) = info.value.problems
    assert (problem.file, problem.path) == (str(latin), "")
    assert problem.reason.startswith("not UTF-8: ")

    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nverbose = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(bad)
    assert info.value.problems == [Problem(str(bad), "server.verbose", "unknown key")]


# ---------------------------------------------------------------------------------------------
# Protocol blocks, [default] non_tls = "http" and silent clients (issue 12 item 1).

SSH = '[[passthrough]]\nname = "ssh"\nprotocol = "ssh"\nupstreams = ["127.0.0.1:22"]\n'


def test_a_protocol_block_and_the_first_bytes_defaults_load() -> None:
    config = loads(SSH + PASSTHROUGH + '[server]\nnon_tls_timeout = "1s"\n'
                   '[default]\nnon_tls = "http"\nsilent = "passthrough:ssh"\n', SRC).config
    ssh = config.passthrough[0]
    assert ssh.protocol == "ssh" and ssh.hosts == []
    assert config.passthrough[1].protocol == "tls"
    assert (config.default.non_tls, config.default.silent) == ("http", "passthrough:ssh")
    assert config.server.non_tls_timeout == 1.0
    assert loads(PASSTHROUGH, SRC).config.server.non_tls_timeout == 2.0


@pytest.mark.parametrize(("text", "path", "reason"), [
    (SSH.replace('upstreams', 'hosts = ["ssh.example"]\nupstreams'), "passthrough[0](ssh).hosts",
     'a protocol = "ssh" block is found by the client\'s first bytes, not by a server name: '
     "remove hosts"),
    (SSH + SSH.replace('"ssh"\nprotocol', '"ssh2"\nprotocol'), "passthrough[1](ssh2).protocol",
     "protocol 'ssh' is already claimed by passthrough[0](ssh)"),
    (SSH + '[default]\nto = "passthrough:ssh"\n', "default.to",
     "'passthrough:ssh' is a protocol = \"ssh\" block: TLS connections cannot go there"),
    (SSH + '[default]\nsilent = "passthrough:nope"\n', "default.silent",
     "'passthrough:nope' names no passthrough block"),
    (SSH + '[default]\nsilent = "site:x"\n', "default.silent",
     "'site:x': expected \"close\" or \"passthrough:NAME\""),
    (SSH + '[server]\nnon_tls_timeout = "10s"\n[default]\nsilent = "passthrough:ssh"\n',
     "server.non_tls_timeout", "10s is not shorter than client_hello_timeout (10s): a silent "
     "client would be closed before it could go to [default].silent"),
    ('[[passthrough]]\nname = "t"\nhosts = []\nupstreams = ["127.0.0.1:1"]\n',
     "passthrough[0](t).hosts", "a TLS passthrough block is found by the server names of its "
     'hosts: list at least one (or set protocol = "ssh")'),
    ('[[passthrough]]\nname = "t"\nupstreams = ["127.0.0.1:1"]\n',
     "passthrough[0](t).hosts", "required key missing"),
    ('[[passthrough]]\nname = "t"\nprotocol = "tls"\nupstreams = ["127.0.0.1:1"]\n',
     "passthrough[0](t).hosts", "required key missing"),
    (SSH.replace('"ssh"\nupstreams', '"http"\nupstreams'), "passthrough[0](ssh).protocol",
     '"http": not supported yet; plaintext HTTP on the TLS port is answered by [default] '
     'non_tls = "http" (308 to https://, and a passthrough block\'s http_upstream for its '
     "hosts)"),
    (SSH.replace('"ssh"\nupstreams', '"xmpp"\nupstreams'), "passthrough[0](ssh).protocol",
     "Input should be 'tls' or 'ssh'"),
])
def test_protocol_block_problems(text: str, path: str, reason: str) -> None:
    assert only(text) == (path, reason)


def test_a_protocol_block_has_no_http_upstream() -> None:
    found = problems('[server]\nhttp_listen = ["127.0.0.1:0"]\n'
                     + SSH.replace("upstreams", 'http_upstream = "127.0.0.1:80"\nupstreams'))
    assert [(p.path, p.reason) for p in found] == [(
        "passthrough[0](ssh).http_upstream",
        'a protocol = "ssh" block has no hosts for plain HTTP to be sent by')]


# ---------------------------------------------------------------------------------------------
# alpn on passthrough blocks (issue 12 item 5).

XMPP = ('[[passthrough]]\nname = "xmpp"\nhosts = ["example.com"]\nalpn = ["xmpp-client"]\n'
        'upstreams = ["127.0.0.1:5222"]\n')


def test_alpn_blocks_may_share_a_name_with_one_block_without() -> None:
    config = loads(XMPP + PASSTHROUGH.replace("vpn.example.com", "example.com"), SRC).config
    assert config.passthrough[0].alpn == ["xmpp-client"]
    assert config.passthrough[1].alpn == []


@pytest.mark.parametrize(("text", "path", "reason"), [
    (XMPP + XMPP.replace('"xmpp"', '"xmpp2"'), "passthrough[1](xmpp2).hosts[0]",
     "host 'example.com' with ALPN 'xmpp-client' is already claimed by "
     "passthrough[0](xmpp).hosts[0]"),
    (XMPP.replace('["xmpp-client"]', '["acme-tls/1"]'), "passthrough[0](xmpp).alpn",
     '"acme-tls/1" is not routed by alpn: a hello for a passthrough name is relayed whatever '
     "its ALPN, and a site's is its ACME challenge (DESIGN.md)"),
    (XMPP.replace('["xmpp-client"]', '[""]'), "passthrough[0](xmpp).alpn",
     "'': an ALPN protocol name is 1 to 255 printable ASCII characters"),
    (XMPP.replace('["xmpp-client"]', '["xmpp-clïent"]'), "passthrough[0](xmpp).alpn",
     "'xmpp-clïent': an ALPN protocol name is 1 to 255 printable ASCII characters"),
    (XMPP.replace('["xmpp-client"]', '["a", "a"]'), "passthrough[0](xmpp).alpn",
     "an ALPN protocol is listed twice"),
    (XMPP.replace("upstreams", 'http_upstream = "127.0.0.1:80"\nupstreams')
     + '[server]\nhttp_listen = ["127.0.0.1:0"]\n', "passthrough[0](xmpp).http_upstream",
     "a block with alpn is found only by TLS hellos that offer it: plain HTTP (no ALPN) "
     "cannot reach it"),
    (SSH.replace("upstreams", 'alpn = ["x"]\nupstreams'), "passthrough[0](ssh).alpn",
     'a protocol = "ssh" block has no ALPN'),
])
def test_alpn_problems(text: str, path: str, reason: str) -> None:
    assert only(text) == (path, reason)


@pytest.mark.parametrize(("value", "expected"), [
    ('"0"', None), ("0", None), ('"20/s"', (20, 1.0)), ('"100/10s"', (100, 10.0)),
    ('"65535/1m"', (65535, 60.0))])
def test_max_connection_rate_per_ip(value: str, expected: tuple[int, float] | None) -> None:
    assert ok(f"[server]\nmax_connection_rate_per_ip = {value}\n").server \
        .max_connection_rate_per_ip == expected
    assert ok("").server.max_connection_rate_per_ip is None  # the default: off


@pytest.mark.parametrize("value", ['"20"', '"0/s"', '"65536/s"', "true", '"x/s"', "5"])
def test_max_connection_rate_per_ip_refused(value: str) -> None:
    path, _ = only(f"[server]\nmax_connection_rate_per_ip = {value}\n")
    assert path == "server.max_connection_rate_per_ip"


def test_a_block_with_a_bad_alpn_adds_no_claims_of_its_hosts() -> None:
    """Its alpn failed: the block is not salvaged without it (its hosts would then count as
    claimed by a block without alpn, and every block sharing them would be reported)."""
    text = (XMPP.replace('["xmpp-client"]', '["acme-tls/1"]')
            + PASSTHROUGH.replace("vpn.example.com", "example.com"))
    assert [p.path for p in problems(text)] == ["passthrough[0](xmpp).alpn"]


def test_an_ssh_block_with_hosts_is_one_problem() -> None:
    text = (SSH.replace("upstreams", 'hosts = ["vpn.example.com"]\nupstreams') + PASSTHROUGH)
    assert [p.path for p in problems(text)] == ["passthrough[0](ssh).hosts"]


@pytest.mark.parametrize(("text", "path"), [
    ('[[passthrough]]\nname = "lan"\nhosts = ["*.lan.test"]\nupstreams = ["{label}.lan:443"]\n'
     '[default]\nsilent = "passthrough:lan"\n', "default.silent"),
    ('[[passthrough]]\nname = "s"\nprotocol = "ssh"\nupstreams = ["{label}.lan:22"]\n',
     "passthrough[0](s).upstreams[0]"),
])
def test_a_template_needs_a_server_name(text: str, path: str) -> None:
    """A silent client and an SSH client have no server name to fill a template from."""
    assert only(text)[0] == path
