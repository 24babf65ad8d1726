"""Small handlers: fixed redirects, fixed answers, and the plain-HTTP port's redirect.

Rules: redirects append the path after the route prefix and the query unless
``keep_path = false``; 308 by default, which keeps the method and body (RFC 9110 section
15.4.9). The plain-HTTP port sends every host of a site to https:// with 308 and answers
404 for any other host: it never serves content in the clear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sniport.config import RedirectHandler, RespondHandler
from sniport.routing import RouteTable

if TYPE_CHECKING:
    from sniport.http.engine import Exchange
    from sniport.http.site import SiteApp


class Redirect:
    def __init__(self, cfg: RedirectHandler) -> None:
        self.to = cfg.to
        self.status = cfg.status
        self.keep_path = cfg.keep_path

    def handle(self, ex: Exchange, rest: str, app: SiteApp) -> None:
        location = self.to
        if self.keep_path:
            query = ex.request.query
            location += rest + (f"?{query}" if query else "")
        ex.respond(self.status, [("Location", location),
                                 ("Content-Type", "text/plain; charset=utf-8")],
                   f"{self.status} -> {location}\n".encode())


class Respond:
    def __init__(self, cfg: RespondHandler) -> None:
        self.status = cfg.status
        self.headers = [("Content-Type", cfg.content_type)] if cfg.body else []
        self.body = cfg.body.encode()

    def handle(self, ex: Exchange, rest: str, app: SiteApp) -> None:
        ex.respond(self.status, self.headers, self.body)


class HttpsRedirectApp:
    """The ``http_listen`` ports: 308 to https:// for the hosts of sites, 404 otherwise."""

    def __init__(self, table: RouteTable, https_port: int | None) -> None:
        self._table = table
        self._port = "" if https_port in (None, 443) else f":{https_port}"

    def handle(self, ex: Exchange) -> None:
        from sniport.http.site import host_of

        req = ex.request
        raw = req.header(b"host")
        host = host_of(raw) if raw else ""
        route = self._table.decide(host) if host else None
        if route is None or route.kind != "terminate" or route.rule not in ("exact", "wildcard"):
            ex.error(404, "not_a_site_host")
            return
        location = f"https://{host}{self._port}{req.target if req.target.startswith('/') else '/'}"
        ex.respond(308, [("Location", location), ("Content-Type", "text/plain; charset=utf-8")],
                   f"308 -> {location}\n".encode())
