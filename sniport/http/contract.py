"""The request contract: what handlers see, whatever the protocol (DESIGN.md "Request contract").

Job: the declared protocols between the protocol engines (HTTP/1.1 in ``engine.py``, HTTP/2
in ``h2conn.py``), the site that routes a request (``site.py``) and the handlers that answer
it (static, proxy, redirect, respond). Handlers depend on these promises only: never on a
connection class, never on a capability found by ``hasattr``.

Rules:
- A handler answers through its ``Exchange``: ``respond`` (all at once) or ``start`` (the
  head) + ``send``... + ``end``; ``fail(status)`` is an error response through the site's
  error pages; ``abort`` is the only honest end once the head is out and something broke.
- Backpressure both ways: ``writable`` false means stop sending until ``on_resume``; a
  handler that cannot take more of the request body calls ``pause_body`` (``resume_body``
  later). ``on_abort`` is called when the client goes away before the end.
- ``conn`` holds what is per connection (the loop, the client's address, corking); per
  request state is on the exchange, so that HTTP/2 streams can share one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sniport.http.request import Request
    from sniport.metrics import RouteCells


class Connection(Protocol):
    """What an exchange's connection tells handlers (one for all streams in HTTP/2)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def client(self) -> str:
        """"ip:port" (or "unix")."""
    @property
    def client_ip(self) -> str: ...
    @property
    def scheme(self) -> str:
        """"https", or "http" on http_listen."""
    @property
    def sni(self) -> str | None: ...

    def cork(self) -> None:
        """Hold writes until ``uncork``: what one read produces leaves in one send."""

    def uncork(self) -> None: ...

    def after_feed(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the bytes being parsed now are parsed to their end."""


class Exchange(Protocol):
    """One request and its response."""

    @property
    def conn(self) -> Connection: ...
    @property
    def request(self) -> Request: ...
    @property
    def stream_id(self) -> int:
        """HTTP/2's stream id; 0 on HTTP/1.1."""
    # Set by the engine and read by handlers and the access log:
    status: int
    sent: int  # body bytes sent
    ttfb: float
    head_sent: bool
    finished: bool
    is_head: bool
    # Set by the site and handlers:
    close_after: bool  # close the connection after this response (HTTP/1.1)
    note: str  # a reason for the log
    upstream: str  # the proxy's upstream, for the log
    route_name: str
    mcells: RouteCells | None  # where it is counted (metrics.py), set by the site
    add_headers: bytes  # the route's "Name: value\r\n" lines
    remove_headers: frozenset[bytes]  # lower-case names the route removes
    errors: ErrorResponder | None  # the site's error pages
    on_resume: Callable[[], None] | None  # the client can take more
    on_abort: Callable[[], None] | None  # the client went away

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def writable(self) -> bool: ...

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                block: bytes = b"") -> None:
        """The whole response at once. ``block``: header lines already encoded
        ("Name: value\\r\\n"), for handlers that send the same ones often."""

    def start(self, status: int, headers: list[tuple[str, str]], length: int | None,
              raw: list[tuple[bytes, bytes]] | None = None) -> None:
        """The response head; the body follows with ``send`` and ``end``."""

    def send(self, data: bytes | memoryview) -> None: ...
    def end(self) -> None: ...
    def abort(self) -> None: ...
    def fail(self, status: int, note: str = "") -> None: ...
    def error(self, status: int, note: str = "") -> None:
        """The plain error response, without the site's error pages."""

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...

    def upgrade(self, on_data: Callable[[bytes], None]) -> bytes:
        """After a 101 (HTTP/1.1 only): the client's bytes go to ``on_data``; returns those
        that came after the request head."""


class ErrorResponder(Protocol):
    """The site a request is for, as far as exchanges need it: error responses that go
    through the site's ``error_pages``."""

    def fail(self, ex: Exchange, status: int, note: str = "") -> None: ...


class Handler(Protocol):
    """A route's handler: answers ``ex``; ``rest`` is the path after the route's prefix.
    ``reads_body``: it takes the request body itself (else the site answers only once the
    body has arrived, and drops it)."""

    reads_body: bool

    def handle(self, ex: Exchange, rest: str) -> None: ...


@runtime_checkable
class WorkerHandler(Handler, Protocol):
    """A handler with per-worker work: started in each worker, stopped at its end."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def stop(self) -> None: ...
