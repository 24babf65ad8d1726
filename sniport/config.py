"""The config file: TOML in, a validated and frozen model out.

Job: turn ``sniport.toml`` into a ``Config`` that the rest of sniport can trust, or refuse it
with *every* problem at once, each naming the file, the TOML path and the reason.

Rules:
- Field checks are pydantic models (``extra="forbid"``: an unknown key is an error); checks
  across blocks (a host claimed twice, a name used twice, ``[default]`` naming a block that
  does not exist) run after, over the validated model, and add to the same list.
- A key of the contract (DESIGN.md, "Config contract") that is not built yet is refused with
  "not supported yet", never accepted and ignored: see ``NOT_SUPPORTED_YET``.
- Nothing here exits or prints; ``cli.py`` does. ``check`` and a reload use ``load``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from sniport.addresses import (
    Address,
    AddressError,
    HttpUpstream,
    TcpAddress,
    parse_address,
    parse_http_upstream,
)
from sniport.hostnames import HostNameError, normalize
from sniport.upstream_template import (
    PLACEHOLDER,
    TemplateError,
    UpstreamTemplate,
    is_template,
    parse_template,
)

# ---------------------------------------------------------------------------------------------
# Value types: durations, sizes, addresses, host names, CIDRs.

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+)([KMG]?)\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration(value: Any) -> float:
    """``"10s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"10s\", \"500ms\", \"2m\" or seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(
            f"{value!r} is not a duration: write \"10s\", \"500ms\", \"2m\", \"1h\" or seconds"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r}: a duration must be a finite number >= 0")
    return seconds


def parse_rate(value: Any) -> tuple[int, float]:
    """``"200/10s"``, ``"20/s"``, ``"50/1m"``: a count per duration -> (count, seconds)."""
    if isinstance(value, str) and "/" in value:
        count, _, per = value.strip().partition("/")
        per = per.strip()
        try:
            n = int(count.strip())
            seconds = parse_duration(per if per[:1].isdigit() else "1" + per)
        except ValueError:
            pass
        else:
            if n >= 1 and seconds > 0:
                return n, seconds
    raise ValueError(f"{value!r} is not a rate: write a count per duration, \"200/10s\" or "
                     "\"20/s\" (a count >= 1)")


