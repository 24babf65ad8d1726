"""Small handlers: fixed redirects, fixed answers, and the plain-HTTP port's redirect.

Rules: redirects put the path after the route prefix under ``to``'s path, and join the
queries, unless ``keep_path = false``; the URL is built from its parts
(``wire.httprules.redirect_target``), so nothing a client sends can change where it points.
308 by default, which keeps the method and body (RFC 9110 section 15.4.9). The plain-HTTP
port sends every host of a site to https:// with 308 and answers 404 for any other host
(400 for a Host that is not a host name): it never serves content in the clear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sniport.config import RedirectHandler, RespondHandler
from sniport.hostnames import HostNameError, parse_host_header
from sniport.routing import RouteTable
from sniport.wire.httprules import BadPath, normalize_path, redirect_target

if TYPE_CHECKING:
    from sniport.http.contract import Exchange


class Redirect:
    reads_body = False

    def __init__(self, cfg: RedirectHandler) -> None:
        self.to = cfg.to
        self.status = cfg.status
        self.keep_path = cfg.keep_path

    def handle(self, ex: Exchange, rest: str) -> None:
        location = redirect_target(self.to, rest, ex.request.query, self.keep_path)
        ex.respond(self.status, [("Location", location),
                                 ("Content-Type", "text/plain; charset=utf-8")],
                   f"{self.status} -> {location}\n".encode())


class Respond:
    reads_body = False

    def __init__(self, cfg: RespondHandler) -> None:
        self.status = cfg.status
        self.headers = [("Content-Type", cfg.content_type)] if cfg.body else []
        self.body = cfg.body.encode()

    def handle(self, ex: Exchange, rest: str) -> None:
        ex.respond(self.status, self.headers, self.body)


class HttpsRedirectApp:
    """The ``http_listen`` ports: 308 to https:// for the hosts of sites, 404 otherwise."""

    def __init__(self, table: RouteTable, https_port: int | None) -> None:
        self._table = table
        self._port = "" if https_port in (None, 443) else f":{https_port}"

    def handle(self, ex: Exchange) -> None:
        req = ex.request
        raw = req.header(b"host")
        try:
            host = parse_host_header(raw)[0] if raw else ""
            path = normalize_path(req.path) if req.path.startswith("/") else "/"
        except (HostNameError, BadPath):
            ex.close_after = True
            ex.error(400, "bad_host_or_path")
            return
        route = self._table.decide(host) if host else None
        if route is None or route.kind != "terminate" or route.rule not in ("exact", "wildcard"):
            ex.error(404, "not_a_site_host")
            return
        location = redirect_target(f"https://{host}{self._port}", path, req.query, True)
        ex.respond(308, [("Location", location), ("Content-Type", "text/plain; charset=utf-8")],
                   f"308 -> {location}\n".encode())
