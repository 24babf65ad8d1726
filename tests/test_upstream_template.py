"""Upstream templates (sniport/upstream_template.py, README "Upstreams from the name"): parsing
at load, filling per connection, and the config's refusals, table-driven and by hypothesis."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.addresses import TcpAddress, UnixAddress
from sniport.config import ConfigError, loads
from sniport.net.passthrough import PassthroughRuntime
from sniport.upstream_template import (
    TemplateError,
    UpstreamTemplate,
    check_label,
    is_template,
    label_for,
    parse_template,
)

PROPS = settings(deadline=None, max_examples=300)

# --------------------------------------------------------------------------------------------
# Parsing (at load)

GOOD = [
    ("{label}.lan:443", "{label}.lan", 443),
    ("{label}:8443", "{label}", 8443),
    ("{LABEL}.x:1", None, 0),  # placeholder names are case-sensitive: refused below
    ("nas-{label}.Lan.Example.com:443", "nas-{label}.lan.example.com", 443),
    ("{label}.{label}.lan:443", "{label}.{label}.lan", 443),
    ("unix:/run/lan/{label}.sock", "/run/lan/{label}.sock", 0),
    ("unix:@lan-{label}", "@lan-{label}", 0),
]


@pytest.mark.parametrize(("text", "pattern", "port"), [g for g in GOOD if g[1] is not None])
def test_parse_accepts(text: str, pattern: str, port: int) -> None:
    t = parse_template(text)
    assert (t.text, t.pattern, t.port, str(t)) == (text, pattern, port, text)
    assert t.unix == (port == 0)


BAD = [
    ("{foo}.lan:443", "unknown placeholder {foo}"),
    ("{LABEL}.x:1", "unknown placeholder {LABEL}"),
    ("{}.lan:443", "unknown placeholder {}"),
    ("{label}.{host}:443", "unknown placeholder {host}"),
    ("{label.lan:443", "a brace without its pair"),
    ("label}.lan:443", "a brace without its pair"),
    ("{{label}}.lan:443", "a brace without its pair"),
    ("{label}.lan", "expected HOST:PORT"),
    ("{label}.lan:{label}", "not in the port"),
    ("lan:{label}", "not in the port"),
    ("{label}.lan:0", "port must be a number"),
    ("{label}.lan:65536", "port must be a number"),
    ("{label}.lan:44x", "port must be a number"),
    ("{label}.lan:", "port must be a number"),
    ("[::{label}]:443", "IPv6 address"),
    ("10.0.0.{label}:443", "fills an IP address"),
    ("{label}.0.0.10:443", "ends in a number"),
    ("{label}.10:443", "ends in a number"),
    ("{label}.0x1f:443", "ends in a number"),
    ("{label}.l_n:443", "not a host name label"),
    ("{label}..lan:443", "not a host name label"),
    ("{label}.lan.:443", "not a host name label"),
    ("-{label}.lan:443", "not a host name label"),
    ("{label} .lan:443", "not a host name label"),
    ("{label}.ünï.de:443", "not a host name label"),
    ("{label}" + ".x" * 130 + ":443", "longer than 253"),
    ("x" * 63 + "{label}.lan:443", "not a host name label"),
    ("unix:run/{label}.sock", "must be absolute"),
    ("unix:/" + "d" * 110 + "/{label}", "longer than 107 bytes"),
]


@pytest.mark.parametrize(("text", "why"), BAD)
def test_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(why)):
        parse_template(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("{label}.lan:443", True), ("unix:/x/{label}", True), ("a}b", True),
    ("10.0.0.1:443", False), ("unix:/run/x.sock", False), (443, False),
])
def test_is_template(text: object, expected: bool) -> None:
    assert is_template(text) is expected


# --------------------------------------------------------------------------------------------
# Filling (per connection): the label comes from the network

FILL = [
    ("{label}.lan:443", "nas", TcpAddress("nas.lan", 443)),
    ("{label}.lan:443", "xn--nxasmq6b", TcpAddress("xn--nxasmq6b.lan", 443)),  # punycode: LDH
    ("{label}.lan:443", "10", TcpAddress("10.lan", 443)),  # a name, not an address
    ("{label}.lan:443", "a" * 63, TcpAddress("a" * 63 + ".lan", 443)),
    ("{label}:443", "localhost", TcpAddress("localhost", 443)),
    ("nas-{label}.lan:443", "b", TcpAddress("nas-b.lan", 443)),
    ("unix:/run/lan/{label}.sock", "nas", UnixAddress("/run/lan/nas.sock")),
    ("unix:@lan-{label}", "x1", UnixAddress("@lan-x1")),
]


@pytest.mark.parametrize(("text", "label", "expected"), FILL)
def test_fill(text: str, label: str, expected: object) -> None:
    assert parse_template(text).fill(label) == expected


FILL_BAD = [
    ("{label}.lan:443", "a.b", "has a dot"),
    ("{label}.lan:443", "", "empty label"),
    ("{label}.lan:443", "a/b", "not a host name label"),
    ("{label}.lan:443", "..", "has a dot"),
    ("{label}.lan:443", "a_b", "not a host name label"),
    ("{label}.lan:443", "-a", "not a host name label"),
    ("{label}.lan:443", "a-", "not a host name label"),
    ("{label}.lan:443", "Nas", "not a host name label"),  # the router lower-cases first
    ("{label}.lan:443", "a b", "not a host name label"),
    ("{label}.lan:443", "a\x00", "not a host name label"),
    ("{label}.lan:443", "ü", "not a host name label"),
    ("{label}.lan:443", "a" * 64, "longer than 63"),
    ("{label}:443", "127", "ends in a number"),  # getaddrinfo would read 0.0.0.127
    ("{label}:443", "10", "ends in a number"),
    ("{label}:443", "0x7f", "ends in a number"),
    ("x{label}.lan:443", "a" * 63, "not a host name label"),  # 64 with the prefix
    ("{label}." + "b" * 62 + "." + "c" * 62 + "." + "d" * 62 + ".lan:443", "a" * 63,
     "longer than 253"),
    ("unix:/run/lan/{label}.sock", "../etc", "has a dot"),
    ("unix:/run/lan/{label}.sock", "a/b", "not a host name label"),
    ("unix:/" + "d" * 90 + "/{label}", "a" * 20, "longer than 107 bytes"),
]


@pytest.mark.parametrize(("text", "label", "why"), FILL_BAD)
def test_fill_refuses(text: str, label: str, why: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(why)):
        parse_template(text).fill(label)


LDH = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@PROPS
@given(label=LDH)
def test_any_ldh_label_fills_a_fixed_suffix(label: str) -> None:
    """A template ending in a fixed name takes every LDH label, digits-only ones too."""
    assert parse_template("{label}.lan:443").fill(label) == TcpAddress(f"{label}.lan", 443)
    assert parse_template("unix:/run/{label}.sock").fill(label) == \
        UnixAddress(f"/run/{label}.sock")


TEMPLATES = ["{label}.lan:443", "{label}:443", "x-{label}.lan:1", "{label}.{label}.y:2"]


@PROPS
@given(template=st.sampled_from(TEMPLATES), label=st.text(max_size=80))
def test_fill_makes_a_host_name_or_refuses(template: str, label: str) -> None:
    """Whatever arrives as a label, a fill is a host name (LDH labels of 1-63, at most 253,
    not an IP address, not ending in a number, the label in it) or TemplateError."""
    try:
        addr = parse_template(template).fill(label)
    except TemplateError:
        return
    assert isinstance(addr, TcpAddress)
    host = addr.host
    assert label in host and len(host) <= 253
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", p) for p in host.split("."))
    assert not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", host.split(".")[-1])
    with pytest.raises(ValueError):
        ipaddress.ip_address(host)


@PROPS
@given(label=st.text(max_size=80))
def test_unix_fill_stays_in_its_directory(label: str) -> None:
    try:
        addr = parse_template("unix:/run/lan/{label}.sock").fill(label)
    except TemplateError:
        return
    assert isinstance(addr, UnixAddress)
    assert addr.path == f"/run/lan/{label}.sock" and label.count("/") == 0 and ".." not in label


@pytest.mark.parametrize(("name", "hosts", "expected"), [
    ("nas.lan.example.com", ["*.lan.example.com"], "nas"),
    ("NAS.lan.example.com.", ["*.lan.example.com"], "nas"),  # SNI is looked up normalized
    ("a.b.lan.example.com", ["*.lan.example.com"], "a.b"),  # refused by check_label
    ("nas.b.lan.example.com", ["*.lan.example.com", "*.b.lan.example.com"], "nas"),  # longest
])
def test_label_for(name: str, hosts: list[str], expected: str) -> None:
    assert label_for(name, hosts) == expected


@pytest.mark.parametrize(("name", "hosts"), [
    (None, ["*.lan.example.com"]),
    ("", ["*.lan.example.com"]),
    ("lan.example.com", ["*.lan.example.com"]),
    ("vpn.example.com", ["*.lan.example.com"]),
    ("xlan.example.com", ["*.lan.example.com"]),
])
def test_label_for_refuses(name: str | None, hosts: list[str]) -> None:
    with pytest.raises(TemplateError):
        label_for(name, hosts)


def test_check_label_accepts_punycode() -> None:
    check_label("xn--bcher-kva")


# --------------------------------------------------------------------------------------------
# The config: where a template cannot be filled, check refuses it, naming the TOML path

SRC = "t.toml"


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        loads(text, SRC)
    return [(p.path, p.reason) for p in info.value.problems]


def block(name: str, hosts: list[str], upstreams: list[str], extra: str = "") -> str:
    hosts_t = ", ".join(f'"{h}"' for h in hosts)
    ups = ", ".join(f'"{u}"' for u in upstreams)
    return (f'[[passthrough]]\nname = "{name}"\nhosts = [{hosts_t}]\nupstreams = [{ups}]\n'
            f"{extra}\n")


def test_config_accepts_templates_and_keeps_order() -> None:
    text = block("lan", ["*.lan.example.com", "*.lan.example.net"],
                 ["{label}.lan:443", "unix:/run/lan/{label}.sock", "127.0.0.1:9"])
    config = loads(text, SRC).config
    ups = config.passthrough[0].upstreams
    assert [type(u) for u in ups] == [UpstreamTemplate, UpstreamTemplate, TcpAddress]
    rt = PassthroughRuntime.build(config.passthrough[0])
    assert rt.upstream_labels == ["{label}.lan:443", "unix:/run/lan/{label}.sock", "127.0.0.1:9"]
    plan = rt.plan("nas.lan.example.net")
    assert [t.label for t in plan] == ["nas.lan:443", "unix:/run/lan/nas.sock", "127.0.0.1:9"]


def test_config_without_templates_has_one_plan_for_all() -> None:
    config = loads(block("lan", ["vpn.example.com"], ["127.0.0.1:9"]), SRC).config
    rt = PassthroughRuntime.build(config.passthrough[0])
    assert rt.entries is None and rt.plan("vpn.example.com") is rt.targets


def test_config_refuses_every_unfillable_template() -> None:
    text = (block("mixed", ["*.lan.example.com", "vpn.example.com", "x.example.com"],
                  ["10.0.0.1:443", "{label}.lan:443"])
            + block("bad", ["*.bad.example.com"], ["{foo}.lan:443"],
                    'http_upstream = "{label}.lan:80"')
            + block("dflt", ["*.d.example.com"], ["unix:/run/{label}.sock"])
            + '[server]\nhttp_listen = ["127.0.0.1:0"]\n'
            + '[default]\nto = "passthrough:dflt"\nnon_tls = "passthrough:dflt"\n')
    found = problems(text)
    paths = [p for p, _ in found]
    assert paths == [
        "passthrough[1](bad).upstreams[0]",
        "passthrough[1](bad).http_upstream",
        "passthrough[0](mixed).upstreams[1]",
        "passthrough[0](mixed).upstreams[1]",
        "default.to",
        "default.non_tls",
    ], found
    reasons = dict(zip(paths, (r for _, r in found), strict=False))
    assert "unknown placeholder {foo}" in reasons["passthrough[1](bad).upstreams[0]"]
    assert "not http_upstream" in reasons["passthrough[1](bad).http_upstream"]
    assert "'vpn.example.com' is an exact name" in found[2][1]
    assert "'x.example.com' is an exact name" in found[3][1]
    assert "cannot fill" in reasons["default.to"]


def test_config_fixed_upstreams_still_resolve_at_load() -> None:
    """A brace-free upstream is an address as before (a name there is resolved at load)."""
    config = loads(block("lan", ["*.lan.example.com"], ["localhost:9"]), SRC).config
    assert config.passthrough[0].upstreams == [TcpAddress("localhost", 9)]


# --------------------------------------------------------------------------------------------
# The command line: `check` shows the template, `routes NAME` what it makes of NAME


def test_cli_check_and_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sniport.cli import main

    path = tmp_path / "sniport.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n'
                    + block("lan", ["*.lan.example.com"],
                            ["{label}.lan:443", "unix:/run/lan/{label}.sock", "127.0.0.1:9"]))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("*.lan.example.com                        -> passthrough:lan  (upstream "
            "{label}.lan:443, unix:/run/lan/{label}.sock: filled per name)") in out
    assert main(["routes", "-c", str(path), "nas.lan.example.com"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  upstreams: nas.lan:443, unix:/run/lan/nas.sock, 127.0.0.1:9  (in order; names "
        "resolved per connection)")
    assert main(["routes", "-c", str(path), "127.lan.example.com"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  upstreams: 127.lan:443, unix:/run/lan/127.sock, 127.0.0.1:9  (in order; names "
        "resolved per connection)")
    assert main(["routes", "-c", str(path), "a_b.lan.example.com"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  upstreams: none, the connection is closed (upstream_template: label 'a_b' is not "
        "a host name label (a-z, 0-9 and '-', not at either end))")