def parse_size(value: Any) -> int:
    """``"10M"``, ``"512K"``, ``"1G"`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"10M\", \"512K\" or bytes")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value.strip())):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    else:
        raise ValueError(f"{value!r} is not a size: write \"10M\", \"512K\" or bytes")
    if size < 0:
        raise ValueError(f"{value!r}: a size must be >= 0")
    return size


def _address(value: Any) -> Address:
    try:
        return parse_address(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _listen_address(value: Any) -> Address:
    try:
        return parse_address(value, require_ip=True)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _host(value: Any) -> str:
    try:
        return normalize(value)
    except HostNameError as exc:
        raise ValueError(str(exc)) from None


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a CIDR such as \"10.0.0.0/8\"")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR such as \"10.0.0.0/8\" or an address") from None
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped) and net.prefixlen >= 96:
        # Clients are compared as IPv4 once unmapped, so an IPv4-mapped entry is IPv4 too.
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def _at_least_100ms(seconds: float) -> float:
    if seconds < 0.1:
        raise ValueError("must be at least 100ms")
    return seconds


# Every duration key is one of these, so that what 0 means is decided per key (and written
# in the README): ``Duration`` allows 0 where the key documents 0 as "off"/"at once";
# ``PositiveDuration`` bounds a wait that 0 would turn into an instant failure.
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Size = Annotated[int, BeforeValidator(parse_size)]
RateLimit = Annotated[tuple[int, float], BeforeValidator(parse_rate)]
UpstreamAddress = Annotated[Address, BeforeValidator(_address)]
ListenAddress = Annotated[Address, BeforeValidator(_listen_address)]
HostName = Annotated[str, BeforeValidator(_host)]
Cidr = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_cidr)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


# ---------------------------------------------------------------------------------------------
# The model (DESIGN.md, "Config contract (v1)").


class Listen(_Model):
    address: ListenAddress
    mode: str | None = None  # unix sockets only: octal permission bits of the file
    owner: str | None = None  # unix sockets only: "user" or "user:group"
    # Every connection starts with a PROXY v1/v2 header from a load balancer in
    # trusted_proxies (DESIGN.md "PROXY protocol from a load balancer").
    proxy_protocol: bool = False

    @field_validator("mode")
    @classmethod
    def _octal_mode(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"{v!r} is not an octal file mode such as \"0660\"")
        return v


def _listen_entry(value: Any) -> Any:
    if isinstance(value, str):
        return {"address": value}
    if not isinstance(value, Mapping):
        raise ValueError(f'{value!r}: expected an address string or a table {{ address = "..." }}')
    return value


ListenEntry = Annotated[Listen, BeforeValidator(_listen_entry)]


def _optional_rate(value: Any) -> tuple[int, float] | None:
    """A rate (``parse_rate``), or 0 / "0" for none; the count at most 65535 (iplimits.py
    counts per worker and window in 16 bits)."""
    if value in (0, "0") and not isinstance(value, bool):
        return None
    count, seconds = parse_rate(value)
    if count > 0xFFFF:
        raise ValueError(f"{value!r}: at most 65535 connections per window")
    return count, seconds


def _workers_value(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f'{value!r}: workers is a number >= 1 or "auto"')


class Server(_Model):
    listen: list[ListenEntry] = Field(
        default_factory=lambda: [Listen.model_validate({"address": a})
                                 for a in ("0.0.0.0:443", "[::]:443")],
        min_length=1,
    )
    http_listen: list[ListenEntry] = []
    # Prometheus text at /metrics, served by the master: "127.0.0.1:9109" ("": off).
    metrics_listen: Annotated[Address | None, BeforeValidator(
        lambda v: None if v == "" else _listen_address(v))] = None
    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers_value)] = "auto"
    max_connections: int = Field(default=4096, ge=1)
    max_connections_per_ip: int = Field(default=0, ge=0)  # across all workers (iplimits.py)
    # New connections per address per window, across all workers: "20/s", "100/10s"; "0" off.
    max_connection_rate_per_ip: Annotated[tuple[int, float] | None,
                                          BeforeValidator(_optional_rate)] = None
    client_hello_timeout: PositiveDuration = 10.0
    # A client that has sent nothing this long is taken to wait for the server to speak
    # first, and goes to [default].silent (when that names a block).
    non_tls_timeout: PositiveDuration = 2.0
    handshake_timeout: PositiveDuration = 10.0
    header_timeout: PositiveDuration = 15.0
    keepalive_timeout: Duration = 75.0  # 0: no keep-alive (as nginx's keepalive_timeout 0)
    drain_timeout: Duration = 30.0  # 0: a stop or reload closes open connections at once
    trusted_proxies: list[Cidr] = []
    user: str = ""
    group: str = ""
    state_dir: str = ""
    pid_file: str = "{state_dir}/sniport.pid"
    access_log: str = "stderr"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls_session_tickets: bool = True
    # HTTP/2 (README "HTTP/2"): each limit ends the offending stream or connection.
    http2_max_streams: int = Field(default=100, ge=1, le=2**31 - 1)  # concurrent, per connection
    http2_max_requests: int = Field(default=1000, ge=1)  # streams per connection, then GOAWAY
    http2_max_header_list_size: Size = 24 * 1024  # HTTP/1.1's bound: 8 KiB target + 16 KiB
    http2_max_continuations: int = Field(default=8, ge=0)  # CONTINUATION frames per block
    http2_reset_rate: RateLimit = (200, 10.0)  # RST_STREAM sent or received
    http2_ping_rate: RateLimit = (50, 10.0)
    http2_settings_rate: RateLimit = (50, 10.0)
    http2_max_queued_output: Size = 1024 * 1024  # unread output before the client is cut off


class Block(_Model):
    # Where the block stands in its TOML array, for messages (set by from_dict).
    _index: int = PrivateAttr(default=-1)

    name: str = Field(min_length=1)
    hosts: list[HostName] = Field(min_length=1)
    allow: list[Cidr] = []
    deny: list[Cidr] = []


def _plain_http_upstream(value: Any) -> HttpUpstream | None:
    """``http_upstream``: "HOST:PORT", "http://HOST:PORT" or "unix:/PATH"; "" = none."""
    if value == "" or value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected \"HOST:PORT\" or \"unix:/PATH\"")
    if value.startswith("https://"):
        raise ValueError(f"{value!r}: http_upstream is plain HTTP (\"HOST:PORT\")")
    if is_template(value):
        # Not supported: plain HTTP is routed by its Host header, not by a wildcard's label.
        raise ValueError(f"{value!r}: {PLACEHOLDER} templates are for upstreams, not "
                         "http_upstream (write a fixed HOST:PORT)")
    try:
        return parse_http_upstream(value if value.startswith(("http://", "unix:"))
                                   else f"http://{value}")
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _upstream_entry(value: Any) -> Address | UpstreamTemplate:
    """A passthrough upstream: an address, or a template filled per connection from the
    label its wildcard host matched (``"{label}.lan:443"``, README "Upstreams from the
    name")."""
    if is_template(value):
        try:
            return parse_template(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
    return _address(value)


UpstreamEntry = Annotated[Address | UpstreamTemplate, BeforeValidator(_upstream_entry)]


def _protocol(value: Any) -> Any:
    if value == "http":
        raise ValueError('"http": not supported yet; plaintext HTTP on the TLS port is '
                         'answered by [default] non_tls = "http" (308 to https://, and a '
                         "passthrough block's http_upstream for its hosts)")
    return value


_NO_HOSTS = object()  # a TLS block without `hosts` (see Passthrough._hosts_required)


def _hosts_given(value: Any) -> Any:
    if value is _NO_HOSTS:
        raise ValueError("required key missing")
    return value


def _alpn_ids(value: list[str]) -> list[str]:
    for proto in value:
        # RFC 7301 section 3.1: a protocol name is 1 to 255 bytes.
        if not 1 <= len(proto) <= 255 or not proto.isascii() or not proto.isprintable():
            # Hellos carry bytes; printable ASCII is what registered names are made of
            # (IANA's ALPN registry) and compares the same however it is decoded.
            raise ValueError(f"{proto!r}: an ALPN protocol name is 1 to 255 printable "
                             "ASCII characters")
        if proto == "acme-tls/1":
            raise ValueError('"acme-tls/1" is not routed by alpn: a hello for a passthrough '
                             "name is relayed whatever its ALPN, and a site's is its ACME "
                             "challenge (DESIGN.md)")
    if len(set(value)) != len(value):
        raise ValueError("an ALPN protocol is listed twice")
    return value


class Passthrough(Block):
    # "tls": matched by the hosts of its ClientHello; "ssh": matched by the client's first
    # bytes (an RFC 4253 identification line), on the same port, and has no hosts.
    protocol: Annotated[Literal["tls", "ssh"], BeforeValidator(_protocol)] = "tls"
    hosts: Annotated[list[HostName], BeforeValidator(_hosts_given)] = []
    # Only hellos that offer one of these (RFC 7301) reach the block; its hosts may then be
    # claimed by other blocks too (routing.py).
    alpn: Annotated[list[str], AfterValidator(_alpn_ids)] = []

    @model_validator(mode="before")
    @classmethod
    def _hosts_required(cls, data: Any) -> Any:
        """`hosts` is required of a TLS block only: reported as missing with the block's
        other problems (a check across keys would run only once the rest is valid)."""
        if isinstance(data, Mapping) and "hosts" not in data \
                and data.get("protocol", "tls") == "tls":
            return {**data, "hosts": _NO_HOSTS}
        return data

    upstreams: list[UpstreamEntry] = Field(min_length=1)
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    connect_timeout: PositiveDuration = 5.0
    idle_timeout: Duration = 3600.0  # 0: no idle limit (a relay closes only when a side does)
    # Plain HTTP for these hosts on http_listen goes here (so the machine behind answers
    # its own HTTP-01 challenges), instead of the 308 to https.
    http_upstream: Annotated[HttpUpstream | None, BeforeValidator(_plain_http_upstream)] = None


class TlsFiles(_Model):
    cert: str = Field(min_length=1)  # PEM: the certificate, then its chain
    key: str = Field(min_length=1)


class StaticHandler(_Model):
    root: str = Field(min_length=1)
    index: list[str] = ["index.html"]
    autoindex: bool = False
    dotfiles: bool = False
    fallback: str = ""  # a URL path under the route, served (200) when nothing else matches
    precompressed: bool = True

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError(f"{v!r}: the fallback is a URL path starting with /")
        return v

    @field_validator("index")
    @classmethod
    def _index(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or "/" in name or name in {".", ".."}:
                raise ValueError(f"{name!r}: an index is a file name, without a slash")
        return v


class RedirectHandler(_Model):
    to: str = Field(min_length=1)
    status: Literal[301, 302, 303, 307, 308] = 308
    keep_path: bool = True

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            urlsplit(v)
        except ValueError as exc:  # e.g. "https://[::1": it would fail every request
            raise ValueError(f"{v!r} is not a valid URL: {exc}") from None
        if any(c in v for c in "\r\n\0"):
            raise ValueError(f"{v!r}: a redirect target may not contain CR, LF or NUL")
        return v


class RespondHandler(_Model):
    status: int = Field(default=200, ge=200, le=599)
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 section 5.6.2 token


def _header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    return name


def _header_value(value: str) -> str:
    # RFC 9110 section 5.5: no CR, LF or NUL in a field value.
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{value!r}: a header value may not contain CR, LF or NUL")
    return value


def _header_map(v: dict[str, str]) -> dict[str, str]:
    for name, value in v.items():
        _header_name(name)
        _header_value(value)
    return v


def _header_names(v: list[str]) -> list[str]:
    return [_header_name(n) for n in v]


HeaderMap = Annotated[dict[str, str], AfterValidator(_header_map)]
HeaderNames = Annotated[list[str], AfterValidator(_header_names)]


def _http_upstream(value: Any) -> HttpUpstream:
    try:
        return parse_http_upstream(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


ProxyUpstream = Annotated[HttpUpstream, BeforeValidator(_http_upstream)]


class HealthCheck(_Model):
    path: str = "/"
    # Ten checks a second per upstream per worker is already a lot; more is a load test.
    interval: Annotated[float, BeforeValidator(parse_duration),
                        AfterValidator(_at_least_100ms)] = 5.0
    timeout: PositiveDuration = 2.0
    expect: int = Field(default=200, ge=100, le=599)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r}: the health check path starts with /")
        return v


class ProxyHandler(_Model):
    upstreams: list[ProxyUpstream] = Field(min_length=1)
    lb: Literal["round_robin", "least_conn"] = "round_robin"
    connect_timeout: PositiveDuration = 5.0
    timeout: PositiveDuration = 60.0  # to the response head
    read_timeout: PositiveDuration = 60.0  # between response body bytes
    idle_timeout: Duration = 3600.0  # upgraded tunnels (WebSocket); 0: no idle limit
    keepalive: int = Field(default=32, ge=0)  # idle connections per upstream per worker
    keepalive_timeout: Duration = 60.0  # 0: no idle connection is kept (as keepalive = 0)
    host: Literal["client", "upstream"] = "client"
    strip_prefix: bool = False
    forwarded: bool = False
    request_headers: HeaderMap = {}
    remove_request_headers: HeaderNames = []
    max_fails: int = Field(default=3, ge=0)  # 0: never marked down by failures
    fail_timeout: PositiveDuration = 10.0
    health: HealthCheck | None = None
    verify: bool = True
    ca: str = ""


class SiteRoute(_Model):
    path: str = Field(min_length=1)
    headers: HeaderMap = {}
    remove_headers: HeaderNames = []
    # None: the handler's default (proxy: no limit, bodies stream to the application; the
    # others take no body: 1 MiB, nginx's client_max_body_size). 0: no limit.
    max_body_size: Size | None = None
    static: StaticHandler | None = None
    redirect: RedirectHandler | None = None
    respond: RespondHandler | None = None
    proxy: ProxyHandler | None = None

    @model_validator(mode="after")
    def _one_handler(self) -> SiteRoute:
        given = [k for k in ("static", "redirect", "respond", "proxy") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("a route needs exactly one of static, redirect, respond, proxy"
                             + (f" (it has {', '.join(given)})" if given else ""))
        return self

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r}: a route path starts with /")
        return v

    @property
    def handler(self) -> StaticHandler | RedirectHandler | RespondHandler | ProxyHandler:
        h = self.static or self.redirect or self.respond or self.proxy
        assert h is not None
        return h


def _tls_kind(value: Any) -> str:
    return "keyword" if isinstance(value, str) else "files"


def _tls_string(value: Any) -> Any:
    if isinstance(value, str) and value not in ("self-signed", "acme"):
        raise ValueError(f'{value!r}: expected "acme", "self-signed" or '
                         '{ cert = "...", key = "..." }')
    return value


TlsSetting = Annotated[
    Annotated[TlsFiles, Tag("files")] | Annotated[Literal["self-signed", "acme"], Tag("keyword")],
    Discriminator(_tls_kind),
    BeforeValidator(_tls_string),
]

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
ACME_CHALLENGES = ("tls-alpn-01", "http-01")


class Acme(_Model):
    """``[acme]``: how certificates for ``tls = "acme"`` sites are obtained (README "ACME")."""

    email: str = ""
    directory: str = LETS_ENCRYPT
    ca: str = ""  # a CA bundle to trust the directory with ("": the system's)
    challenges: list[str] = Field(default=list(ACME_CHALLENGES), min_length=1)
    renew_before: Annotated[float | None, BeforeValidator(
        lambda v: None if v == "" else parse_duration(v))] = None  # None: a third of the life
    storage: str = "{state_dir}/acme"

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        if v and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", v):
            raise ValueError(f"{v!r} is not an email address")
        return v

    @field_validator("directory")
    @classmethod
    def _directory(cls, v: str) -> str:
        if v == "staging":
            return LETS_ENCRYPT_STAGING
        if not v.startswith("https://"):
            raise ValueError(f'{v!r}: an ACME directory is an https:// URL (or "staging")')
        return v

    @field_validator("challenges")
    @classmethod
    def _challenges(cls, v: list[str]) -> list[str]:
        for name in v:
            if name == "dns-01":
                raise ValueError('"dns-01": not supported yet ("tls-alpn-01", "http-01")')
            if name not in ACME_CHALLENGES:
                raise ValueError(f'{name!r}: expected "tls-alpn-01" or "http-01"')
        if len(set(v)) != len(v):
            raise ValueError("a challenge is listed twice")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not v:
            raise ValueError('must not be empty (default "{state_dir}/acme")')
        from sniport.certs.backends import is_redis  # (imported here: no cycle at load)

        if is_redis(v):  # ValueError for another scheme
            from sniport.certs.redis_store import parse_url

            parse_url(v)  # ValueError saying what is wrong
        return v


class Site(Block):
    tls: TlsSetting
    http2: bool = True  # ALPN offers h2 and http/1.1 (false: http/1.1 only)
    error_pages: dict[int, str] = {}
    route: list[SiteRoute] = Field(min_length=1)

    @field_validator("error_pages")
    @classmethod
    def _error_pages(cls, v: dict[int, str]) -> dict[int, str]:
        for status, page in v.items():
            if not 400 <= status <= 599:
                raise ValueError(f"{status}: error pages are for statuses 400-599")
            if not page.startswith("/"):
                raise ValueError(f"{page!r}: an error page is a URL path starting with /")
        return v


class Default(_Model):
    to: str = "reject"
    non_tls: str = "close"  # "close", "http" or "passthrough:NAME"
    silent: str = "close"  # clients silent for non_tls_timeout: "close" or "passthrough:NAME"

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        if v != "reject" and not v.startswith(("site:", "passthrough:")):
            raise ValueError(f"{v!r}: expected \"reject\", \"site:NAME\" or \"passthrough:NAME\"")
        return v

    @field_validator("non_tls")
    @classmethod
    def _non_tls(cls, v: str) -> str:
        if v not in ("close", "http") and not v.startswith("passthrough:"):
            raise ValueError(f"{v!r}: expected \"close\", \"http\" or \"passthrough:NAME\"")
        return v

    @field_validator("silent")
    @classmethod
    def _silent(cls, v: str) -> str:
        if v != "close" and not v.startswith("passthrough:"):
            raise ValueError(f"{v!r}: expected \"close\" or \"passthrough:NAME\"")
        return v


class Config(_Model):
    server: Server = Server()
    passthrough: list[Passthrough] = []
    site: list[Site] = []
    default: Default = Default()
    acme: Acme = Acme()

    def blocks(self) -> list[Block]:
        return [*self.passthrough, *self.site]


# Keys of the contract that this version does not do yet: present in a file, they are refused.
# A path element "*" stands for every entry of an array of tables.
NOT_SUPPORTED_YET: tuple[tuple[str, ...], ...] = ()


# ---------------------------------------------------------------------------------------------
# Problems and loading.


@dataclass(frozen=True)
class Problem:
    file: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.reason}"


class ConfigError(Exception):
    """The config was refused; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = list(problems)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    source: str  # the file it came from, or "<embedded default>"
    warnings: list[Problem] = field(default_factory=list)
    # Sections ("server", "default") that did not validate: their defaults stand in, so
    # checks that read them (log files, users) are skipped rather than run on a guess.
    invalid: frozenset[str] = frozenset()


def load(path: str | Path, listen: Sequence[str] = ()) -> LoadedConfig:
    """The config in ``path``, or ConfigError listing every problem."""
    loaded, problems = parse_file(path, listen)
    if problems:
        raise ConfigError(problems)
    return loaded


def parse_file(path: str | Path, listen: Sequence[str] = ()) -> tuple[LoadedConfig, list[Problem]]:
    """Like ``load``, but returns the problems with what could be validated, so that the
    checks of the files a config names (certificates, logs) still run: ``check`` lists every
    problem in one pass. ``listen`` replaces ``[server] listen`` (``run --listen``)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return _empty(str(path)), [Problem(str(path), "", f"cannot read: {exc.strerror}")]
    except UnicodeDecodeError as exc:
        return _empty(str(path)), [Problem(str(path), "", f"not UTF-8: {exc}")]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return _empty(str(path)), [Problem(str(path), "", f"TOML syntax: {exc}")]
    return parse(with_listen(raw, listen), str(path))


def loads(text: str, source: str) -> LoadedConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(source, "", f"TOML syntax: {exc}")]) from None
    return from_dict(raw, source)


