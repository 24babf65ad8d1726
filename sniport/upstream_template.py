"""Upstream templates: a passthrough upstream filled from the name the client asked for.

Job: parse a configured upstream such as ``"{label}.lan:443"`` or ``"unix:/run/lan/{label}.sock"``
once, at config load (``parse_template``), and fill it for one connection (``fill``): the
label that a wildcard host (``*.lan.example.com``) matched, ``nas`` for
``nas.lan.example.com``, gives ``nas.lan:443``. The name is resolved per connection by
``net/resolver.py``; nothing here does I/O (house rule 1: no asyncio, socket or ssl).

Rules:
- The one placeholder is ``{label}``: the part of the server name that the ``*`` of the
  block's wildcard host matched (exactly one label, house rule 4). Any other ``{...}``, a
  lone brace, or a placeholder in the port is refused at load.
- At load, the template filled with a probe label must be a valid ``HOST:PORT`` whose host
  is a name (LDH labels, RFC 1123 section 2.1), or a valid unix socket path; a template
  whose fixed labels are all numbers (``10.0.0.{label}``) would only ever make an IP
  address and is refused, as is one that ends in a number.
- At run time the label comes from the network: it must be one LDH label, 1-63 characters
  of ``a-z``, ``0-9`` and ``-``, not starting or ending with ``-`` (a punycode A-label
  ``xn--...`` is one); and the filled host must be a host name of at most 253 characters,
  each label at most 63, not ending in a number (``{label}:443`` with the label ``127``
  would make ``127:443``, which resolvers read as the IP address 0.0.0.127; WHATWG URL
  "ends in a number"). Anything else raises ``TemplateError``: that one connection ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sniport.addresses import AddressError, TcpAddress, UnixAddress, parse_address
from sniport.hostnames import normalize_sni

PLACEHOLDER = "{label}"
_PROBE = "a"  # a label that is valid everywhere: the fixed part is judged with it
_BRACED = re.compile(r"\{([^{}]*)\}")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?").fullmatch
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*").fullmatch
_SHOWN = 70  # characters of a name from the network quoted in a reason


class TemplateError(ValueError):
    """The template cannot be filled (at load: never; at run time: for this name)."""


@dataclass(frozen=True, slots=True)
class UpstreamTemplate:
    """``{label}.lan:443`` (``port`` set) or ``unix:/run/lan/{label}.sock`` (``port`` 0)."""

    text: str  # as configured: shown by ``check`` and used as the metrics label
    pattern: str  # the host part (TCP) or the unix path, with the placeholder in it
    port: int  # 0 for a unix socket

    def __str__(self) -> str:
        return self.text

    @property
    def unix(self) -> bool:
        return self.port == 0

    def fill(self, label: str) -> TcpAddress | UnixAddress:
        """The address for ``label`` (one label of a server name); TemplateError if the
        label, or what it makes, is not what a host name or path is made of."""
        check_label(label)
        filled = self.pattern.replace(PLACEHOLDER, label)
        if self.unix:
            try:
                addr = parse_address(f"unix:{filled}")
            except AddressError as exc:
                raise TemplateError(str(exc)) from None
            assert isinstance(addr, UnixAddress)
            return addr
        _check_host(filled)
        return TcpAddress(filled, self.port)


def is_template(text: object) -> bool:
    """Whether a configured upstream is meant as a template (it has a brace)."""
    return isinstance(text, str) and ("{" in text or "}" in text)


def parse_template(text: str) -> UpstreamTemplate:
    """The template in ``text``, or TemplateError saying what is wrong with it."""
    rest = _BRACED.sub("", text)
    if "{" in rest or "}" in rest:
        raise TemplateError(f"{text!r}: a brace without its pair (the placeholder is {{label}})")
    names = _BRACED.findall(text)
    unknown = sorted({n for n in names if n != "label"})
    if unknown:
        listed = ", ".join("{" + n + "}" for n in unknown)
        raise TemplateError(f"{text!r}: unknown placeholder {listed} (the one placeholder is "
                            "{label})")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith(("/", "@")):
            raise TemplateError(f"{text!r}: a unix socket path must be absolute (or @name)")
        try:
            parse_address(f"unix:{path.replace(PLACEHOLDER, _PROBE)}")
        except AddressError as exc:
            raise TemplateError(str(exc)) from None
        return UpstreamTemplate(text, path, 0)
    if text.startswith("["):
        raise TemplateError(f"{text!r}: an IPv6 address has no label to fill; a template "
                            "fills a host name")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise TemplateError(f"{text!r}: expected HOST:PORT or unix:PATH with {{label}} in "
                            "the host name or the path")
    host = host.lower()
    if PLACEHOLDER in port_text:
        raise TemplateError(f"{text!r}: {{label}} may stand in the host name or the unix "
                            "path, not in the port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TemplateError(f"{text!r}: port must be a number from 1 to 65535")
    parts = host.split(".")
    for part in parts:
        if not _LDH_LABEL(part.replace(PLACEHOLDER, _PROBE)):
            raise TemplateError(f"{text!r}: {part!r} is not a host name label (a-z, 0-9 and "
                                "'-', 1-63 characters with the label filled in)")
    if len(host.replace(PLACEHOLDER, _PROBE)) > 253:
        raise TemplateError(f"{text!r}: the host name is longer than 253 characters")
    if PLACEHOLDER not in parts[-1] and _NUMERIC_LABEL(parts[-1]):
        raise TemplateError(f"{text!r}: the host ends in a number, which resolvers read as "
                            "an IP address")
    fixed = [part for part in parts if PLACEHOLDER not in part]
    if fixed and all(part.isdigit() for part in fixed):
        raise TemplateError(f"{text!r}: this fills an IP address, not a host name (filled "
                            "IP addresses are refused: a template names machines)")
    return UpstreamTemplate(text, host, int(port_text))


def label_for(name: str | None, hosts: list[str]) -> str:
    """The part of ``name`` that the ``*`` of one of ``hosts`` (``*.lan.example.com``)
    matched; TemplateError when no wildcard host matches (no label to fill)."""
    if not name:
        raise TemplateError("no server name: nothing to fill {label} with")
    lookup = normalize_sni(name)
    best = ""
    for host in hosts:
        suffix = host[1:] if host.startswith("*.") else ""
        if suffix and lookup.endswith(suffix) and len(suffix) > len(best):
            best = suffix
    if not best or len(lookup) == len(best):
        raise TemplateError(f"{_shown(name)} matches no wildcard host of the block: nothing "
                            "to fill {label} with")
    return lookup[: -len(best)]


def check_label(label: str) -> None:
    """TemplateError unless ``label`` is one LDH label (RFC 1123 section 2.1)."""
    if "." in label:
        raise TemplateError(f"label {_shown(label)} has a dot: {{label}} is one label")
    if not label:
        raise TemplateError("empty label")
    if len(label) > 63:
        raise TemplateError(f"label {_shown(label)} is longer than 63 characters")
    if not _LDH_LABEL(label):
        raise TemplateError(f"label {_shown(label)} is not a host name label (a-z, 0-9 and "
                            "'-', not at either end)")


def _check_host(host: str) -> None:
    if len(host) > 253:
        raise TemplateError(f"{_shown(host)} is longer than 253 characters")
    labels = host.split(".")
    for part in labels:
        if not _LDH_LABEL(part):
            raise TemplateError(f"{_shown(host)}: {_shown(part)} is not a host name label "
                                "(a-z, 0-9 and '-', 1-63 characters)")
    # An IPv4 literal ends in a number and an IPv6 one fails the label check: no host that
    # passes both is an IP address.
    if _NUMERIC_LABEL(labels[-1]):
        raise TemplateError(f"{_shown(host)} ends in a number: resolvers would read it as "
                            "an IP address")


def _shown(value: str) -> str:
    """A name from the network as a reason quotes it: escaped and bounded."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."
