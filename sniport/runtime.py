"""The config compiled for serving: route table and per-block runtime data, built once.

Job: everything a worker needs that is derived from the config and costs something to make
(the route table, upstream addresses resolved to socket addresses, one TLS context per
certificate, each site's compiled routes, the access log), built at load so that no
connection pays for it, and so that ``check``, ``run`` and a reload fail on exactly the same
problems (DESIGN.md "Operations contract": a reload is a promise).

Rules:
- One pass lists every problem: the files a config names (certificates, keys, the access
  log) are checked for every block that validated, even when other parts of the config did
  not, and their problems join the config's own.
- ``check_only`` changes nothing on disk that a run would not also need (it still makes a
  self-signed certificate, which a run reuses) and opens nothing it keeps; a run or a reload
  opens the access log here, so that a log it cannot open is a problem line, never a crash.
- A bug while checking one part is a problem line naming that part, not a traceback.
"""

from __future__ import annotations

import grp
import os
import pwd
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sniport.addresses import AddressError
from sniport.config import ConfigError, LoadedConfig, Problem, Site, SiteRoute, block_path
from sniport.http.contract import Handler
from sniport.http.site import SiteApp, default_handlers
from sniport.logs import AccessLog, LogFileError, check_access_log, open_access_log
from sniport.net.passthrough import PassthroughRuntime
from sniport.net.tls import (
    TlsError,
    certificate_names,
    covers,
    default_state_dir,
    self_signed,
    server_context,
)
from sniport.routing import RouteTable
from sniport.wire.httprules import redirect_warnings


@dataclass(frozen=True)
class SiteRuntime:
    site: Site
    context: ssl.SSLContext
    app: SiteApp
    cert: str


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedConfig
    table: RouteTable
    passthrough: dict[str, PassthroughRuntime]
    sites: dict[str, SiteRuntime]
    warnings: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a run will do (check prints them)
    access_log: AccessLog | None = None  # opened for a run or reload; None for check

    def close(self) -> None:
        """Release what the build opened (a reload that is given up, a generation gone)."""
        if self.access_log is not None:
            self.access_log.close()


def state_dir(loaded: LoadedConfig) -> Path:
    configured = loaded.config.server.state_dir
    return Path(configured) if configured else default_state_dir()


def build_runtime(loaded: LoadedConfig, problems: Sequence[Problem] = (), *,
                  check_only: bool = False) -> Runtime:
    """The runtime of ``loaded``, or ConfigError listing ``problems`` (those the config
    loader found) together with every problem found here."""
    config = loaded.config
    source = loaded.source
    found: list[Problem] = list(problems)
    warnings: list[Problem] = list(loaded.warnings)
    notes: list[str] = []

    def problem(path: str, reason: str) -> None:
        found.append(Problem(source, path, reason))

    passthrough: dict[str, PassthroughRuntime] = {}
    for block in config.passthrough:
        try:
            passthrough[block.name] = PassthroughRuntime.build(block)
        except AddressError as exc:
            problem(f"{block_path(config, block)}.upstreams", str(exc))
    contexts: dict[tuple[str, str, bool], ssl.SSLContext] = {}
    site_tls: dict[str, tuple[ssl.SSLContext, str]] = {}
    tickets = config.server.tls_session_tickets
    for site in config.site:
        where = block_path(config, site)
        try:
            if site.tls == "self-signed":
                cert, key = self_signed(state_dir(loaded), site.name, list(site.hosts))
            else:
                cert, key = site.tls.cert, site.tls.key
            # One context per certificate (and ALPN list): sites sharing them share it.
            context = contexts.get((cert, key, site.http2))
            if context is None:
                context = contexts[(cert, key, site.http2)] = server_context(
                    cert, key, tickets=tickets, http2=site.http2)
            names = certificate_names(cert)
        except TlsError as exc:
            problem(f"{where}.tls", str(exc))
            continue
        except Exception as exc:  # a bug must be a problem line, not a traceback
            problem(f"{where}.tls", f"unexpected {type(exc).__name__}: {exc}")
            continue
        site_tls[site.name] = (context, cert)
        for i, host in enumerate(site.hosts):
            if not covers(names, host):
                warnings.append(Problem(source, f"{where}.hosts[{i}]",
                                        f"the certificate {cert} does not cover {host!r} "
                                        f"(it names {', '.join(names) or 'nothing'})"))
        for i, route in enumerate(site.route):
            if route.static is not None and not os.path.isdir(route.static.root):
                warnings.append(Problem(source, f"{where}.route[{i}].static.root",
                                        f"{route.static.root!r} is not a directory "
                                        "(requests will get 404)"))
            if route.redirect is not None:
                warnings += [Problem(source, f"{where}.route[{i}].redirect.to", text)
                             for text in redirect_warnings(route.redirect.to)]
    trusted = list(config.server.trusted_proxies)
    handlers: dict[int, Handler] = {}  # id(route) -> its handler
    for site in config.site:
        if site.name not in site_tls:
            continue
        for i, route in enumerate(site.route):
            try:
                handlers[id(route)] = default_handlers(route, trusted)
            except (OSError, ssl.SSLError, ValueError) as exc:
                # e.g. a proxy's `ca` bundle that cannot be read or parsed
                key = "proxy.ca" if route.proxy is not None and route.proxy.ca else "proxy"
                problem(f"{block_path(config, site)}.route[{i}].{key}",
                        f"cannot be set up: {getattr(exc, 'strerror', None) or exc}")
    access_log: AccessLog | None = None
    if "server" not in loaded.invalid:
        server = config.server
        if server.user:
            try:
                pwd.getpwnam(server.user)
            except KeyError:
                problem("server.user", f"no such user: {server.user!r}")
        if server.group:
            try:
                grp.getgrnam(server.group)
            except KeyError:
                problem("server.group", f"no such group: {server.group!r}")
        try:
            if check_only:
                note = check_access_log(server.access_log)
                if note:
                    notes.append(f"access log {server.access_log}: {note}")
            elif not found:  # opened last: nothing to close if something else failed
                access_log = open_access_log(server.access_log, server.log_format)
        except LogFileError as exc:
            problem("server.access_log", str(exc))
    if found:
        raise ConfigError(found)

    def handler(route: SiteRoute) -> Handler:
        return handlers[id(route)]

    table = RouteTable(config)
    sites = {}
    for site in config.site:
        context, cert = site_tls[site.name]
        sites[site.name] = SiteRuntime(site, context, SiteApp(site, table, handler), cert)
    return Runtime(loaded, table, passthrough, sites, warnings, notes, access_log)
