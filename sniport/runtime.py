"""The config compiled for serving: route table and per-block runtime data, built once.

Job: everything a worker needs that is derived from the config and costs something to make
(the route table, upstream addresses resolved to socket addresses, one TLS context per
certificate, each site's compiled routes), built at load so that no connection pays for it,
and so that ``check`` and ``run`` fail on exactly the same problems.
"""

from __future__ import annotations

import grp
import os
import pwd
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from sniport.addresses import AddressError
from sniport.config import ConfigError, LoadedConfig, Problem, Site, SiteRoute, block_path
from sniport.http.site import Handler, SiteApp, default_handlers
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


def state_dir(loaded: LoadedConfig) -> Path:
    configured = loaded.config.server.state_dir
    return Path(configured) if configured else default_state_dir()


def build_runtime(loaded: LoadedConfig) -> Runtime:
    config = loaded.config
    source = loaded.source
    problems: list[Problem] = []
    warnings: list[Problem] = list(loaded.warnings)
    passthrough: dict[str, PassthroughRuntime] = {}
    for block in config.passthrough:
        try:
            passthrough[block.name] = PassthroughRuntime.build(block)
        except AddressError as exc:
            problems.append(Problem(source, f"{block_path(config, block)}.upstreams", str(exc)))
    table = RouteTable(config)
    contexts: dict[tuple[str, str], ssl.SSLContext] = {}
    sites: dict[str, SiteRuntime] = {}
    tickets = config.server.tls_session_tickets
    trusted = list(config.server.trusted_proxies)

    def handlers(route: SiteRoute) -> Handler:
        return default_handlers(route, trusted)

    for site in config.site:
        where = block_path(config, site)
        try:
            if site.tls == "self-signed":
                cert, key = self_signed(state_dir(loaded), site.name, list(site.hosts))
            else:
                cert, key = site.tls.cert, site.tls.key
            # One context per certificate: sites sharing a certificate share its context.
            context = contexts.get((cert, key))
            if context is None:
                context = contexts[(cert, key)] = server_context(cert, key, tickets=tickets)
            names = certificate_names(cert)
        except (TlsError, ValueError) as exc:
            problems.append(Problem(source, f"{where}.tls", str(exc)))
            continue
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
        app = SiteApp(site, table, handlers)
        sites[site.name] = SiteRuntime(site, context, app, cert)
    server = config.server
    try:
        if server.user:
            pwd.getpwnam(server.user)
    except KeyError:
        problems.append(Problem(source, "server.user", f"no such user: {server.user!r}"))
    try:
        if server.group:
            grp.getgrnam(server.group)
    except KeyError:
        problems.append(Problem(source, "server.group", f"no such group: {server.group!r}"))
    if problems:
        raise ConfigError(problems)
    return Runtime(loaded, table, passthrough, sites, warnings)
