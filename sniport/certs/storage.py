"""Where ACME state lives: the storage interface every backend implements.

Job: one small interface for what the ACME service and the workers share: the account key,
the certificates obtained, the locks that stop two processes ordering the same names, and
the challenge answers (RFC 8555 section 8) that any worker (and later any instance) must be
able to give while the CA validates. The directory backend is ``certs/directory.py``; the
Redis backend (issue 11) is ``certs/redis_store.py``; ``certs/backends.py`` picks one from the
``storage`` setting. Workers read challenge answers through ``ChallengeSource`` (async).

Rules:
- Certificates are keyed by their set of names (order does not matter), never by a site's
  name: two instances, or a renamed site, find the same certificate.
- Private keys are written 0600 and atomically (written beside, then renamed): a crash
  never leaves half a key, a reader never sees one.
- Reading challenge answers needs no write access and creates nothing: workers that
  dropped their privileges read them.
- I/O failures raise ``StorageError`` with a message that names the path and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from sniport.wire.acme import Challenge


class StorageError(Exception):
    """The storage cannot be read or written: the message says where and why."""


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    chain_pem: bytes  # leaf first, then the intermediates
    key_pem: bytes
    version: str  # changes whenever the stored pair changes


class CertLock(Protocol):
    def refresh(self) -> None:
        """Still working on it: push the moment the lock counts as stale forward."""

    def release(self) -> None:
        """Done (idempotent)."""


class Storage(Protocol):
    description: str  # for logs and ``check``: "/var/lib/sniport/acme"

    def problem(self) -> str | None:
        """Why this storage cannot be used (not writable, not a directory...), or None."""

    def account_key(self, directory_url: str) -> ec.EllipticCurvePrivateKey:
        """The account key for this ACME directory: loaded, or made and stored (0600)."""

    def certificate_version(self, names: Sequence[str]) -> str | None:
        """A cheap token that changes when the stored certificate for ``names`` changes;
        None if there is none. Polled every few seconds."""

    def load_certificate(self, names: Sequence[str]) -> StoredCertificate | None: ...

    def save_certificate(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None: ...

    def stored_names(self) -> list[tuple[str, ...]]:
        """The name sets of the certificates stored: when a site's hosts change, the one
        nearest to them serves until the site's own is obtained."""

    def try_lock(self, names: Sequence[str], stale_after: float) -> CertLock | None:
        """The lock for ordering ``names``, or None if another process holds it. A lock not
        refreshed for ``stale_after`` seconds is broken (its holder died)."""

    def publish_challenge(self, challenge: Challenge) -> None:
        """Make the answer readable by ``http01``/``tls_alpn01`` before returning."""

    def withdraw_challenge(self, challenge: Challenge) -> None: ...

    def http01(self, token: str) -> str | None:
        """The key authorization for an HTTP-01 token, or None."""

    def tls_alpn01(self, name: str) -> str | None:
        """The key authorization of the pending TLS-ALPN-01 challenge for ``name``, or None."""

    def close(self) -> None:
        """Release connections (Redis); nothing for a directory."""


class ChallengeSource(Protocol):
    """A worker's read-only view of the pending challenge answers, for its event loop:
    ``Storage.http01``/``tls_alpn01`` may block (a network round trip with Redis), these
    must not. They never raise: a failure is a miss (None), logged by the source."""

    async def http01(self, token: str) -> str | None:
        """The key authorization for an HTTP-01 token, or None."""

    async def tls_alpn01(self, name: str) -> str | None:
        """The key authorization of the pending TLS-ALPN-01 challenge for ``name``, or None."""

    async def close(self) -> None:
        """Let go of connections (idempotent; the source can be used again afterwards)."""
