"""A terminated site: which requests it answers, and which route answers each.

Job: for every request on a connection terminated with this site's certificate, check its
Host (DESIGN.md "Which requests a terminated site answers"), pick the route by longest path
prefix, apply the route's limits and response headers, and call the route's handler.

Rules:
- Host of this site: served. Host of another block: 421 Misdirected Request (RFC 9110
  section 15.5.20), which stops a connection reused for another name from reaching the wrong
  service. Host of no block: served only by the ``[default].to`` site, 421 elsewhere.
  HTTP/1.1 without Host, or with several: 400 (RFC 9112 section 3.2).
- The Host value is validated as a host name before anything looks at it (RFC 9110 section
  7.2, RFC 3986 section 3.2.2; ``hostnames.parse_host_header``): anything else is 400.
- Routes match the normalised path (``wire.httprules.normalize_path``: unreserved escapes
  decoded, dot segments removed, slashes merged; an encoded slash is 400), and that path is
  what handlers, and a proxy's upstream, see: sniport and the application never disagree on
  which path a request names.
- The longest matching prefix wins (like nginx prefix ``location``s); the handler sees the
  path after the prefix.
- Error responses go through the site's ``error_pages`` when one is set for the status.
"""

from __future__ import annotations

from typing import Protocol

from sniport.config import Site, SiteRoute
from sniport.hostnames import HostNameError, parse_host_header
from sniport.http.contract import Exchange, Handler, WorkerHandler
from sniport.http.handlers import Redirect, Respond
from sniport.http.request import BodyTooLarge
from sniport.http.static import StaticFiles
from sniport.metrics import Layout, RouteCells
from sniport.routing import Network, RouteTable
from sniport.wire.httprules import BadPath, normalize_path

HOST_CACHE = 1024
# Routes that take no body (static, redirect, respond) refuse one above this unless their
# max_body_size says otherwise: 413 and close, without reading it (nginx: 1 MiB).
BODYLESS_LIMIT = 1024 * 1024


class CompiledRoute:
    __slots__ = ("add_headers", "handler", "max_body", "mcells", "name", "prefix",
                 "remove_headers")

    def __init__(self, route: SiteRoute, handler: Handler) -> None:
        self.prefix = route.path
        self.name = route.path
        self.handler = handler
        self.mcells: RouteCells | None = None  # set by SiteApp.count_in
        self.add_headers = b"".join(f"{k}: {v}\r\n".encode("latin-1")
                                    for k, v in route.headers.items())
        # A header the route sets replaces the handler's own (Cache-Control, say).
        removed = {n.lower() for n in route.remove_headers} | {k.lower() for k in route.headers}
        self.remove_headers = frozenset(n.encode("latin-1") for n in removed)
        if route.max_body_size is not None:
            self.max_body = route.max_body_size
        else:
            self.max_body = 0 if route.proxy is not None else BODYLESS_LIMIT


