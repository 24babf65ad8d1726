"""What every exchange holds and does, whatever its protocol (contract.py's ``Exchange``).

Job: the per-request state that HTTP/1.1 (``engine.Exchange``) and HTTP/2 (``h2conn.H2Stream``)
share, set in one place, and the two answers that do not depend on the protocol: ``error``
(a short plain-text response, or the honest end once the head is out) and ``fail`` (the
site's error page for the status, once a site has taken the request).

Rules: the protocols own how bytes go out (``respond``, ``abort`` and the rest); this class
only decides what to answer.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sniport.http.contract import ErrorResponder
    from sniport.http.request import Request
    from sniport.metrics import RouteCells

REASONS = {s.value: s.phrase for s in HTTPStatus}


class ExchangeBase:
    __slots__ = (
        "add_headers",
        "close_after",
        "errors",
        "finished",
        "head_sent",
        "is_head",
        "mcells",
        "note",
        "on_abort",
        "on_resume",
        "remove_headers",
        "request",
        "route_name",
        "sent",
        "status",
        "ttfb",
        "upstream",
    )

    def __init__(self, request: Request, close_after: bool) -> None:
        self.request = request
        self.status = 0
        self.sent = 0  # body bytes sent
        self.ttfb = 0.0
        self.head_sent = False
        self.finished = False  # the handler is done
        self.is_head = request.method == "HEAD"
        self.close_after = close_after  # close the connection after this (HTTP/1.1)
        self.note = ""  # a reason for the log, e.g. why a request was refused
        self.upstream = ""  # the proxy's upstream, for the log
        self.route_name = ""
        # The metrics cells of its site and route (http/site.py ``RouteCells``), or None:
        # the plain-HTTP port's requests are not counted per site.
        self.mcells: RouteCells | None = None
        self.add_headers = b""  # pre-encoded "Name: value\r\n" lines of the route
        self.remove_headers: frozenset[bytes] = frozenset()  # lower-case names
        self.errors: ErrorResponder | None = None  # the site's error pages, once routed
        self.on_resume: Callable[[], None] | None = None  # the client can take more
        self.on_abort: Callable[[], None] | None = None  # the client went away

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                block: bytes = b"") -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def error(self, status: int, note: str = "") -> None:
        """A short plain-text error response, or the honest end if the head is out."""
        if note:
            self.note = note
        if self.head_sent:
            self.abort()
            return
        body = f"{status} {REASONS.get(status, '')}\n".encode()
        self.respond(status, [("Content-Type", "text/plain; charset=utf-8")], body)

    def fail(self, status: int, note: str = "") -> None:
        """An error response through the site's error pages (the plain one before a site
        has taken the request), or the honest end if the head is out."""
        if self.errors is not None:
            self.errors.fail(self, status, note)  # type: ignore[arg-type]
        else:
            self.error(status, note)
