"""What sniport knows about one client connection, for its log line at close.

Rules: filled in as the connection goes (hello, route, upstream, byte counts); written once,
by ``Worker.finish``; ``handler`` is whatever owns the socket now, so a stop can abort it.
"""

from __future__ import annotations

from typing import Any, Protocol


class Abortable(Protocol):
    def abort(self, reason: str) -> None: ...


class ConnRecord:
    __slots__ = (
        "alpn",
        "down",
        "handler",
        "hello_size",
        "ip",
        "listener",
        "peer",
        "route",
        "sni",
        "start",
        "up",
        "upstream",
    )

    def __init__(self, peer: Any, ip: str, listener: str, start: float) -> None:
        self.peer = peer  # as accept() returned it
        self.ip = ip  # "" for unix-socket clients
        self.listener = listener
        self.sni: str | None = None
        self.alpn: tuple[str, ...] = ()
        self.hello_size = 0
        self.route = ""
        self.upstream = ""
        self.up = 0  # bytes client -> upstream
        self.down = 0  # bytes upstream -> client
        self.start = start
        self.handler: Abortable | None = None

    @property
    def client(self) -> str:
        if isinstance(self.peer, tuple):
            host = self.peer[0]
            return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"
        return "unix"

    def fields(self, now: float, end: str) -> dict[str, Any]:
        return {
            "client": self.client,
            "listener": self.listener,
            "sni": self.sni,
            "alpn": ",".join(self.alpn),
            "hello": self.hello_size,
            "route": self.route,
            "upstream": self.upstream,
            "up": self.up,
            "down": self.down,
            "duration": round(now - self.start, 3),
            "end": end,
        }
