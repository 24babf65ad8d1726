"""Host names as sniport compares them: one normal form, computed once.

Rules (DESIGN.md "Pinned behaviours"): lower-cased, trailing dot removed, internationalised
names converted to A-labels with the ``idna`` package (IDNA 2008 / UTS 46). A wildcard is
allowed only as the whole leftmost label (``*.example.com``), as in certificates
(RFC 6125 section 6.4.3). IP addresses are not host names: SNI never carries one
(RFC 6066 section 3).

A Host header from the network is validated before anything looks at it
(``parse_host_header``): only what DNS names, IPv4 addresses and IPv6 literals are made of.
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


# A Host header's reg-name (RFC 3986 section 3.2.2), restricted to what DNS names and real
# clients use: letters, digits, "-" and "_" (found in real names), 1-63 per label.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}").fullmatch
_PORT = re.compile(r"[0-9]{1,5}").fullmatch  # ASCII digits only: str.isdigit takes others
# WHATWG URL, "ends in a number": a host whose last label is decimal digits, or "0x" and hex
# digits, is parsed by browsers as an IPv4 address ("2130706433" is 127.0.0.1).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*").fullmatch
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def parse_host_header(value: str) -> tuple[str, int | None]:
    """The name and port of a Host header value, or HostNameError.

    RFC 9110 section 7.2: ``Host = uri-host [ ":" port ]``, and RFC 3986 section 3.2.2 for
    the host, restricted to what is safe to compare, log and forward:

    - a name of labels of letters, digits, "-" and "_", 1-63 characters each and at most 253
      in all (one trailing dot allowed, not counted); no percent-encoding, no other
      character. Its normal form is lower case without the trailing dot.
    - a name whose last label is a number is refused unless the whole of it is an IPv4
      address of four decimal parts (browsers read "2130706433" and "1.2.3.4.5" as
      numbers, WHATWG URL "ends in a number"); ``ipaddress`` refuses leading zeros.
    - an IP-literal: "[" IPv6 address "]", lower case, without a zone id (RFC 6874 is
      for URIs a user types, never for Host) and not IPvFuture.
    - the port: 1-5 digits, 1-65535, or empty (RFC 3986 allows ``host:``; None then).
      Port 0 is refused: no client reaches a server on it.
    """
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise HostNameError(f"{_shown(value)}: an IP literal without its closing bracket")
        literal, after = value[1:end], value[end + 1 :]
        if after and not after.startswith(":"):
            raise HostNameError(f"{_shown(value)}: only a port may follow an IP literal")
        if not literal or not _IPV6_CHARS.issuperset(literal):
            # Also a zone id ("%25eth0") and IPvFuture ("v1.x"), which ipaddress would not
            # all refuse: Python accepts "::1%eth0".
            raise HostNameError(f"{_shown(value)}: not an IPv6 address")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise HostNameError(f"{_shown(value)}: not an IPv6 address") from None
        return f"[{literal.lower()}]", _host_port(value, after[1:])
    host, colon, port_text = value.partition(":")
    port = _host_port(value, port_text) if colon else None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise HostNameError(f"{_shown(value)}: a host name has 1 to 253 characters")
    labels = name.split(".")
    if not all(_HOST_LABEL(label) for label in labels):
        raise HostNameError(f"{_shown(value)}: not a host name")
    if _NUMERIC_LABEL(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise HostNameError(
                f"{_shown(value)}: ends in a number but is not an IPv4 address") from None
    return name.lower(), port


def _shown(value: str) -> str:
    """A value from the network as an error message quotes it: escaped, and bounded."""
    return repr(value) if len(value) <= 80 else repr(value[:80]) + "..."


def _host_port(value: str, text: str) -> int | None:
    if not text:
        return None
    if not _PORT(text) or not 0 < int(text) <= 65535:
        raise HostNameError(f"{_shown(value)}: not a port 1-65535")
    return int(text)