def with_listen(raw: Mapping[str, Any], listen: Sequence[str]) -> Mapping[str, Any]:
    """``raw`` with ``[server] listen`` replaced by ``listen`` (when it is not empty)."""
    if not listen:
        return raw
    server = raw.get("server")
    server = dict(server) if isinstance(server, Mapping) else {}
    server["listen"] = list(listen)
    return {**raw, "server": server}


def _empty(source: str) -> LoadedConfig:
    return LoadedConfig(Config.model_construct(), source)


_SECTIONS: dict[str, type[_Model]] = {"server": Server, "default": Default, "acme": Acme}
_ARRAYS: dict[str, type[_Model]] = {"passthrough": Passthrough, "site": Site}


def from_dict(raw: Mapping[str, Any], source: str) -> LoadedConfig:
    """The validated config, or ConfigError listing every problem."""
    loaded, problems = parse(raw, source)
    if problems:
        raise ConfigError(problems)
    return loaded


def parse(raw: Mapping[str, Any], source: str) -> tuple[LoadedConfig, list[Problem]]:
    """Validate section by section and block by block, so that the checks across blocks
    still run over every block that is valid on its own: one pass reports everything.
    Returns what is valid (sections and blocks that failed are left out) and the problems."""
    problems = [Problem(source, p, "not supported yet") for p in _unsupported_keys(raw)]
    parts: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                problems.append(Problem(source, key, f"must be a table: [{key}]"))
                continue
            model = _validate(_SECTIONS[key], value, (key,), raw, source, problems)
            if model is not None:
                parts[key] = model
        elif key in _ARRAYS:
            if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
                problems.append(Problem(source, key, f"must be an array of tables: [[{key}]]"))
                continue
            items = [_validate(_ARRAYS[key], v, (key, i), raw, source, problems)
                     for i, v in enumerate(value)]
            for i, item in enumerate(items):
                if item is not None:
                    item._index = i
            parts[key] = [m for m in items if m is not None]
        elif (key,) not in NOT_SUPPORTED_YET:  # reported once, as not supported yet
            problems.append(Problem(source, key, "unknown key"))
    config = Config.model_construct(**parts)
    invalid = frozenset(k for k in _SECTIONS if k in raw and k not in parts)
    # Blocks refused above still exist as far as [default] is concerned: no second problem.
    named = {f"{kind}:{b.get('name')}" for kind in _ARRAYS
             for b in _as_list(raw.get(kind)) if isinstance(b, Mapping)}
    problems += [Problem(source, p, r) for p, r in _cross_checks(config, named)]
    return LoadedConfig(config, source, invalid=invalid), _dedupe(problems)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _validate(model: type[_Model], value: Mapping[str, Any], loc: tuple[str | int, ...],
              raw: Mapping[str, Any], source: str, problems: list[Problem]) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors()
        problems.extend(Problem(source, _toml_path((*loc, *e["loc"]), raw), _reason(e))
                        for e in errors)
    # Salvage what is valid: without the keys that failed, the section or block may still
    # validate, and then the files it names (certificates, logs) and the checks across
    # blocks (a name or host used twice) run in this same pass. The problems above stand;
    # a salvaged config is never served.
    if any(not e["loc"] for e in errors):
        return None  # the value as a whole is wrong (not a table)
    bad = {e["loc"][0] for e in errors}
    if not bad.isdisjoint(_REQUIRED_FOR_SALVAGE):
        return None
    kept = {k: v for k, v in value.items() if k not in bad}
    try:
        return model.model_validate(kept)
    except ValidationError:
        return _partial(model, kept)


