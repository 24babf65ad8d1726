"""Handing a passthrough connection from a draining worker to a worker of the new config.

Job: the message format of the control channel between the master and its workers
(a SOCK_SEQPACKET socketpair per worker: one message per datagram, descriptors attached
with SCM_RIGHTS), and the master's one decision: does the new config still route this
connection the same way?

Why: a reload used to cut every passthrough connection at ``drain_timeout`` (a VPN or SSH
session through the port dropped on every certificate renewal). A relay needs only its
two sockets: a worker that drains offers each quiet relay (no bytes held in its pipes) to
the master, which passes the two descriptors to a worker of the new generation when the
new config sends the same name to the same block, to an upstream it still lists, for a
client it still allows. Otherwise the connection stays where it is, bounded by
``drain_timeout`` as before. No worker lingers for the connections that moved.

Messages (JSON): worker -> master ``offer`` (with the two descriptors); master -> old
worker ``taken`` or ``keep``; master -> new worker ``adopt`` (with the descriptors);
master -> worker ``cert`` (a certificate changed: the new one in the one descriptor). TLS
connections (terminated sites, WebSocket tunnels) cannot move: their TLS state lives in
the old process's OpenSSL objects.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from typing import Any

from sniport.config import Block
from sniport.routing import FIRST_BYTES, RouteTable
from sniport.upstream_template import TemplateError, UpstreamTemplate, label_for

MAX_MESSAGE = 4096  # bytes of one message: an offer's fields are a few hundred
DESCRIPTORS = 2  # a relay's client and upstream sockets


@dataclass
class Relayed:
    """What a relay is, apart from its two sockets: enough to route-check it and to carry
    on its one log line in another process."""

    block: str  # the passthrough block's name
    non_tls: bool  # routed by [default].non_tls rather than by name
    sni: str | None
    alpn: list[str]
    hello: int
    route: str  # the route label, as logged
    upstream: str  # the upstream's label, as configured
    peer: Any  # [host, port] or a unix peer name (str)
    ip: str
    listener: str
    up: int  # bytes so far, client -> upstream
    down: int
    age: float  # seconds since the connection arrived
    up_eof: bool  # the client has ended its direction (half-close passed on)
    down_eof: bool
    via: str = ""  # through a PROXY header: the balancer (ConnRecord.via)
    ech: bool = False
    proxy_id: str = ""
    proto: str = ""  # routed by its first bytes (routing.FirstBytes), not TLS


def encode(op: str, ident: int, relayed: Relayed | None = None) -> bytes:
    body: dict[str, Any] = {"op": op, "id": ident}
    if relayed is not None:
        body["relay"] = asdict(relayed)
    return json.dumps(body, separators=(",", ":")).encode()


def encode_cert(key: str) -> bytes:
    """master -> worker ``cert``: the certificate of the source with this key changed
    (certs/slots.py ``source_key``); the one descriptor attached holds the new chain and
    key (net.tls.pem_descriptor)."""
    return json.dumps({"op": "cert", "id": 0, "key": key}).encode()


def cert_key(data: bytes) -> str:
    key = json.loads(data).get("key")
    if not isinstance(key, str):
        raise ValueError("cert message without a key")
    return key


def decode(data: bytes) -> tuple[str, int, Relayed | None]:
    """(op, id, relay or None); ValueError for anything else."""
    body = json.loads(data)
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise ValueError("not a control message")
    relay = body.get("relay")
    return body["op"], int(body.get("id", 0)), Relayed(**relay) if relay else None


def send(sock: socket.socket, message: bytes, fds: list[int] | None = None) -> bool:
    """One message, never blocking; False if it could not be sent (peer gone, full)."""
    try:
        if fds:
            socket.send_fds(sock, [message], fds)
        else:
            sock.send(message)
    except OSError:
        return False
    return True


def receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """The next message and its descriptors; None when there is none now; b"" at EOF."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, DESCRIPTORS)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b"", []
    return data, list(fds)


def routes_the_same(table: RouteTable, upstreams: dict[str, list[str]],
                    relayed: Relayed) -> bool:
    """Whether the new config (``table``; each passthrough block's upstream labels) sends
    this connection where it already goes: the same block, an upstream it still lists, and
    a client its allow/deny lists still let in. Pure."""
    if relayed.proto in FIRST_BYTES:
        route = table.by_first_bytes(relayed.proto)
    else:
        route = table.non_tls() if relayed.non_tls else table.decide(relayed.sni, relayed.alpn)
    if route.kind != "passthrough" or route.block is None or route.block.name != relayed.block:
        return False
    if relayed.upstream not in upstreams.get(relayed.block, []) \
            and not _fills_to(route.block, relayed.upstream, relayed.sni):
        return False
    return route.acl is None or route.acl.permits(relayed.ip)


def _fills_to(block: Block, upstream: str, sni: str | None) -> bool:
    """Whether one of the block's upstream templates (``{label}.lan:443``), as the new
    config parsed them, makes ``upstream`` of this connection's name."""
    templates = [u for u in getattr(block, "upstreams", ()) if isinstance(u, UpstreamTemplate)]
    if not templates:
        return False
    try:
        label = label_for(sni, block.hosts)
        return any(str(t.fill(label)) == upstream for t in templates)
    except TemplateError:
        return False
