"""Small handlers: fixed redirects, fixed answers, and the plain-HTTP port's redirect.

Rules: redirects put the path after the route prefix under ``to``'s path, and join the
queries, unless ``keep_path = false``; the URL is built from its parts
(``wire.httprules.redirect_target``), so nothing a client sends can change where it points.
308 by default, which keeps the method and body (RFC 9110 section 15.4.9). The plain-HTTP
port sends every host of a site to https:// with 308 and answers 404 for any other host
(400 for a Host that is not a host name): it never serves content in the clear.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sniport.config import RedirectHandler, RespondHandler
from sniport.hostnames import HostNameError, parse_host_header
from sniport.routing import RouteTable
from sniport.wire.acme import HTTP01_PREFIX
from sniport.wire.httprules import BadPath, normalize_path, redirect_target

if TYPE_CHECKING:
    from sniport.certs.challenges import ChallengeAnswers
    from sniport.http.contract import Exchange, Handler


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
    """The ``http_listen`` ports: 308 to https:// for the hosts of sites, 404 otherwise;
    ACME HTTP-01 answers for the sites' names (RFC 8555 section 8.3) before the redirect,
    and a passthrough block's hosts forwarded to its ``http_upstream`` when it has one (so
    the machine behind answers its own HTTP-01)."""

    def __init__(self, table: RouteTable, https_port: int | None,
                 answers: ChallengeAnswers | None = None,
                 forward: Mapping[str, Handler] | None = None) -> None:
        self._table = table
        self._port = "" if https_port in (None, 443) else f":{https_port}"
        self._answers = answers
        self._forward = dict(forward or {})

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
        named = route is not None and route.rule in ("exact", "wildcard")
        if named and route is not None and route.kind == "passthrough" and route.block \
                and (forward := self._forward.get(route.block.name)) is not None:
            # The block's allow/deny lists hold here as on the TLS port, except for the
            # machine's own HTTP-01 answers (the CA validates from anywhere).
            if route.acl is not None and not route.acl.permits(ex.conn.client_ip) \
                    and not path.startswith(HTTP01_PREFIX):
                ex.error(403, "denied")
                return
            req.path = path  # normalised, as a site's proxy sends it
            ex.route_name = "http_upstream"
            forward.handle(ex, path)
            return
        if route is None or route.kind != "terminate" or not named:
            ex.error(404, "not_a_site_host")
            return
        # Only ACME sites' names: a site with certificate files may be renewed by another
        # client (certbot --webroot) that the CA reaches through the redirect.
        if self._answers is not None and path.startswith(HTTP01_PREFIX) \
                and getattr(route.block, "tls", None) == "acme":
            # Looked up in the storage (a file, or Redis): the answer comes asynchronously.
            task = asyncio.ensure_future(_answer_http01(
                ex, self._answers, path[len(HTTP01_PREFIX):]))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)
            return
        location = redirect_target(f"https://{host}{self._port}", path, req.query, True)
        ex.respond(308, [("Location", location), ("Content-Type", "text/plain; charset=utf-8")],
                   f"308 -> {location}\n".encode())


_PENDING: set[asyncio.Future[None]] = set()  # the answers being looked up (kept referenced)


async def _answer_http01(ex: Exchange, answers: ChallengeAnswers, token: str) -> None:
    """RFC 8555 section 8.3: the key authorization, as text; 404 for a token not pending."""
    try:
        key_auth = await answers.http01(token)
    except Exception as exc:  # a bug must cost this answer, never the worker
        ex.error(500, f"acme_challenge_error: {type(exc).__name__}")
        return
    if ex.finished:
        return  # the client went away meanwhile
    if key_auth is None:
        ex.error(404, "acme_challenge_unknown")
        return
    ex.note = "acme_http_01"
    ex.respond(200, [("Content-Type", "text/plain")], key_auth.encode("ascii"))