class SiteApp:
    def __init__(self, site: Site, table: RouteTable, handler_factory: HandlerFactory) -> None:
        self.site = site
        self.name = site.name
        self._table = table
        self._hosts: dict[bytes, tuple[str, bool]] = {}  # raw Host value -> (name, served)
        self.routes = [CompiledRoute(r, handler_factory(r)) for r in site.route]
        self._routes = sorted(self.routes, key=lambda r: len(r.prefix), reverse=True)
        self._error_pages = dict(site.error_pages)
        self.unrouted: RouteCells | None = None  # requests that reach no route (400, 421...)

    def count_in(self, layout: Layout) -> None:
        """Find this site's metrics cells (once, at load: never per request)."""
        self.unrouted = RouteCells(layout, self.name, "")
        for route in self.routes:
            route.mcells = RouteCells(layout, self.name, route.name)

    def host(self, raw: bytes) -> tuple[str, bool] | None:
        """The name in a Host header value and whether this site serves it, or None for a
        value that is not a host name (cached: the same few values come with every
        request)."""
        known = self._hosts.get(raw)
        if known is None:
            if len(self._hosts) >= HOST_CACHE:
                self._hosts.clear()  # values from the network: bounded
            try:
                name, _ = parse_host_header(raw.decode("latin-1"))
            except HostNameError:
                return None
            known = self._hosts[raw] = (name, self._table.decide(name).block is self.site)
        return known

    def _default_host(self, sni: str | None) -> bytes | None:
        """The Host of a request that has none: the SNI if this site serves it, else the
        site's first name that is not a wildcard."""
        if sni and self._table.decide(sni).block is self.site:
            return sni.lower().rstrip(".").encode("ascii", "replace")
        for name in self.site.hosts:
            if not name.startswith("*."):
                return name.encode("ascii")
        return None

    def match(self, path: str) -> CompiledRoute | None:
        for route in self._routes:
            if path.startswith(route.prefix):
                return route
        return None

    def handle(self, ex: Exchange) -> None:
        req = ex.request
        ex.errors = self
        ex.mcells = self.unrouted
        raw: bytes | None = None
        repeated = False
        for name, value in req.headers:
            if name == b"host":
                repeated = raw is not None
                raw = value
        if repeated or (raw is None and req.version == "1.1"):
            ex.close_after = True
            self.fail(ex, 400, "missing_or_repeated_host")
            return
        if raw is None:
            # HTTP/1.0 may omit Host: the request is for this site's own name (the one
            # the client asked for in its SNI, else the site's first), given to it as its
            # Host so that the rest (421 rule, proxy, logs) sees an ordinary request.
            raw = self._default_host(ex.conn.sni)
            if raw is None:
                ex.close_after = True
                self.fail(ex, 400, "missing_host")
                return
            req.headers.append((b"host", raw))
        known = self.host(raw)
        if known is None:
            ex.close_after = True
            self.fail(ex, 400, "bad_host")
            return
        host, served = known
        req.host = host
        if not served:
            self.fail(ex, 421, f"misdirected: {host}")
            return
        if not req.path.startswith("/"):
            # absolute-form (RFC 9112 section 3.2.2) is for proxies; "*" is OPTIONS only.
            self.fail(ex, 400, "bad_request_target")
            return
        try:
            req.path = normalize_path(req.path)
        except BadPath as exc:
            self.fail(ex, 400, f"bad_path: {exc}")
            return
        route = self.match(req.path)
        if route is None:
            self.fail(ex, 404, "no_route")
            return
        ex.route_name = route.name
        ex.mcells = route.mcells
        ex.add_headers = route.add_headers
        ex.remove_headers = route.remove_headers
        if route.max_body:
            if req.content_length is not None and req.content_length > route.max_body:
                ex.close_after = True  # the body is not read: do not parse it as a request
                self.fail(ex, 413, "body_too_large")
                return
            if req.body is not None:
                req.body.limit = route.max_body
        rest = req.path[len(route.prefix):]
        if req.body is not None and not req.complete and not route.handler.reads_body:
            # The answer waits for the end of a body the handler does not read: a body over
            # the limit is a 413 and a broken one a 400, as for a body that is read.
            req.body.then(lambda: route.handler.handle(ex, rest),
                          lambda exc: self._body_failed(ex, exc))
            return
        route.handler.handle(ex, rest)

    def _body_failed(self, ex: Exchange, exc: Exception) -> None:
        if isinstance(exc, BodyTooLarge) and not ex.head_sent:
            ex.close_after = True
            self.fail(ex, 413, "body_too_large")

    def fail(self, ex: Exchange, status: int, note: str = "") -> None:
        """An error response: the site's error page for ``status`` if it has one."""
        if note:
            ex.note = note
        page = self._error_pages.get(status)
        if page is not None and not ex.head_sent:
            route = self.match(page)
            if route is not None and isinstance(route.handler, StaticFiles):
                saved = ex.add_headers, ex.remove_headers
                ex.add_headers, ex.remove_headers = route.add_headers, route.remove_headers
                if route.handler.serve_path(ex, page[len(route.prefix):], status):
                    return
                ex.add_headers, ex.remove_headers = saved
        ex.error(status)


class HandlerFactory(Protocol):
    def __call__(self, route: SiteRoute) -> Handler: ...


def lifecycle(app: SiteApp) -> list[WorkerHandler]:
    """The handlers with per-worker work to start and stop (proxy pools, health checks)."""
    return [r.handler for r in app.routes if isinstance(r.handler, WorkerHandler)]


def default_handlers(route: SiteRoute, trusted: list[Network] | None = None) -> Handler:
    """The handler for a route's config (static, redirect, respond, proxy)."""
    if route.proxy is not None:
        from sniport.http.proxy import ProxyRoute

        return ProxyRoute(route.proxy, route.path, trusted or [])
    if route.static is not None:
        return StaticFiles(route.static)
    if route.redirect is not None:
        return Redirect(route.redirect)
    if route.respond is not None:
        return Respond(route.respond)
    raise ValueError(f"route {route.path}: no handler")