# Keys without which a block means nothing: a block whose name, hosts, protocol or alpn
# failed is not salvaged (its checks across blocks would only add noise).
_REQUIRED_FOR_SALVAGE = frozenset({"name", "hosts", "protocol", "alpn"})


def _partial(model: type[_Model], kept: Mapping[str, Any]) -> Any:
    """``model`` from the keys that validated, when a required one failed (a site whose
    every route is wrong still has a name, hosts and certificate files to check): each key
    validated on its own, and an empty list standing in for a required list that failed.
    None when another required key is missing."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in kept:
            annotation: Any = info.annotation
            if info.metadata:
                annotation = Annotated.__class_getitem__((annotation, *info.metadata))  # type: ignore[attr-defined]
            try:
                fields[name] = TypeAdapter(annotation).validate_python(kept[name])
            except ValidationError:
                return None
        elif info.is_required():
            if get_origin(info.annotation) is not list:
                return None
            fields[name] = []
    return model.model_construct(**fields)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # An unsupported key that pydantic also rejects as unknown is reported once.
    seen: set[str] = {p.path for p in problems if p.reason == "not supported yet"}
    out = []
    for p in problems:
        if p.reason == "unknown key" and p.path in seen:
            continue
        out.append(p)
    return out


def _unsupported_keys(raw: Mapping[str, Any]) -> Iterable[str]:
    def walk(node: Any, rest: tuple[str, ...], loc: tuple[str | int, ...]) -> Iterable[str]:
        head, tail = rest[0], rest[1:]
        if head == "*":
            if isinstance(node, list):
                for i, item in enumerate(node):
                    yield from walk(item, tail, (*loc, i))
        elif isinstance(node, Mapping) and head in node:
            if tail:
                yield from walk(node[head], tail, (*loc, head))
            else:
                yield _toml_path((*loc, head), raw)

    for key_path in NOT_SUPPORTED_YET:
        yield from walk(raw, key_path, ())


def _toml_path(loc: Sequence[int | str], raw: Mapping[str, Any]) -> str:
    """``('passthrough', 0, 'upstreams', 1)`` -> ``passthrough[0](lan).upstreams[1]``.

    pydantic puts the member of a union (``TlsFiles``, ``literal['auto']``, a tag) into the
    location; those are not TOML keys and are left out: a key is kept when the TOML table has
    it, or when it is the last part (a required key that is missing)."""
    out = ""
    node: Any = raw
    for n, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("name"), str):
                out += f"({node['name']})"
            continue
        last = n == len(loc) - 1
        if isinstance(node, Mapping) and (part in node or last):
            out += f".{part}" if out else part
            node = node.get(part)
        elif not out:
            out = part
    return out


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key missing"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])


def block_path(config: Config, block: Block) -> str:
    kind = "passthrough" if isinstance(block, Passthrough) else "site"
    index = block._index
    if index < 0:  # built in code, not from a file
        blocks: list[Any] = config.passthrough if kind == "passthrough" else config.site
        index = next((i for i, b in enumerate(blocks) if b is block), -1)
    return f"{kind}[{index}]({block.name})"


def _protocol_checks(config: Config) -> Iterable[tuple[str, str]]:
    """A TLS passthrough block is found by its hosts, a protocol block by its first bytes:
    each needs what finds it, and one protocol is one block's."""
    claimed: dict[str, str] = {}
    for block in config.passthrough:
        where = block_path(config, block)
        if block.alpn and block.http_upstream is not None:
            yield (f"{where}.http_upstream", "a block with alpn is found only by TLS hellos "
                   "that offer it: plain HTTP (no ALPN) cannot reach it")
        if block.alpn and block.protocol != "tls":
            yield f"{where}.alpn", f'a protocol = "{block.protocol}" block has no ALPN'
        if block.protocol == "tls":
            if not block.hosts:  # hosts = []
                yield (f"{where}.hosts", "a TLS passthrough block is found by the server "
                       'names of its hosts: list at least one (or set protocol = "ssh")')
            continue
        if block.hosts:
            yield (f"{where}.hosts", f'a protocol = "{block.protocol}" block is found by the '
                   "client's first bytes, not by a server name: remove hosts")
        if block.http_upstream is not None:
            yield (f"{where}.http_upstream", f'a protocol = "{block.protocol}" block has no '
                   "hosts for plain HTTP to be sent by")
        if block.protocol in claimed:
            yield (f"{where}.protocol", f"protocol {block.protocol!r} is already claimed by "
                   f"{claimed[block.protocol]}")
        else:
            claimed[block.protocol] = where
        if config.default.to == f"passthrough:{block.name}":
            yield ("default.to", f"{config.default.to!r} is a protocol = "
                   f'"{block.protocol}" block: TLS connections cannot go there')


