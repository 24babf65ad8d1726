"""Header rules of the reverse proxy (sans-IO): what the upstream and the client receive.

Job: from the client's request header list build the upstream's, and from the upstream's
response header list build the client's, as lists of (lower-case name, value) byte pairs.

Rules:
- Hop-by-hop fields are not forwarded (RFC 9110 section 7.6.1): Connection and every field
  it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, and Upgrade unless
  the request is an upgrade (then ``Connection: upgrade`` and ``Upgrade`` are sent again).
- The message framing is the proxy's own on each side: Content-Length/Transfer-Encoding are
  set by the caller, never copied blindly.
- X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Real-IP and (when asked) RFC 7239
  Forwarded describe the client. A client without an address (a unix-socket listener) adds
  no hop to X-Forwarded-For and sends no X-Real-IP (an empty value breaks the parsers of
  applications); Forwarded names it ``for=unknown`` (RFC 7239 section 6.3). A client's own
  values are replaced unless the client is a trusted proxy, in which case its
  X-Forwarded-For/Forwarded are appended to and its other values kept.
- The upstream's Server and Date are replaced by sniport's (as nginx does by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
_FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded",
})
_RESPONSE_REPLACED = frozenset({b"server", b"date"})


_NONE: frozenset[bytes] = frozenset()


def connection_listed(headers: Iterable[Header]) -> frozenset[bytes]:
    """The field names that the Connection header lists (RFC 9110 section 7.6.1)."""
    names: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            if names is None:
                names = set()
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return _NONE if names is None else frozenset(names)


def _forwarded_node(ip: str) -> str:
    # RFC 7239 section 6: an IPv6 address is bracketed and the value quoted.
    return f'"[{ip}]"' if ":" in ip else ip


def upstream_request_headers(
    headers: Sequence[Header], *, client_ip: str, trusted: bool, scheme: str,
    host: bytes | None, upgrade: bytes | None, forwarded: bool,
    set_headers: Sequence[Header], remove: frozenset[bytes],
) -> list[Header]:
    """The header list the upstream receives, without framing fields.

    ``host`` is the Host to send (the client's, or the upstream's own); ``upgrade`` is the
    protocol the client asks to switch to, or None.
    """
    listed = connection_listed(headers)
    out: list[Header] = []
    old: dict[bytes, bytes] = {}
    original_host = b""
    for name, value in headers:
        if name == b"host":
            original_host = original_host or value
            continue
        if name in HOP_BY_HOP or name in listed:
            continue
        if name in _FORWARDING:
            if trusted:
                old[name] = old[name] + b", " + value if name in old else value
            continue
        if name == b"expect" or name == b"content-length":
            # Framing is the proxy's own (it sets Content-Length or chunked itself);
            # sniport answers 100-continue itself when it forwards the body.
            continue
        out.append((name, value))
    if host is not None:
        out.insert(0, (b"host", host))
    elif original_host:
        out.insert(0, (b"host", original_host))
    ip = client_ip.encode("latin-1")
    xff = old.get(b"x-forwarded-for")
    if ip or xff:
        out.append((b"x-forwarded-for", xff + b", " + ip if xff and ip else xff or ip))
    out.append((b"x-forwarded-proto", old.get(b"x-forwarded-proto") or scheme.encode()))
    fwd_host = old.get(b"x-forwarded-host") or original_host
    if fwd_host:
        out.append((b"x-forwarded-host", fwd_host))
    real_ip = old.get(b"x-real-ip") or ip
    if real_ip:
        out.append((b"x-real-ip", real_ip))
    if forwarded:
        node = f"for={_forwarded_node(client_ip) if client_ip else 'unknown'};proto={scheme}"
        if original_host:
            node += f';host="{original_host.decode("latin-1")}"'
        prior = old.get(b"forwarded")
        value = node.encode("latin-1")
        out.append((b"forwarded", prior + b", " + value if prior else value))
    if upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    if set_headers:
        replaced = {n for n, _ in set_headers}
        out = [h for h in out if h[0] not in replaced]
        out.extend(set_headers)
    if remove:
        out = [h for h in out if h[0] not in remove]
    return out


def client_response_headers(headers: Sequence[Header], *, upgrade: bool) -> list[Header]:
    """The upstream's response headers the client receives, without framing fields.
    Names keep the upstream's spelling."""
    listed = connection_listed([(n.lower(), v) for n, v in headers if len(n) == 10])
    out: list[Header] = []
    upgrade_value = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"upgrade":
            upgrade_value = value
        if (lower in HOP_BY_HOP or lower in listed or lower in _RESPONSE_REPLACED
                or lower == b"content-length"):
            continue
        out.append((name, value))
    if upgrade and upgrade_value:
        out.append((b"Upgrade", upgrade_value))
        out.append((b"Connection", b"upgrade"))
    return out


def serialize(headers: Iterable[Header]) -> bytes:
    return b"".join([b"%s: %s\r\n" % header for header in headers])
