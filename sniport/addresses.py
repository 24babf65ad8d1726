"""Addresses in the config: ``HOST:PORT``, ``[V6]:PORT``, ``unix:/path``, ``unix:@abstract``.

Rules: parsing is pure and strict; a listen address must be an IP literal (what is bound is
what is written); an upstream may name a host, resolved once when the config is loaded, never
per connection (only an upstream template, ``upstream_template.py``, is resolved per
connection).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str  # IP literal or host name, without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str  # "@name" for the Linux abstract namespace

    def __str__(self) -> str:
        return f"unix:{self.path}"

    @property
    def abstract(self) -> bool:
        return self.path.startswith("@")

    @property
    def sockaddr(self) -> str | bytes:
        # Abstract names are a leading NUL byte then the name (unix(7)).
        return b"\0" + self.path[1:].encode() if self.abstract else self.path


Address = TcpAddress | UnixAddress


def parse_address(text: str, *, require_ip: bool = False) -> Address:
    if not isinstance(text, str):
        raise AddressError(f"expected a string, got {type(text).__name__}")
    if text.startswith("unix:"):
        path = text[5:]
        if not path or path == "@":
            raise AddressError(f"{text!r}: empty unix socket path")
        if not path.startswith(("/", "@")):
            raise AddressError(f"{text!r}: a unix socket path must be absolute (or @name)")
        if len(path.encode()) > 107:
            raise AddressError(f"{text!r}: unix socket path longer than 107 bytes")
        return UnixAddress(path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"{text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"{text!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH")
        if ":" in host:
            raise AddressError(f"{text!r}: write IPv6 addresses in brackets, [{host}]:PORT")
    # Port 0 is for listen addresses only: the kernel picks a free port (tests, benches).
    lowest = 0 if require_ip else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise AddressError(f"{text!r}: port must be a number from {lowest} to 65535")
    addr = TcpAddress(host, int(port_text))
    if require_ip and not addr.is_ip:
        raise AddressError(f"{text!r}: a listen address must be an IP address, not a name")
    return addr


def resolve(addr: TcpAddress) -> list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]]:
    """(family, sockaddr) pairs for a TCP address; a name is looked up once, here."""
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressError(f"{addr}: cannot resolve {addr.host!r}: {exc.strerror}") from None
    seen: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]] = []
    for family, _, _, _, sockaddr in infos:
        item = (int(family), sockaddr)
        if item not in seen:
            seen.append(item)  # type: ignore[arg-type]
    return seen


@dataclass(frozen=True, slots=True)
class HttpUpstream:
    """An HTTP application: ``http://host:port``, ``https://host[:port]`` or ``unix:/path``.

    Upstreams carry no path: the request's own path is sent (DESIGN.md, proxy keys)."""

    scheme: str  # "http" or "https"
    address: Address
    authority: str  # host[:port] as written, for ``host = "upstream"`` and TLS SNI

    def __str__(self) -> str:
        if isinstance(self.address, UnixAddress):
            return str(self.address)
        return f"{self.scheme}://{self.authority}"

    @property
    def tls_name(self) -> str:
        return self.address.host if isinstance(self.address, TcpAddress) else ""


def parse_http_upstream(text: str) -> HttpUpstream:
    if not isinstance(text, str):
        raise AddressError(f"expected a string, got {type(text).__name__}")
    if text.startswith("unix:"):
        addr = parse_address(text)
        return HttpUpstream("http", addr, "localhost")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise AddressError(f"{text!r}: expected http://HOST:PORT, https://HOST[:PORT] or "
                           "unix:/PATH")
    authority = rest.rstrip("/")
    if "/" in authority or "?" in authority or "#" in authority:
        raise AddressError(f"{text!r}: an upstream has no path; the request's path is sent")
    if "@" in authority:
        raise AddressError(f"{text!r}: credentials in an upstream URL are not supported")
    has_port = authority.rsplit("]", 1)[-1].count(":") == 1 if authority.startswith("[") \
        else ":" in authority
    target = authority if has_port else f"{authority}:{443 if scheme == 'https' else 80}"
    return HttpUpstream(scheme, parse_address(target), authority)
