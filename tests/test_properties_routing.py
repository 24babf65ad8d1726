"""RouteTable.decide (sniport/routing.py) against a reference model, over random configs.

DESIGN.md house rule 4: the exact name, then the wildcard of its parent (``*.example.com``
matches exactly one label, as in certificates, RFC 6125 section 6.4.3), then
``[default].to``; a ClientHello without a name goes to ``[default].to``. Configs are built
with ``sniport.config.from_dict``, so they are the configs sniport would load.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.config import from_dict
from sniport.routing import RouteTable

# No deadline: building a config validates it with pydantic, and the machine is shared.
PROPS = settings(deadline=None, max_examples=100)

PARENTS = ["example.com", "a.example.com", "b.example.com", "example.net", "x.a.example.com"]
LABELS = ["a", "b", "x", "www", "_acme", "xn--bcher-kva"]
# Every name a config may claim: exact names below the parents, the parents themselves, and
# the one-label wildcard of each parent.
EXACT = sorted({f"{label}.{parent}" for label in LABELS for parent in PARENTS} | set(PARENTS))
WILDCARDS = [f"*.{parent}" for parent in PARENTS]


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], str]:
    """A raw config, the block label ("site:s0", "passthrough:p1") of each claimed name,
    and ``[default].to``."""
    names = draw(st.lists(st.sampled_from(EXACT + WILDCARDS), unique=True, min_size=1,
                          max_size=12))
    kinds = draw(st.lists(st.sampled_from(["passthrough", "site"]), min_size=1, max_size=4))
    labels = [f"{kind}:{kind[0]}{i}" for i, kind in enumerate(kinds)]
    owner = {name: draw(st.sampled_from(labels)) for name in names}
    raw: dict[str, Any] = {"passthrough": [], "site": []}
    for label in labels:
        kind, block = label.split(":")
        hosts = [name for name in names if owner[name] == label]
        if not hosts:
            continue
        # Claimed in any spelling: the config normalises names (lower case, no final dot).
        hosts = [draw(st.sampled_from([h, h.upper(), h + "."])) for h in hosts]
        if kind == "passthrough":
            raw["passthrough"].append(
                {"name": block, "hosts": hosts, "upstreams": ["127.0.0.1:9"]})
        else:
            raw["site"].append({"name": block, "hosts": hosts, "tls": "self-signed",
                                "route": [{"path": "/", "respond": {}}]})
    used = sorted(set(owner.values()))
    default = draw(st.sampled_from(["reject", *used]))
    raw["default"] = {"to": default}
    return raw, owner, default


@st.composite
def queried_names(draw: st.DrawFn) -> str:
    """A server name as a client may send it: claimed or not, one or two labels below a
    parent, in any case, with or without the final dot."""
    name = draw(st.one_of(
        st.sampled_from(EXACT),
        st.builds(lambda a, b, p: f"{a}.{b}.{p}", st.sampled_from(LABELS),
                  st.sampled_from(LABELS), st.sampled_from(PARENTS)),
        st.builds(lambda a, p: f"{a}.{p}", st.sampled_from(["zz", "q1", "*"]),
                  st.sampled_from(PARENTS)),
        st.sampled_from(["com", "net", "localhost", "example.org", ".example.com"]),
    ))
    spelt = draw(st.sampled_from([name, name.upper(), name.title()]))
    return spelt + draw(st.sampled_from(["", "."]))


def model(owner: dict[str, str], default: str, sni: str | None) -> tuple[str, str, str | None]:
    """(label, rule, pattern) as DESIGN.md says, written independently of routing.py."""
    if not sni:
        return default, "no_sni", None if default == "reject" else default
    name = sni.lower()
    if name.endswith("."):
        name = name[:-1]
    if name in owner and not name.startswith("*."):  # "*" sent as a name is just a label
        return owner[name], "exact", name
    first, dot, parent = name.partition(".")
    if first and dot and f"*.{parent}" in owner:
        return owner[f"*.{parent}"], "wildcard", f"*.{parent}"
    return default, "unknown_name", None if default == "reject" else default


@PROPS
@given(configs(), st.lists(queried_names(), min_size=1, max_size=20))
def test_decide_matches_the_model(config: tuple[dict[str, Any], dict[str, str], str],
                                  names: list[str]) -> None:
    raw, owner, default = config
    table = RouteTable(from_dict(raw, "test.toml").config)
    for sni in [*names, None, ""]:
        route = table.decide(sni)
        label, rule, pattern = model(owner, default, sni)
        assert (route.label, route.rule, route.pattern) == (label, rule, pattern), sni
        if rule in ("exact", "wildcard"):
            assert route.kind == ("passthrough" if label.startswith("passthrough:")
                                  else "terminate")
        if route.rule == "wildcard":
            # Exactly one label more than the wildcard's parent.
            assert pattern is not None
            assert sni is not None
            queried = sni.lower().removesuffix(".")
            assert queried.count(".") == pattern.count(".")
            assert queried.endswith(pattern[1:])
            assert queried.startswith("*.") or queried not in owner  # exact names win


@PROPS
@given(configs())
def test_every_claimed_name_reaches_its_block(
        config: tuple[dict[str, Any], dict[str, str], str]) -> None:
    raw, owner, _ = config
    table = RouteTable(from_dict(raw, "test.toml").config)
    for name, label in owner.items():
        if name.startswith("*."):
            # Any one label under the parent that is not itself claimed.
            probe = f"zz.{name[2:]}"
            if probe not in owner:
                assert table.decide(probe).label == label
            assert table.decide(f"q.{probe}").pattern != name  # never two labels below
        else:
            assert table.decide(name).label == label
            assert table.decide(name.upper() + ".").label == label


# ALPN in routing (issue 12 item 5): blocks with alpn share names with each other and with
# the name's block without; the level (exact, then wildcard) is chosen by the name alone.
PROTOCOLS = ["xmpp-client", "xmpp-server", "h2", "x"]


@st.composite
def alpn_configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], str,
                                          list[tuple[str, list[str], list[str]]]]:
    raw, owner, default = draw(configs())
    extra: list[tuple[str, list[str], list[str]]] = []  # (label, hosts, alpn) in order
    taken: set[tuple[str, str]] = set()
    for i in range(draw(st.integers(0, 3))):
        hosts = draw(st.lists(st.sampled_from(EXACT + WILDCARDS), unique=True, min_size=1,
                              max_size=5))
        alpn = draw(st.lists(st.sampled_from(PROTOCOLS), unique=True, min_size=1, max_size=2))
        hosts = [h for h in hosts if not any((h, p) in taken for p in alpn)]
        if not hosts:
            continue
        taken |= {(h, p) for h in hosts for p in alpn}
        raw["passthrough"].append({"name": f"alpn{i}", "hosts": hosts, "alpn": alpn,
                                   "upstreams": ["127.0.0.1:9"]})
        extra.append((f"passthrough:alpn{i}", hosts, alpn))
    return raw, owner, default, extra


def alpn_model(owner: dict[str, str], default: str,
               extra: list[tuple[str, list[str], list[str]]], sni: str,
               offered: list[str]) -> tuple[str, str]:
    name = sni.lower().removesuffix(".")
    claimed = set(owner) | {h for _, hosts, _ in extra for h in hosts}
    first, dot, parent = name.partition(".")
    if name in claimed and not name.startswith("*."):
        key, rule = name, "exact"
    elif first and dot and f"*.{parent}" in claimed:
        key, rule = f"*.{parent}", "wildcard"
    else:
        return default, "unknown_name"
    for label, hosts, alpn in extra:  # config order: [[passthrough]] before [[site]]
        if key in hosts and any(p in offered for p in alpn):
            return label, rule
    if key in owner:
        return owner[key], rule
    return "reject", "alpn"


@PROPS
@given(alpn_configs(), st.lists(st.tuples(queried_names(),
                                          st.lists(st.sampled_from([*PROTOCOLS, "acme-tls/1"]),
                                                   max_size=3)), min_size=1, max_size=20))
def test_decide_by_alpn_matches_the_model(
        config: tuple[dict[str, Any], dict[str, str], str,
                      list[tuple[str, list[str], list[str]]]],
        queries: list[tuple[str, list[str]]]) -> None:
    raw, owner, default, extra = config
    table = RouteTable(from_dict(raw, "test.toml").config)
    for sni, offered in queries:
        route = table.decide(sni, offered)
        assert (route.label, route.rule) == alpn_model(owner, default, extra, sni, offered), (
            sni, offered)
        if not offered:  # no ALPN: what the name alone gives
            assert route == table.decide(sni)
