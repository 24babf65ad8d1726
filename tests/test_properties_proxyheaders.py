"""Properties of upstream_request_headers (sniport/wire/proxyheaders.py): what the upstream
of a proxy route receives from any client header list.

RFC 9110 section 7.6.1: hop-by-hop fields, and every field the Connection header lists, are
not forwarded. X-Forwarded-For and the other forwarding fields describe the client: a
client's own values are replaced, unless the client is a trusted proxy, whose
X-Forwarded-For (and RFC 7239 Forwarded) is appended to.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire.proxyheaders import HOP_BY_HOP, Header, upstream_request_headers

# No deadline: the machine is shared, and timing is not what these properties are about.
PROPS = settings(deadline=None, max_examples=200)

FORWARDING = [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip",
              b"forwarded"]
# What sniport writes itself, whatever the client sent.
OWN = {b"host", b"connection", b"upgrade", *FORWARDING}
ORDINARY = [b"accept", b"cookie", b"user-agent", b"x-a", b"x-b", b"authorization",
            b"content-type", b"if-none-match"]
# Not Host: a request with several is refused (400) before it reaches the proxy, so a
# generated list has at most one, added below.
NAMES = [*sorted(HOP_BY_HOP), *FORWARDING, *ORDINARY, b"content-length", b"expect"]
VALUES = st.one_of(st.sampled_from([b"1", b"10.0.0.1", b"evil", b"a, b", b"", b"close"]),
                   st.binary(max_size=8).filter(lambda v: b"," not in v))


@st.composite
def connection_value(draw: st.DrawFn) -> bytes:
    """A Connection value listing names, in any case and spacing (RFC 9110 section 7.6.1)."""
    listed = draw(st.lists(st.sampled_from([*NAMES, b"host", b"close"]),
                           max_size=4))
    spelt = [draw(st.sampled_from([n, n.upper(), n.title(), b" " + n + b" "])) for n in listed]
    return draw(st.sampled_from([b",", b", ", b" ,"])).join(spelt)


@st.composite
def client_headers(draw: st.DrawFn) -> list[Header]:
    """A request's header list as the engine gives it: names in lower case, one Host or
    none."""
    headers: list[Header] = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(NAMES))
        value = draw(connection_value()) if name == b"connection" else draw(VALUES)
        headers.append((name, value))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"host", b"app.example"))
    return headers


def _listed(headers: list[Header]) -> set[bytes]:
    """The names the Connection fields list, parsed here independently of proxyheaders."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names |= {t.strip().lower() for t in value.split(b",")} - {b""}
    return names


CLIENTS = st.sampled_from(["192.0.2.7", "2001:db8::7", "10.0.0.1"])
SCHEMES = st.sampled_from(["https", "http"])
UPGRADES = st.one_of(st.none(), st.sampled_from([b"websocket", b"h2c"]))


@PROPS
@given(client_headers(), CLIENTS, st.booleans(), SCHEMES, UPGRADES, st.booleans())
def test_hop_by_hop_and_connection_listed_fields_never_reach_the_upstream(
        headers: list[Header], ip: str, trusted: bool, scheme: str, upgrade: bytes | None,
        forwarded: bool) -> None:
    out = upstream_request_headers(headers, client_ip=ip, trusted=trusted, scheme=scheme,
                                   host=None, upgrade=upgrade, forwarded=forwarded,
                                   set_headers=[], remove=frozenset())
    names = [n for n, _ in out]
    for name in HOP_BY_HOP - {b"connection", b"upgrade"}:
        assert name not in names
    # Connection and Upgrade only as sniport's own, for an upgrade it forwards.
    if upgrade is None:
        assert b"connection" not in names and b"upgrade" not in names
    else:
        assert [h for h in out if h[0] in (b"connection", b"upgrade")] == [
            (b"connection", b"upgrade"), (b"upgrade", upgrade)]
    for name in _listed(headers) - OWN:
        assert name not in names, name
    # Framing is the proxy's own (the caller adds it); Expect is answered by sniport.
    assert b"content-length" not in names and b"expect" not in names
    # Everything else the client sent arrives, in order.
    kept = [h for h in headers
            if h[0] not in OWN and h[0] not in HOP_BY_HOP and h[0] not in _listed(headers)
            and h[0] not in (b"content-length", b"expect")]
    assert [h for h in out if h[0] not in OWN] == kept