def _alpn_of(block: Block) -> list[str]:
    return getattr(block, "alpn", [])


def _cross_checks(config: Config, named: set[str]) -> Iterable[tuple[str, str]]:
    names: dict[str, str] = {}
    hosts: dict[str, str] = {}  # a host's claim by a block without alpn
    by_alpn: dict[tuple[str, str], str] = {}  # (host, ALPN protocol) -> the block's claim
    for block in config.blocks():
        where = block_path(config, block)
        if block.name in names:
            yield f"{where}.name", f"name {block.name!r} is already used by {names[block.name]}"
        else:
            names[block.name] = where
        alpn = _alpn_of(block)
        if getattr(block, "protocol", "tls") != "tls":
            continue  # its hosts are refused on their own (_protocol_checks)
        for i, host in enumerate(block.hosts):
            # A host is one block's, except that blocks with an alpn list may share it with
            # each other and with one block without: the hello's ALPN chooses (routing.py).
            if not alpn:
                if host in hosts:
                    yield (f"{where}.hosts[{i}]",
                           f"host {host!r} is already claimed by {hosts[host]}")
                else:
                    hosts[host] = f"{where}.hosts[{i}]"
                continue
            for proto in alpn:
                if (host, proto) in by_alpn:
                    yield (f"{where}.hosts[{i}]", f"host {host!r} with ALPN {proto!r} is "
                           f"already claimed by {by_alpn[host, proto]}")
                else:
                    by_alpn[host, proto] = f"{where}.hosts[{i}]"
    yield from _protocol_checks(config)
    kinds = {n for n in named if n.startswith("passthrough:")}
    if config.default.to != "reject" and config.default.to not in named:
        yield "default.to", f"{config.default.to!r} names no block of that kind"
    if config.default.non_tls not in ("close", "http") and config.default.non_tls not in kinds:
        yield "default.non_tls", f"{config.default.non_tls!r} names no passthrough block"
    if config.default.silent != "close":
        if config.default.silent not in kinds:
            yield "default.silent", f"{config.default.silent!r} names no passthrough block"
        server = config.server
        if server.non_tls_timeout >= server.client_hello_timeout:
            yield ("server.non_tls_timeout",
                   f"{server.non_tls_timeout:g}s is not shorter than client_hello_timeout "
                   f"({server.client_hello_timeout:g}s): a silent client would be closed "
                   "before it could go to [default].silent")
    for block in config.site:
        where = block_path(config, block)
        paths: dict[str, int] = {}
        for i, route in enumerate(block.route):
            if route.path in paths:
                yield (f"{where}.route[{i}].path",
                       f"{route.path!r} is already the path of route[{paths[route.path]}]")
            paths[route.path] = i
    yield from _acme_checks(config)
    yield from _template_checks(config)
    listen_ports = [e.address for e in config.server.listen]
    for i, entry in enumerate(config.server.http_listen):
        if entry.address in listen_ports and not (isinstance(entry.address, TcpAddress)
                                                  and entry.address.port == 0):
            yield f"server.http_listen[{i}]", f"{entry.address} is also in server.listen"
    metrics_at = config.server.metrics_listen
    any_port = isinstance(metrics_at, TcpAddress) and metrics_at.port == 0
    if metrics_at is not None and not any_port and metrics_at in [
            e.address for e in [*config.server.listen, *config.server.http_listen]]:
        yield "server.metrics_listen", f"{metrics_at} is also a listen or http_listen address"
    listens: dict[Address, str] = {}
    for i, entry in enumerate(config.server.listen):
        where = f"server.listen[{i}]"
        if entry.address in listens and not (isinstance(entry.address, TcpAddress)
                                             and entry.address.port == 0):
            yield where, f"{entry.address} is already listed at {listens[entry.address]}"
        listens[entry.address] = where
        if isinstance(entry.address, TcpAddress) and (entry.mode or entry.owner):
            yield where, "mode and owner apply to unix sockets only"
        if entry.proxy_protocol and isinstance(entry.address, TcpAddress) \
                and not config.server.trusted_proxies:
            yield (f"{where}.proxy_protocol", "needs server.trusted_proxies: the load "
                   "balancers whose PROXY headers are believed (from anyone else the "
                   "connection is closed)")


