"""The ACME service: keeps every managed certificate obtained and renewed, until cancelled.

Job: the loop the master runs in a child process. Per certificate: read what the storage
holds; when there is none, or its renewal moment (``schedule.renew_at``, with the CA's
renewal window when it offers ARI, RFC 9773) has come, take the storage's lock for its names,
order it (``acme_client.obtain``) and save it. The workers pick saved certificates up from
the storage; this loop only reports its state (``report``) for the master's status.

Rules:
- Nothing raises out of ``run_service`` but ``CancelledError``: a failure (what the CA said,
  the network, the storage, a bug) is logged with the certificate's names and counts as a
  failure of that certificate, which then backs off (``schedule.Backoff``: 1 min doubling to
  4 h, never giving up; longer if the CA's Retry-After says so).
- Two processes (two instances on one storage) never order the same names at once: the order
  runs under ``try_lock``; a lock held elsewhere means "look again next tick"; once the lock
  is ours the storage is read again, since the other holder may have just renewed.
- The lock is refreshed while an order runs and released in the end, whatever the end.
- A certificate close to expiry (``schedule.close_to_expiry``) that cannot be renewed is an
  ERROR, at most once an hour; other failures are warnings.
- The directory is fetched when first needed and again after any failure (the CA may have
  moved its endpoints); the renewal window is asked again when the CA's Retry-After says.
- The loop wakes at the earliest due moment, and at least every ``max_sleep`` seconds, so a
  due renewal starts within that, also when the clock jumps (suspend) or a certificate is
  short-lived.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509

from sniport.certs import acme_client
from sniport.certs.acme_client import AcmeFailure, AcmeHttp, AcmeOrderError
from sniport.certs.schedule import Backoff, close_to_expiry, renew_at
from sniport.certs.storage import CertLock, Storage, StorageError
from sniport.logs import diag
from sniport.wire import acme

ERROR_EVERY = 3600.0  # an unrenewable certificate close to expiry: one ERROR an hour
ARI_RETRY_AFTER_FAILURE = 3600.0  # the renewal-info endpoint failed: own schedule meanwhile


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory_url: str
    ca: str = ""  # PEM file trusted for the directory's HTTPS ("" = the system store)
    email: str = ""
    challenges: tuple[str, ...] = ("tls-alpn-01", "http-01")
    renew_before: float | None = None  # seconds before notAfter; None = a third of lifetime
    timeout: float = 30.0  # per HTTP call


@dataclass(frozen=True, slots=True)
class ManagedCert:
    site: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CertState:
    """What the master shows about one certificate (``dataclasses.asdict`` makes it JSON)."""

    site: str
    names: tuple[str, ...]
    source: str = "acme"
    issuer: str = ""
    not_after: float | None = None  # epoch seconds
    next_renewal: float | None = None  # epoch seconds: the next order attempt
    last_error: str = ""
    failures: int = 0


def _epoch(when: datetime.datetime) -> float:
    return when.timestamp()


def _when(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


@dataclass(slots=True)
class _Tracked:
    cert: ManagedCert
    state: CertState
    version: str | None = None  # storage's version of what ``leaf`` was read from
    leaf: x509.Certificate | None = None
    backoff: Backoff = field(default_factory=Backoff)
    retry_at: float = 0.0  # backing off (or waiting for another's lock) until then
    ari: acme.RenewalWindow | None = None
    ari_next: float = 0.0  # when to ask the renewal window again
    pick: float = 0.0  # RFC 9773 section 4.2: one random point per window
    last_error_log: float = float("-inf")

    @property
    def label(self) -> str:
        return ", ".join(self.cert.names)


class _Service:
    def __init__(self, settings: AcmeSettings, storage: Storage, certs: Sequence[ManagedCert],
                 report: Callable[[list[CertState]], None], clock: Callable[[], float],
                 rng: Callable[[], float], max_sleep: float, lock_stale: float) -> None:
        self.settings = settings
        self.storage = storage
        self.report = report
        self.clock = clock
        self.rng = rng
        self.max_sleep = max_sleep
        self.lock_stale = lock_stale
        self.http = AcmeHttp(settings.ca, settings.timeout)
        self.directory: dict[str, object] | None = None
        self.tracked = [_Tracked(c, CertState(c.site, tuple(c.names))) for c in certs]

    async def run(self) -> None:
        self.report([t.state for t in self.tracked])
        while True:
            before = [t.state for t in self.tracked]
            for tracked in self.tracked:
                try:
                    await self.check(tracked)
                except Exception as exc:  # the rule: nothing but cancellation leaves the loop
                    diag.error("acme: certificate for %s: unexpected error", tracked.label,
                               exc_info=True)
                    self.failed(tracked, f"unexpected error: {exc!r}", None)
            states = [t.state for t in self.tracked]
            if states != before:
                self.report(states)
            await asyncio.sleep(self.sleep_for())

    def sleep_for(self) -> float:
        now = self.clock()
        moments = []
        for t in self.tracked:
            due = self.due(t)
            moments.append(max(due, t.retry_at))
            if t.leaf is not None and self.offers_ari():
                moments.append(t.ari_next)
        earliest = min(moments, default=now + self.max_sleep)
        # A floor, so that a clock that stands still (tests, a broken clock) cannot spin.
        return min(max(earliest - now, self.max_sleep / 100), self.max_sleep)

    def offers_ari(self) -> bool:
        return self.directory is not None and isinstance(self.directory.get("renewalInfo"), str)

    def due(self, t: _Tracked) -> float:
        if t.leaf is None:
            return float("-inf")
        return _epoch(renew_at(t.leaf.not_valid_before_utc, t.leaf.not_valid_after_utc,
                               self.settings.renew_before, t.ari, t.pick))

    async def get_directory(self) -> dict[str, object]:
        if self.directory is None:
            self.directory = await acme_client.fetch_directory(self.http,
                                                               self.settings.directory_url)
        return self.directory

    def reload(self, t: _Tracked) -> None:
        """Read the stored certificate when its version changed since last time."""
        version = self.storage.certificate_version(t.cert.names)
        if version == t.version and (version is None or t.leaf is not None):
            return
        stored = self.storage.load_certificate(t.cert.names) if version is not None else None
        t.version = version
        if stored is None:
            t.leaf = None
        else:
            try:
                t.leaf = x509.load_pem_x509_certificates(stored.chain_pem)[0]
            except ValueError:
                diag.warning("acme: stored certificate for %s is not a PEM chain; ordering a "
                             "new one", t.label)
                t.leaf = None
        t.ari, t.ari_next = None, 0.0  # a new certificate: a new window to ask for
        self.refresh_state(t)

    def refresh_state(self, t: _Tracked) -> None:
        leaf = t.leaf
        t.state = replace(
            t.state,
            issuer=leaf.issuer.rfc4514_string() if leaf is not None else "",
            not_after=_epoch(leaf.not_valid_after_utc) if leaf is not None else None,
            next_renewal=(max(self.due(t), t.retry_at) if leaf is not None
                          else t.retry_at or None),
            last_error=t.state.last_error,
            failures=t.backoff.failures,
        )

    async def check_ari(self, t: _Tracked, now: float) -> None:
        if t.leaf is None or now < t.ari_next:
            return
        try:
            directory = await self.get_directory()
            window, recheck = await acme_client.renewal_window(self.http, directory, t.leaf)
        except AcmeFailure as exc:
            # ARI is advice (RFC 9773 section 4.3): without it our own schedule still holds.
            diag.warning("acme: renewal info for %s: %s; asking again in %.0fs", t.label, exc,
                         ARI_RETRY_AFTER_FAILURE)
            self.directory = None
            t.ari_next = now + ARI_RETRY_AFTER_FAILURE
            return
        if window != t.ari and (window is None or t.ari is None
                                or (window.start, window.end) != (t.ari.start, t.ari.end)):
            t.pick = self.rng()
            if window is not None:
                diag.info("acme: CA suggests renewing %s between %s and %s", t.label,
                          window.start.isoformat(), window.end.isoformat())
        t.ari = window
        t.ari_next = now + recheck
        self.refresh_state(t)

    async def check(self, t: _Tracked) -> None:
        try:
            self.reload(t)
        except StorageError as exc:
            self.failed(t, f"storage: {exc}", None)
            return
        now = self.clock()
        if now < t.retry_at:
            return
        await self.check_ari(t, now)
        if now < self.due(t):
            return
        await self.order(t, now)

    async def order(self, t: _Tracked, now: float) -> None:
        names = t.cert.names
        try:
            lock = self.storage.try_lock(names, self.lock_stale)
        except StorageError as exc:
            self.failed(t, f"storage: {exc}", None)
            return
        if lock is None:
            diag.debug("acme: %s is being ordered by another process", t.label)
            t.retry_at = now + self.max_sleep  # look again next tick
            return
        refresher = asyncio.create_task(self.keep_lock(lock))
        try:
            # Another process may have renewed between our read and the lock.
            self.reload(t)
            if self.clock() < self.due(t):
                diag.debug("acme: %s was renewed by another process", t.label)
                return
            renewing = t.leaf is not None
            await self.obtain(t)
            what = "renewed" if renewing else "obtained"
            self.reload(t)
            t.backoff.reset()
            t.retry_at = 0.0
            t.state = replace(t.state, last_error="")
            self.refresh_state(t)
            diag.info("acme: certificate for %s %s (not after %s)", t.label, what,
                      t.leaf.not_valid_after_utc.isoformat() if t.leaf is not None else "?")
        except AcmeOrderError as exc:
            self.directory = None
            self.failed(t, str(exc), exc.error.retry_after)
        except (AcmeFailure, StorageError) as exc:
            self.directory = None
            self.failed(t, str(exc), None)
        finally:
            refresher.cancel()
            try:
                lock.release()
            except StorageError as exc:
                diag.warning("acme: cannot release the lock for %s: %s", t.label, exc)

    async def obtain(self, t: _Tracked) -> None:
        directory = await self.get_directory()
        key = self.storage.account_key(self.settings.directory_url)
        replaces = None
        if t.leaf is not None and self.offers_ari():
            try:
                replaces = acme.ari_cert_id(t.leaf)  # RFC 9773 section 5
            except ValueError:
                replaces = None
        done = await acme_client.obtain(
            self.http, directory, key, t.cert.names, email=self.settings.email,
            challenges=self.settings.challenges, storage=self.storage, replaces=replaces,
            log=diag)
        self.storage.save_certificate(t.cert.names, done.chain_pem, done.key_pem)

    async def keep_lock(self, lock: CertLock) -> None:
        while True:
            await asyncio.sleep(max(self.lock_stale / 4, 0.05))
            try:
                lock.refresh()
            except StorageError as exc:
                diag.warning("acme: cannot refresh an order lock: %s", exc)

    def failed(self, t: _Tracked, message: str, retry_after: float | None) -> None:
        now = self.clock()
        delay = t.backoff.failed()
        if retry_after is not None:
            delay = max(delay, min(retry_after, 24 * 3600.0))  # rateLimited: as the CA says
        t.retry_at = now + delay
        t.state = replace(t.state, last_error=message)
        self.refresh_state(t)
        leaf = t.leaf
        if (leaf is not None and now - t.last_error_log >= ERROR_EVERY
                and close_to_expiry(_when(now), leaf.not_valid_before_utc,
                                    leaf.not_valid_after_utc)):
            t.last_error_log = now
            diag.error("acme: certificate for %s expires %s and cannot be renewed "
                       "(%d failures, next try in %.0fs): %s", t.label,
                       leaf.not_valid_after_utc.isoformat(), t.backoff.failures, delay, message)
            return
        diag.warning("acme: certificate for %s: order failed (failure %d, next try in %.0fs): "
                     "%s", t.label, t.backoff.failures, delay, message)


async def run_service(
    settings: AcmeSettings,
    storage: Storage,
    certs: Sequence[ManagedCert],
    report: Callable[[list[CertState]], None],
    *,
    clock: Callable[[], float] = time.time,
    rng: Callable[[], float] = random.random,
    max_sleep: float = 60.0,
    lock_stale: float = 600.0,
) -> None:
    """Keep ``certs`` obtained and renewed until cancelled (see the module's rules)."""
    await _Service(settings, storage, certs, report, clock, rng, max_sleep, lock_stale).run()