@PROPS
@given(client_headers(), CLIENTS, SCHEMES, st.booleans())
def test_an_untrusted_clients_forwarding_fields_are_replaced(
        headers: list[Header], ip: str, scheme: str, forwarded: bool) -> None:
    out = upstream_request_headers(headers, client_ip=ip, trusted=False, scheme=scheme,
                                   host=None, upgrade=None, forwarded=forwarded,
                                   set_headers=[], remove=frozenset())
    fields = {name: [v for n, v in out if n == name] for name in FORWARDING}
    client_ip = ip.encode()
    assert fields[b"x-forwarded-for"] == [client_ip]
    assert fields[b"x-real-ip"] == [client_ip]
    assert fields[b"x-forwarded-proto"] == [scheme.encode()]
    host = next((v for n, v in headers if n == b"host"), None)
    assert fields[b"x-forwarded-host"] == ([host] if host else [])
    if forwarded:
        node = f'"[{ip}]"' if ":" in ip else ip
        expected = f"for={node};proto={scheme}" + (f';host="{host.decode()}"' if host else "")
        assert fields[b"forwarded"] == [expected.encode()]
    else:
        assert fields[b"forwarded"] == []


@PROPS
@given(client_headers(), CLIENTS, SCHEMES, st.booleans())
def test_a_trusted_proxys_forwarding_chain_is_appended_to(
        headers: list[Header], ip: str, scheme: str, forwarded: bool) -> None:
    out = upstream_request_headers(headers, client_ip=ip, trusted=True, scheme=scheme,
                                   host=None, upgrade=None, forwarded=forwarded,
                                   set_headers=[], remove=frozenset())
    listed = _listed(headers)
    xff = [v for n, v in out if n == b"x-forwarded-for"]
    assert len(xff) == 1  # one field: the chain is a single list
    prior = [v for n, v in headers if n == b"x-forwarded-for"]
    if b"x-forwarded-for" in listed:
        prior = []  # a field the client's Connection lists is hop-by-hop: dropped
    if prior and b", ".join(prior):
        assert xff[0] == b", ".join([*prior, ip.encode()])
    else:
        assert xff[0] == ip.encode()
    assert xff[0].endswith(ip.encode())  # the address sniport saw is always the last hop
    fwd = [v for n, v in out if n == b"forwarded"]
    if forwarded:
        assert len(fwd) == 1
        assert fwd[0].split(b", ")[-1].startswith(b"for=")
    else:
        assert fwd == []


@PROPS
@given(client_headers(), st.booleans(),
       st.lists(st.tuples(st.sampled_from([*ORDINARY, b"x-forwarded-proto"]), VALUES),
                max_size=3),
       st.frozensets(st.sampled_from(ORDINARY + FORWARDING), max_size=3))
def test_configured_fields_are_set_and_removed_last(
        headers: list[Header], trusted: bool, set_headers: list[Header],
        remove: frozenset[bytes]) -> None:
    out = upstream_request_headers(headers, client_ip="192.0.2.7", trusted=trusted,
                                   scheme="https", host=b"upstream.internal", upgrade=None,
                                   forwarded=False, set_headers=set_headers, remove=remove)
    names = [n for n, _ in out]
    assert not remove & set(names)
    # request_headers replaces any field of that name, the client's and sniport's alike.
    for name in {n for n, _ in set_headers} - remove:
        assert [h for h in out if h[0] == name] == [h for h in set_headers if h[0] == name]
    # host = "upstream": the upstream's own authority, once, first.
    if b"host" not in remove:
        assert out[0] == (b"host", b"upstream.internal")
        assert names.count(b"host") == 1
