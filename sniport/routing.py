"""Routing: which block a connection reaches, decided from its ClientHello (pure).

Job: compile the config's blocks once into a ``RouteTable``; ``decide()`` maps a server name
to a prebuilt ``Route`` without allocating.

Rules (DESIGN.md house rule 4): the exact name wins, then the wildcard of its parent
(``*.example.com`` matches exactly one label, ``a.example.com`` and not ``a.b.example.com``,
as for certificates, RFC 6125 section 6.4.3), then ``[default].to``; a ClientHello without a
name goes to ``[default].to`` too. Where a name (exact, or the wildcard) is claimed by blocks
with ``alpn``, the first of them (in config order) that takes a protocol the hello offers
(RFC 7301) wins; else the name's block without ``alpn``; else, when every block claiming the
name has ``alpn``, the hello is refused (no_application_protocol, RFC 7301 section 3.2), not
passed on to a wildcard or the default. Bytes that are not TLS go by what they are
(``by_first_bytes``): the ``[[passthrough]] protocol`` block that claims them (SSH), else
``[default].non_tls`` ("http" takes only HTTP/1.x); a client that sends nothing for
``non_tls_timeout`` goes to ``[default].silent``. Client addresses are checked against the
block's allow/deny lists once the block is known; deny wins. The README's "Decision order"
says the same for users. No I/O here: no asyncio, socket or ssl import.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sniport.config import Block, Config, Passthrough
from sniport.hostnames import normalize_sni

Kind = Literal["passthrough", "terminate", "reject", "http"]
Rule = Literal["exact", "wildcard", "no_sni", "unknown_name", "non_tls", "protocol", "silent",
               "alpn"]
# What a connection's first bytes were, when they were not TLS (wire/detect.py): an SSH
# identification line, an HTTP/1.x request line, something else, or nothing at all for
# non_tls_timeout.
FirstBytes = Literal["ssh", "http", "other", "silent"]
FIRST_BYTES: tuple[FirstBytes, ...] = ("ssh", "http", "other", "silent")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Acl:
    """Allow/deny lists of one block; an empty allow list lets everyone in, deny wins."""

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Sequence[Network], deny: Sequence[Network]) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)

    def permits(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            # A unix-socket client has no IP: no deny entry can name it, no allow entry admits
            # it; it is in only where allow is empty (everyone).
            return not self._allow
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self._deny):
            return False
        return not self._allow or any(addr in net for net in self._allow)


@dataclass(frozen=True, slots=True)
class Route:
    """What to do with a connection, and why (``rule`` and ``pattern`` explain the choice)."""

    kind: Kind
    block: Block | None  # None for reject and http
    rule: Rule
    pattern: str | None = None  # the configured name (or protocol) that matched
    acl: Acl | None = None  # None: everyone is allowed
    alpn: tuple[str, ...] = ()  # the block takes only hellos offering one of these

    @property
    def label(self) -> str:
        """``passthrough:lan``, ``site:blog``, ``http`` or ``reject``: the decision as
        logged."""
        if self.block is None:
            return self.kind if self.kind == "http" else "reject"
        return f"{'passthrough' if self.kind == 'passthrough' else 'site'}:{self.block.name}"


class RouteTable:
    __slots__ = ("_alpn_exact", "_alpn_wildcard", "_by_protocol", "_exact", "_no_sni",
                 "_non_tls", "_unknown", "_wildcard", "blocks", "detects", "silent_after")

    def __init__(self, config: Config) -> None:
        # A name's route for any hello: its block without alpn, or, when only blocks with
        # alpn claim it, the refusal of hellos that offer none of theirs (RFC 7301 section
        # 3.2: no_application_protocol).
        self._exact: dict[str, Route] = {}
        self._wildcard: dict[str, Route] = {}  # keyed by the parent: "example.com"
        # The routes of blocks with alpn, tried in config order before the above: only for
        # the names they claim, so a config without alpn pays one empty-dict test.
        self._alpn_exact: dict[str, tuple[Route, ...]] = {}
        self._alpn_wildcard: dict[str, tuple[Route, ...]] = {}
        self._by_protocol: dict[str, Route] = {}
        self.blocks: dict[str, Block] = {}
        for block in config.blocks():
            prefix = "passthrough" if isinstance(block, Passthrough) else "site"
            self.blocks[f"{prefix}:{block.name}"] = block
            kind = _kind(block)
            acl = Acl(block.allow, block.deny) if block.allow or block.deny else None
            protocol = getattr(block, "protocol", "tls")
            if protocol != "tls":
                self._by_protocol[protocol] = Route(kind, block, "protocol", protocol, acl)
            alpn = tuple(getattr(block, "alpn", ()))
            for host in block.hosts:
                wildcard = host.startswith("*.")
                key = host[2:] if wildcard else host
                route = Route(kind, block, "wildcard" if wildcard else "exact", host, acl, alpn)
                if alpn:
                    alternatives = self._alpn_wildcard if wildcard else self._alpn_exact
                    alternatives[key] = (*alternatives.get(key, ()), route)
                    (self._wildcard if wildcard else self._exact).setdefault(
                        key, Route("reject", None, "alpn", host))
                else:
                    (self._wildcard if wildcard else self._exact)[key] = route
        self._no_sni = self._named(config.default.to, "no_sni")
        self._unknown = self._named(config.default.to, "unknown_name")
        non_tls = config.default.non_tls
        self._non_tls = self._named("reject" if non_tls == "close" else non_tls, "non_tls")
        if config.default.silent != "close":
            self._by_protocol["silent"] = self._named(config.default.silent, "silent")
        # Whether bytes that are not TLS are looked at further (wire/detect.py) before they
        # are routed, or go to [default].non_tls as soon as the first byte shows it.
        self.detects = bool(self._by_protocol.keys() - {"silent"}) or non_tls == "http"
        # Seconds of silence after which a client goes to [default].silent (0: never).
        self.silent_after = config.server.non_tls_timeout if "silent" in self._by_protocol \
            else 0.0

    def _named(self, target: str, rule: Rule) -> Route:
        if target == "reject":
            return Route("reject", None, rule)
        if target == "http":
            return Route("http", None, rule)
        block = self.blocks[target]  # config validation guarantees it exists
        acl = Acl(block.allow, block.deny) if block.allow or block.deny else None
        return Route(_kind(block), block, rule, target, acl)

    def decide(self, sni: str | None, alpn: Sequence[str] = ()) -> Route:
        """The route of a hello naming ``sni`` and offering ``alpn`` (in its order). Without
        ``alpn`` (a Host header, a name typed to ``routes``): the name's block for any
        hello."""
        if not sni:
            return self._no_sni
        name = normalize_sni(sni)
        route = self._exact.get(name)
        if route is not None:
            if self._alpn_exact and alpn:
                return _by_alpn(self._alpn_exact.get(name), alpn, route)
            return route
        dot = name.find(".")
        if dot > 0:
            parent = name[dot + 1 :]
            route = self._wildcard.get(parent)
            if route is not None:
                if self._alpn_wildcard and alpn:
                    return _by_alpn(self._alpn_wildcard.get(parent), alpn, route)
                return route
        return self._unknown

    def non_tls(self) -> Route:
        return self._non_tls

    def by_first_bytes(self, first: FirstBytes) -> Route:
        """Where a connection goes whose first bytes were not TLS, by what they were: the
        protocol's block if one claims it, else ``[default].non_tls`` — which, when it is
        "http", takes only HTTP (anything else is closed)."""
        route = self._by_protocol.get(first)
        if route is not None:
            return route
        if first == "silent":  # no [default].silent: nothing takes a client that says nothing
            return _CLOSE_SILENT
        if self._non_tls.kind == "http" and first != "http":
            return _CLOSE_NON_TLS
        return self._non_tls

    def entries(self) -> list[tuple[str, Route]]:
        """Every configured name with its routes, exact names first, for ``check``/
        ``routes``: those of blocks with alpn first, as ``decide`` tries them."""
        out: list[tuple[str, Route]] = []
        for prefix, plain, alternatives in (("", self._exact, self._alpn_exact),
                                            ("*.", self._wildcard, self._alpn_wildcard)):
            for key in sorted(plain):
                out += [(prefix + key, r) for r in alternatives.get(key, ())]
                out.append((prefix + key, plain[key]))
        return out

    def defaults(self) -> list[Route]:
        return [self._no_sni, self._unknown, self._non_tls, *self._by_protocol.values()]


def _by_alpn(alternatives: tuple[Route, ...] | None, offered: Sequence[str],
             otherwise: Route) -> Route:
    """The first block (in config order) that takes a protocol the client offers."""
    if alternatives:
        for route in alternatives:
            for proto in route.alpn:
                if proto in offered:
                    return route
    return otherwise


_CLOSE_NON_TLS = Route("reject", None, "non_tls", "http")  # not for non_tls = "http"
_CLOSE_SILENT = Route("reject", None, "silent")


def _kind(block: Block) -> Kind:
    return "passthrough" if isinstance(block, Passthrough) else "terminate"


def explain(route: Route, sni: str | None) -> str:
    """One sentence saying why ``sni`` reaches ``route``, for ``sniport routes``."""
    offers = f", and the hello offers ALPN {' or '.join(route.alpn)}" if route.alpn else ""
    if route.rule == "exact":
        why = f"exact name {route.pattern}{offers}"
    elif route.rule == "wildcard":
        why = f"wildcard {route.pattern} (matches one label){offers}"
    elif route.rule == "alpn":
        why = (f"{route.pattern} is claimed only by blocks with alpn, and the hello offers "
               "none of theirs: no_application_protocol")
    elif route.rule == "no_sni":
        why = "no server name in the ClientHello: [default].to"
    elif route.rule == "unknown_name":
        why = f"no block claims {normalize_sni(sni or '')!r}: [default].to"
    elif route.rule == "protocol":
        why = f'{route.pattern} first bytes: the protocol = "{route.pattern}" block'
    elif route.rule == "silent":
        why = ("silent for non_tls_timeout: [default].silent" if route.block is not None
               else "silent: no [default].silent, closed at client_hello_timeout")
    elif route.kind == "http":
        why = ('HTTP/1.x, not TLS: [default].non_tls = "http" (308 to https:// for a site\'s '
               "hosts, 404 otherwise)")
    elif route.pattern == "http" and route.kind == "reject":
        why = 'not TLS, and [default].non_tls = "http" answers only HTTP/1.x'
    else:
        why = "not TLS: [default].non_tls"
    return f"{route.label}  ({why})"
