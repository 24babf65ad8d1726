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
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from sniport.addresses import AddressError
from sniport.certs.acme_service import AcmeSettings, ManagedCert
from sniport.certs.backends import is_redis, open_storage
from sniport.certs.directory import DirectoryStorage
from sniport.certs.slots import CertSlot, acme_source, file_source
from sniport.certs.storage import StorageError
from sniport.certs.watch import file_version
from sniport.config import (
    Config,
    ConfigError,
    LoadedConfig,
    Problem,
    Site,
    SiteRoute,
    TlsFiles,
    block_path,
)
from sniport.http.contract import Handler
from sniport.http.proxy import ProxyRoute
from sniport.http.site import SiteApp, default_handlers
from sniport.logs import AccessLog, LogFileError, check_access_log, open_access_log
from sniport.metrics import Layout
from sniport.net.passthrough import PassthroughRuntime
from sniport.net.tls import (
    CertInfo,
    TlsError,
    cert_info,
    check_pair,
    context_from_pem,
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
    slot: CertSlot  # the certificate it serves; swapped in place (certs/slots.py)
    app: SiteApp

    @property
    def context(self) -> ssl.SSLContext:
        return self.slot.context

    @property
    def acme(self) -> bool:
        return self.site.tls == "acme"


@dataclass(frozen=True)
class FileWatch:
    """A certificate from files that the master watches (certs/watch.py)."""

    source: str
    cert: str
    key: str


@dataclass(frozen=True)
class AcmePlan:
    """What the ACME service is to do for this config (certs/acme_service.py)."""

    settings: AcmeSettings
    storage: str  # the directory
    certs: tuple[ManagedCert, ...]


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedConfig
    table: RouteTable
    passthrough: dict[str, PassthroughRuntime]
    sites: dict[str, SiteRuntime]
    warnings: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a run will do (check prints them)
    access_log: AccessLog | None = None  # opened for a run or reload; None for check
    slots: list[CertSlot] = field(default_factory=list)  # each certificate served, once
    file_watches: list[FileWatch] = field(default_factory=list)
    acme: AcmePlan | None = None  # None: no site says tls = "acme"
    layout: Layout = field(default_factory=Layout)  # the series its workers count (metrics.py)

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
    site_tls: dict[str, CertSlot] = {}
    certs = _Certificates(loaded, check_only, notes)
    acme_ok = certs.acme_storage_ready(
        problem, lambda path, reason: warnings.append(Problem(source, path, reason)))
    for site in config.site:
        where = block_path(config, site)
        try:
            slot = certs.slot_for(site, acme_ok)
        except TlsError as exc:
            problem(f"{where}.tls", str(exc))
            continue
        except Exception as exc:  # a bug must be a problem line, not a traceback
            problem(f"{where}.tls", f"unexpected {type(exc).__name__}: {exc}")
            continue
        site_tls[site.name] = slot
        names = slot.info.names if slot.info is not None else []
        for i, host in enumerate(site.hosts):
            if not slot.temporary and not covers(names, host):
                warnings.append(Problem(source, f"{where}.hosts[{i}]",
                                        f"the certificate {certs.label(site)} does not cover "
                                        f"{host!r} (it names {', '.join(names) or 'nothing'})"))
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
        certs.close()
        raise ConfigError(found)

    def handler(route: SiteRoute) -> Handler:
        return handlers[id(route)]

    table = RouteTable(config)
    sites = {}
    for site in config.site:
        slot = site_tls[site.name]
        slot.hosts.extend(h for h in site.hosts if h not in slot.hosts)
        sites[site.name] = SiteRuntime(site, slot, SiteApp(site, table, handler))
    certs.close()  # its Redis connection, if any: not to be inherited by every worker
    layout = metrics_layout(config, passthrough, handlers.values())
    for site_rt in sites.values():
        site_rt.app.count_in(layout)
    return Runtime(loaded, table, passthrough, sites, warnings, notes, access_log,
                   certs.slots(), certs.watches(), certs.acme_plan(), layout)


def metrics_layout(config: Config, passthrough: dict[str, PassthroughRuntime],
                   handlers: Iterable[Handler]) -> Layout:
    """Every series this config can count (metrics.py): labels from config names only."""
    upstreams = [label for rt in passthrough.values() for label in rt.upstream_labels]
    for handler in handlers:
        if isinstance(handler, ProxyRoute):
            upstreams += [u.label for u in handler.upstreams]
    return Layout(
        listeners=[str(e.address) for e in config.server.listen],
        passthrough_blocks=[b.name for b in config.passthrough],
        sites=[s.name for s in config.site],
        routes=[(s.name, path) for s in config.site for path in ("", *(r.path for r in s.route))],
        upstreams=upstreams)


class _Certificates:
    """The certificate of each site, loaded once per source and ALPN list: from files, from
    the ACME storage (or a temporary self-signed one until ACME has obtained it), or
    self-signed."""

    def __init__(self, loaded: LoadedConfig, check_only: bool, notes: list[str]) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.check_only = check_only
        self.notes = notes
        self.tickets = self.config.server.tls_session_tickets
        self._slots: dict[tuple[str, bool], CertSlot] = {}
        self._watches: dict[str, FileWatch] = {}
        self._acme_sites: list[Site] = [s for s in self.config.site if s.tls == "acme"]
        acme = self.config.acme
        # A directory (the default) or a Redis URL shared by several instances.
        self.storage_setting = acme.storage.replace("{state_dir}", str(state_dir(loaded)))
        self.storage = open_storage(self.storage_setting)
        self.shared = is_redis(self.storage_setting)
        self.storage_path = self.storage.description

    def close(self) -> None:
        self.storage.close()

    def label(self, site: Site) -> str:
        if isinstance(site.tls, TlsFiles):
            return site.tls.cert
        return f"({site.tls})"

    def acme_storage_ready(self, problem: Callable[[str, str], None],
                           warn: Callable[[str, str], None]) -> bool:
        """The ACME storage can be used (``check`` says so when it cannot). A shared storage
        that cannot be reached now is a warning, not a refusal: the instance serves what it
        has (a reload keeps the certificates it serves) and the watcher and the ACME
        service retry; a restart must not depend on Redis being up."""
        if not self._acme_sites:
            return False
        why = self.storage.problem()
        if why and self.shared:
            warn("acme.storage", f"{why}; certificates are served from what this instance "
                 "has until it can be reached (retried every few seconds)")
            return False
        if why:
            problem("acme.storage", why)
            return False
        ca = self.config.acme.ca
        if ca:
            try:
                ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                problem("acme.ca", f"cannot be used to trust the ACME directory: "
                        f"{getattr(exc, 'strerror', None) or exc}")
        if not isinstance(self.storage, DirectoryStorage):
            return True
        if not self.check_only:
            try:
                self.storage.ensure()
            except StorageError as exc:
                problem("acme.storage", str(exc))
                return False
        server = self.config.server
        if server.user and "server" not in self.loaded.invalid:
            blocked = _not_searchable(Path(self.storage_path) / "challenges", server.user,
                                      server.group)
            if blocked is not None:
                problem("acme.storage", f"workers run as {server.user!r} and cannot reach "
                        f"{self.storage_path}/challenges ({blocked} is not searchable by "
                        "them), so they could not answer ACME challenges: make it "
                        f"searchable (chmod o+x {blocked}) or choose another storage")
        return True

    def slot_for(self, site: Site, acme_ok: bool) -> CertSlot:
        http2 = site.http2
        if isinstance(site.tls, TlsFiles):
            source = file_source(site.tls.cert, site.tls.key)
            slot = self._slots.get((source, http2))
            if slot is None:
                # Stat first: a change while (or after) it is read is seen by the watcher.
                version = file_version(site.tls.cert, site.tls.key) or ""
                context = server_context(site.tls.cert, site.tls.key, tickets=self.tickets,
                                         http2=http2)
                slot = CertSlot(source, "file", context, _file_info(site.tls.cert),
                                http2=http2, tickets=self.tickets, version=version)
                self._watches[source] = FileWatch(source, site.tls.cert, site.tls.key)
            return self._slots.setdefault((source, http2), slot)
        if site.tls == "self-signed":
            cert, key = self_signed(state_dir(self.loaded), site.name, list(site.hosts))
            context = server_context(cert, key, tickets=self.tickets, http2=http2)
            slot = CertSlot(f"self-signed:{site.name}", "self-signed", context,
                            _file_info(cert), http2=http2, tickets=self.tickets)
            return self._slots.setdefault((slot.source, http2), slot)
        return self._acme_slot(site, acme_ok)

    def _acme_slot(self, site: Site, acme_ok: bool) -> CertSlot:
        source = acme_source(site.hosts)
        slot = self._slots.get((source, site.http2))
        if slot is not None:
            return slot
        names = ", ".join(site.hosts)
        acme = self.config.acme
        usable = [c for c in acme.challenges
                  if c != "http-01" or self.config.server.http_listen]
        stored = None
        if acme_ok:
            try:
                stored = self.storage.load_certificate(site.hosts)
            except StorageError as exc:
                # Served meanwhile with the temporary certificate; the service orders anew.
                self.notes.append(f"site {site.name}: the stored certificate for {names} "
                                  f"cannot be used ({exc}); a new one will be ordered")
        info = None
        if stored is not None:
            try:
                info = check_pair(stored.chain_pem, stored.key_pem)
            except TlsError as exc:
                self.notes.append(f"site {site.name}: the stored certificate for {names} "
                                  f"cannot be used ({exc}); a new one will be ordered")
        how = " then ".join(usable)
        if info is not None and stored is not None:
            context = context_from_pem(stored.chain_pem, stored.key_pem, tickets=self.tickets,
                                       http2=site.http2)
            slot = CertSlot(source, "acme", context, info, http2=site.http2,
                            tickets=self.tickets, version=stored.version)
            until = f"{info.not_after:%Y-%m-%d %H:%M}"
            self.notes.append(f"site {site.name}: ACME certificate for {names} from "
                              f"{self.storage_path} (not after {until} UTC); renewed by "
                              f"{how} from {acme.directory}")
        elif (nearest := self._nearest(site) if acme_ok else None) is not None:
            # The site's hosts changed: the certificate of its former hosts serves them
            # until one for all of them is obtained (not a self-signed one for all).
            chain_pem, key_pem, info = nearest
            context = context_from_pem(chain_pem, key_pem, tickets=self.tickets,
                                       http2=site.http2)
            slot = CertSlot(source, "acme", context, info, http2=site.http2,
                            tickets=self.tickets, temporary=True,
                            stand_in=f"the certificate for {', '.join(info.names)}")
            self.notes.append(f"site {site.name}: no ACME certificate for {names} yet: one "
                              f"will be ordered from {acme.directory} by {how}, stored in "
                              f"{self.storage_path}; until then the one for "
                              f"{', '.join(info.names)} serves")
        else:
            cert, key = self_signed(state_dir(self.loaded), site.name, list(site.hosts))
            context = server_context(cert, key, tickets=self.tickets, http2=site.http2)
            slot = CertSlot(source, "acme", context, _file_info(cert), http2=site.http2,
                            tickets=self.tickets, temporary=True, stand_in="self-signed")
            self.notes.append(f"site {site.name}: no ACME certificate for {names} yet: one "
                              f"will be ordered from {acme.directory} by {how}, stored in "
                              f"{self.storage_path}; a temporary self-signed certificate is "
                              "served until then")
        if "http-01" in acme.challenges and not self.config.server.http_listen:
            self.notes.append(f"site {site.name}: http-01 is not used: server.http_listen "
                              "is empty")
        return self._slots.setdefault((source, site.http2), slot)

    def _nearest(self, site: Site) -> tuple[bytes, bytes, CertInfo] | None:
        """The stored, valid certificate that covers the most of ``site``'s hosts (None
        if none covers any)."""
        best: tuple[int, bytes, bytes, CertInfo] | None = None
        try:
            candidates = self.storage.stored_names()
        except StorageError:
            return None
        for names in candidates:
            covered = sum(covers(list(names), h) for h in site.hosts)
            if not covered or (best is not None and covered <= best[0]):
                continue
            try:
                stored = self.storage.load_certificate(names)
                if stored is None:
                    continue
                info = check_pair(stored.chain_pem, stored.key_pem)
            except (StorageError, TlsError):
                continue
            best = (covered, stored.chain_pem, stored.key_pem, info)
        return None if best is None else best[1:]

    def slots(self) -> list[CertSlot]:
        return list(self._slots.values())

    def watches(self) -> list[FileWatch]:
        return list(self._watches.values())

    def acme_plan(self) -> AcmePlan | None:
        if not self._acme_sites:
            return None
        acme = self.config.acme
        usable = tuple(c for c in acme.challenges
                       if c != "http-01" or self.config.server.http_listen)
        settings = AcmeSettings(acme.directory, acme.ca, acme.email, usable, acme.renew_before)
        # Sorted: a reload that only moves blocks around is the same plan (the service and
        # its orders in flight go on).
        certs = tuple(sorted((ManagedCert(s.name, tuple(s.hosts))
                             for s in self._acme_sites), key=lambda c: c.site))
        return AcmePlan(settings, self.storage_setting, certs)


def _file_info(cert: str) -> CertInfo | None:
    """The leaf of a PEM file that a context was just loaded from (None if it went away)."""
    try:
        return cert_info(x509.load_pem_x509_certificate(Path(cert).read_bytes()))
    except (OSError, ValueError):
        return None


def _not_searchable(path: Path, user: str, group: str) -> Path | None:
    """The first existing directory on the way to ``path`` that ``user`` (with ``group``
    or its primary group, and its supplementary groups, as ``privileges.drop`` sets them)
    cannot search; None if every one can be, or if the user is unknown (reported
    elsewhere). Directories that do not exist yet are made 0755 (``DirectoryStorage``)."""
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
        gids = set(os.getgrouplist(pw.pw_name, gid))
    except (KeyError, OSError):
        return None
    if pw.pw_uid == 0:
        return None
    for directory in [*reversed(path.parents), path]:
        try:
            st = os.stat(directory)
        except OSError:
            return None
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None
