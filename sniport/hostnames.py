"""Host names as sniport compares them: one normal form, computed once.

Rules (DESIGN.md "Pinned behaviours"): lower-cased, trailing dot removed, internationalised
names converted to A-labels with the ``idna`` package (IDNA 2008 / UTS 46). A wildcard is
allowed only as the whole leftmost label (``*.example.com``), as in certificates
(RFC 6125 section 6.4.3). IP addresses are not host names: SNI never carries one
(RFC 6066 section 3).
"""

from __future__ import annotations

import ipaddress
import re

import idna

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


class HostNameError(ValueError):
    pass


def normalize(name: str) -> str:
    """The normal form of a configured host name or wildcard; raises HostNameError."""
    if not isinstance(name, str) or not name.strip():
        raise HostNameError("empty host name")
    host = name.strip().rstrip(".")
    wildcard = host.startswith("*.")
    rest = host[2:] if wildcard else host
    if "*" in rest:
        raise HostNameError(f"{name!r}: a wildcard is allowed only as the whole leftmost label")
    try:
        ipaddress.ip_address(rest.strip("[]"))
    except ValueError:
        pass
    else:
        raise HostNameError(f"{name!r} is an IP address; SNI never carries one (RFC 6066)")
    if rest.isascii():
        rest = rest.lower()
        labels = rest.split(".")
        for label in labels:
            if not _LABEL.match(label):
                raise HostNameError(f"{name!r}: invalid label {label!r}")
            if label.startswith("xn--"):
                try:
                    idna.decode(label)
                except idna.IDNAError as exc:
                    raise HostNameError(f"{name!r}: invalid A-label {label!r}: {exc}") from None
    else:
        try:
            rest = idna.encode(rest, uts46=True, std3_rules=True).decode("ascii")
        except idna.IDNAError as exc:
            raise HostNameError(f"{name!r}: not a valid internationalised name: {exc}") from None
    if len(rest) > 253:
        raise HostNameError(f"{name!r}: longer than 253 characters")
    if wildcard and "." not in rest:
        raise HostNameError(f"{name!r}: a wildcard needs a parent domain of two labels or more")
    return "*." + rest if wildcard else rest


def normalize_sni(sni: str) -> str:
    """The lookup form of a name from the network: SNI is ASCII already (A-labels)."""
    return sni.lower().rstrip(".")
