"""What handlers and the site that routes to them promise each other.

Job: the two small protocols between ``site.py`` (which picks the route) and the handlers
(static, proxy, redirect, respond), so that handlers depend on a promise and not on the
site's class: no import cycle, and a handler can be driven by anything that answers errors.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sniport.http.engine import Exchange


class ErrorResponder(Protocol):
    """The site a handler serves, as far as handlers need it: error responses that go
    through the site's ``error_pages``."""

    def fail(self, ex: Exchange, status: int, note: str = "") -> None: ...


class Handler(Protocol):
    """A route's handler: answers ``ex``; ``rest`` is the path after the route's prefix."""

    def handle(self, ex: Exchange, rest: str, site: ErrorResponder) -> None: ...


class WorkerHandler(Handler, Protocol):
    """A handler with per-worker work: started in each worker, stopped at its end."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def stop(self) -> None: ...
