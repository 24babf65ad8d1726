"""Routing: which block a connection reaches, decided from its ClientHello (pure).

Job: compile the config's blocks once into a ``RouteTable``; ``decide()`` maps a server name
to a prebuilt ``Route`` without allocating.

Rules (DESIGN.md house rule 4): the exact name wins, then the wildcard of its parent
(``*.example.com`` matches exactly one label, ``a.example.com`` and not ``a.b.example.com``,
as for certificates, RFC 6125 section 6.4.3), then ``[default].to``; a ClientHello without a
name goes to ``[default].to`` too, and bytes that are not TLS to ``[default].non_tls``. Client
addresses are checked against the block's allow/deny lists once the block is known; deny wins.
No I/O here: no asyncio, socket or ssl import.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sniport.config import Block, Config, Passthrough
from sniport.hostnames import normalize_sni

Kind = Literal["passthrough", "terminate", "reject"]
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
    block: Block | None  # None for reject
    rule: Literal["exact", "wildcard", "no_sni", "unknown_name", "non_tls"]
    pattern: str | None = None  # the configured name that matched
    acl: Acl | None = None  # None: everyone is allowed

    @property
    def label(self) -> str:
        """``passthrough:lan``, ``site:blog`` or ``reject``: the decision as logged."""
        if self.block is None:
            return "reject"
        return f"{'passthrough' if self.kind == 'passthrough' else 'site'}:{self.block.name}"


class RouteTable:
    __slots__ = ("_exact", "_no_sni", "_non_tls", "_unknown", "_wildcard", "blocks")

    def __init__(self, config: Config) -> None:
        self._exact: dict[str, Route] = {}
        self._wildcard: dict[str, Route] = {}  # keyed by the parent: "example.com"
        self.blocks: dict[str, Block] = {}
        for block in config.blocks():
            prefix = "passthrough" if isinstance(block, Passthrough) else "site"
            self.blocks[f"{prefix}:{block.name}"] = block
            kind = _kind(block)
            acl = Acl(block.allow, block.deny) if block.allow or block.deny else None
            for host in block.hosts:
                if host.startswith("*."):
                    self._wildcard[host[2:]] = Route(kind, block, "wildcard", host, acl)
                else:
                    self._exact[host] = Route(kind, block, "exact", host, acl)
        self._no_sni = self._named(config.default.to, "no_sni")
        self._unknown = self._named(config.default.to, "unknown_name")
        self._non_tls = self._named(
            "reject" if config.default.non_tls == "close" else config.default.non_tls, "non_tls"
        )

    def _named(self, target: str, rule: Literal["no_sni", "unknown_name", "non_tls"]) -> Route:
        if target == "reject":
            return Route("reject", None, rule)
        block = self.blocks[target]  # config validation guarantees it exists
        acl = Acl(block.allow, block.deny) if block.allow or block.deny else None
        return Route(_kind(block), block, rule, target, acl)

    def decide(self, sni: str | None) -> Route:
        if not sni:
            return self._no_sni
        name = normalize_sni(sni)
        route = self._exact.get(name)
        if route is not None:
            return route
        dot = name.find(".")
        if dot > 0:
            route = self._wildcard.get(name[dot + 1 :])
            if route is not None:
                return route
        return self._unknown

    def non_tls(self) -> Route:
        return self._non_tls

    def entries(self) -> list[tuple[str, Route]]:
        """Every configured name with its route, exact names first, for ``check``/``routes``."""
        return [*sorted(self._exact.items()),
                *sorted((f"*.{k}", v) for k, v in self._wildcard.items())]

    def defaults(self) -> list[Route]:
        return [self._no_sni, self._unknown, self._non_tls]


def _kind(block: Block) -> Kind:
    return "passthrough" if isinstance(block, Passthrough) else "terminate"


def explain(route: Route, sni: str | None) -> str:
    """One sentence saying why ``sni`` reaches ``route``, for ``sniport routes``."""
    if route.rule == "exact":
        why = f"exact name {route.pattern}"
    elif route.rule == "wildcard":
        why = f"wildcard {route.pattern} (matches one label)"
    elif route.rule == "no_sni":
        why = "no server name in the ClientHello: [default].to"
    elif route.rule == "unknown_name":
        why = f"no block claims {normalize_sni(sni or '')!r}: [default].to"
    else:
        why = "not TLS: [default].non_tls"
    return f"{route.label}  ({why})"
