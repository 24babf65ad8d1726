"""The master's eye on certificates: files that change, ACME certificates that arrive.

Job: every few seconds (``INTERVAL``), and once at every reload (which reads everything
anew), look for a changed source: a ``tls = { cert, key }`` pair whose files changed
(certbot renewing, an internal CA), or a certificate in the ACME storage newer than the one
served (obtained or renewed by the ACME service, here or, with shared storage, elsewhere).
A changed pair is validated before anything serves it; a valid one is handed out as an
``Update`` (a memfd with chain and key, ``net.tls.pem_descriptor``) for the master to swap
into its own slots and send to every worker.

Rules (DESIGN.md "Certificates", README "Certificates"):
- Validation: the key matches the leaf, the leaf is valid now, and it covers every host
  the certificate it replaces covered. A pair that fails is logged and the old one kept.
- Writers are not atomic across two files (certbot writes the chain, then the key): a pair
  that fails is judged again at the next look and only logged if it failed twice in the
  same state, so a renewal caught half-way is not reported as broken.
- Only stat() runs every few seconds; files are read when their stat changes.
- A shared storage (Redis) is looked at within a time budget per round, and left alone
  (3 s doubling to a minute) while it fails: the master's loop never waits long on it.
- Nothing here raises: an unreadable file or storage is a log line and a later retry.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sniport.certs.slots import CertSlot
from sniport.certs.storage import Storage, StorageError
from sniport.logs import diag
from sniport.net.tls import CertInfo, TlsError, check_pair, covers, pem_descriptor

INTERVAL = 3.0  # seconds between looks
STORAGE_BACKOFF_MAX = 60.0  # between looks at a storage that keeps failing
STORAGE_ROUND_BUDGET = 0.5  # seconds of storage looks per round; the rest wait their turn


@dataclass
class Update:
    source: str
    fd: int  # the new chain and key; the receiver of the update closes it
    info: CertInfo
    version: str
    label: str  # for log lines: the files, or "ACME a.test, b.test"


@dataclass
class _Watched:
    source: str
    label: str
    stat: Callable[[], str | None]  # the source's version now (cheap)
    read: Callable[[], tuple[bytes, bytes] | None]
    version: str | None  # of what is served
    hosts: list[str]
    served: CertInfo | None
    failed: str | None = None  # a version that failed once: logged if it fails again
    shared: bool = False  # in the ACME storage (else files)


def file_version(cert: str, key: str) -> str | None:
    parts = []
    for path in (cert, key):
        try:
            st = os.stat(path)
        except OSError:
            return None
        parts.append(f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}")
    return "|".join(parts)


def _read_files(cert: str, key: str) -> tuple[bytes, bytes] | None:
    with open(cert, "rb") as c, open(key, "rb") as k:
        return c.read(1 << 20), k.read(1 << 20)


class CertWatcher:
    """The sources of one generation's certificates; ``poll()`` returns what changed."""

    def __init__(self, slots: list[CertSlot], files: list[tuple[str, str, str]],
                 storage: Storage | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next = clock() + INTERVAL
        self._storage_skip_until = 0.0  # a storage that failed: not asked again before then
        self._storage_backoff = 0.0
        self._storage_next = 0  # where the next round's storage looks start
        self._watched: list[_Watched] = []
        by_source: dict[str, list[CertSlot]] = {}
        for slot in slots:
            by_source.setdefault(slot.source, []).append(slot)
        for source, cert, key in files:
            same = by_source.get(source, [])
            hosts = sorted({h for s in same for h in s.hosts})
            info = same[0].info if same else None
            # The version of what the slots serve (stat'ed before the files were read), so
            # that a change between that read and now is seen at the first look.
            served = same[0].version if same else file_version(cert, key)
            self._watched.append(_Watched(
                source, f"{cert} / {key}", functools.partial(file_version, cert, key),
                functools.partial(_read_files, cert, key), served or None, hosts, info))
        if storage is not None:
            for source, same in by_source.items():
                if not source.startswith("acme:"):
                    continue
                names = source[len("acme:"):].split(",")
                first = same[0]
                self._watched.append(_Watched(
                    source, f"ACME {', '.join(names)}",
                    functools.partial(_storage_version, storage, names),
                    functools.partial(_storage_read, storage, names),
                    first.version or None, names, None if first.temporary else first.info,
                    shared=True))

    def poll(self, force: bool = False) -> list[Update]:
        now = self._clock()
        if not force and now < self._next:
            return []
        self._next = now + INTERVAL
        updates = []
        files = [w for w in self._watched if not w.shared]
        shared = [w for w in self._watched if w.shared]
        if shared and now >= self._storage_skip_until:
            # The storage's looks, from where the last round stopped, within a time budget:
            # many ACME sites on a slow storage must not hold the master's loop.
            start = self._storage_next % len(shared)
            shared = shared[start:] + shared[:start]
            budget_end = time.monotonic() + STORAGE_ROUND_BUDGET
            for i, w in enumerate(shared):
                if time.monotonic() >= budget_end:
                    self._storage_next = start + i
                    break
                try:
                    update = self._look(w)
                except StorageError as exc:
                    # Out of reach (Redis down or slow): every look may cost the master its
                    # timeout, so the storage is left alone, 3 s doubling to a minute.
                    self._storage_backoff = min(max(INTERVAL, self._storage_backoff * 2),
                                                STORAGE_BACKOFF_MAX)
                    self._storage_skip_until = now + self._storage_backoff
                    if self._storage_backoff < STORAGE_BACKOFF_MAX:
                        diag.warning("certificate watch: %s; looking again in %.0fs", exc,
                                     self._storage_backoff)
                    break
                except Exception as exc:  # a bug here must cost a swap, never the master
                    diag.exception("certificate watch %s: %s", w.label, exc)
                    continue
                self._storage_backoff = 0.0  # reached
                if update is not None:
                    updates.append(update)
            else:
                self._storage_next = 0
        for w in files:
            try:
                update = self._look(w)
            except Exception as exc:  # a bug here must cost a swap, never the master
                diag.exception("certificate watch %s: %s", w.label, exc)
                continue
            if update is not None:
                updates.append(update)
        return updates

    def _look(self, w: _Watched) -> Update | None:
        version = w.stat()
        if version is None or version == w.version:
            return None
        try:
            pair = w.read()
            if pair is None:
                return None
            info = check_pair(*pair)
            lost = [h for h in w.hosts if (w.served is None or covers(w.served.names, h))
                    and not covers(info.names, h)]
            if lost:
                raise TlsError(f"it does not cover {', '.join(lost)}")
        except (OSError, TlsError, StorageError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            if w.failed == version:
                diag.error("certificate %s changed but cannot be used: %s; still serving "
                           "the previous one", w.label, reason)
                w.version = version  # judged: not again until it changes
            w.failed = version
            return None
        w.version, w.failed, w.served = version, None, info
        diag.info("certificate %s changed: serving the new one (%s, not after %s UTC) "
                  "from the next handshake", w.label, ", ".join(info.names),
                  f"{info.not_after:%Y-%m-%d %H:%M}")
        return Update(w.source, pem_descriptor(*pair), info, version, w.label)


def _storage_version(storage: Storage, names: list[str]) -> str | None:
    return storage.certificate_version(names)  # StorageError: the look backs off


def _storage_read(storage: Storage, names: list[str]) -> tuple[bytes, bytes] | None:
    stored = storage.load_certificate(names)
    return None if stored is None else (stored.chain_pem, stored.key_pem)