def _acme_checks(config: Config) -> Iterable[tuple[str, str]]:
    """What cannot work with the challenges ACME has (RFC 8555 section 8; README "ACME")."""
    has_http = bool(config.server.http_listen)
    for block in config.site:
        if block.tls != "acme":
            continue
        where = block_path(config, block)
        for i, host in enumerate(block.hosts):
            if host.startswith("*."):
                # RFC 8555 section 7.1.3: a wildcard is only validated by dns-01.
                yield (f"{where}.hosts[{i}]", f"{host!r}: a wildcard certificate needs the "
                       "dns-01 challenge, which is not supported yet (list the names, or use "
                       "tls = { cert, key })")
        if config.acme.challenges == ["http-01"] and not has_http:
            yield ("acme.challenges", 'only "http-01" is allowed but server.http_listen is '
                   'empty: the CA could not reach this server on port 80')
    for relay in config.passthrough:
        if relay.http_upstream is not None and not has_http:
            yield (f"{block_path(config, relay)}.http_upstream",
                   "needs server.http_listen (plain HTTP is received there)")


def _template_checks(config: Config) -> Iterable[tuple[str, str]]:
    """Upstream templates need a label: only a connection that a wildcard host matched has
    one (README "Upstreams from the name")."""
    defaults = {"to": config.default.to, "non_tls": config.default.non_tls,
                "silent": config.default.silent}
    for relay in config.passthrough:
        templates = [i for i, u in enumerate(relay.upstreams) if isinstance(u, UpstreamTemplate)]
        if not templates:
            continue
        where = block_path(config, relay)
        if relay.protocol != "tls":
            yield (f"{where}.upstreams[{templates[0]}]", f'a protocol = "{relay.protocol}" '
                   "block has no server name to fill an upstream template from")
            continue
        exact = [(i, h) for i, h in enumerate(relay.hosts) if not h.startswith("*.")]
        for i in templates:
            for j, host in exact:
                yield (f"{where}.upstreams[{i}]",
                       f"{str(relay.upstreams[i])!r}: hosts[{j}] {host!r} is an exact name, which "
                       f"has no label to fill {PLACEHOLDER} with (use a wildcard host, or "
                       "a block of its own for exact names)")
        first = str(relay.upstreams[templates[0]])
        for key, target in defaults.items():
            if target == f"passthrough:{relay.name}":
                yield (f"default.{key}",
                       f"{target!r} has an upstream template ({first!r}) that a connection "
                       "without a matching name cannot fill: name a block with fixed upstreams")
