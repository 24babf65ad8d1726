"""An in-memory ``Storage`` (sniport/certs/storage.py) for the ACME tests: what two instances
sharing one storage would see, in one process. Counts saves and locks taken, so a test can
prove that a second instance did not order."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from sniport.certs.storage import StoredCertificate
from sniport.wire.acme import Challenge, generate_key


def _key(names: Sequence[str]) -> frozenset[str]:
    return frozenset(names)


class MemoryLock:
    def __init__(self, storage: MemoryStorage, key: frozenset[str]) -> None:
        self.storage = storage
        self.key = key
        self.released = False

    def refresh(self) -> None:
        if not self.released:
            self.storage.locks[self.key] = (self, time.monotonic())
            self.storage.refreshes += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            held = self.storage.locks.get(self.key)
            if held is not None and held[0] is self:
                del self.storage.locks[self.key]


class MemoryStorage:
    description = "memory"

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.certs: dict[frozenset[str], StoredCertificate] = {}
        self.locks: dict[frozenset[str], tuple[MemoryLock, float]] = {}
        self.challenges: dict[tuple[str, str], Challenge] = {}
        self.saves = 0
        self.locks_taken = 0
        self.refreshes = 0
        self.published: list[Challenge] = []
        self.withdrawn: list[Challenge] = []
        self._counter = 0

    def problem(self) -> str | None:
        return None

    def account_key(self, directory_url: str) -> ec.EllipticCurvePrivateKey:
        if directory_url not in self.keys:
            self.keys[directory_url] = generate_key()
        return self.keys[directory_url]

    def certificate_version(self, names: Sequence[str]) -> str | None:
        stored = self.certs.get(_key(names))
        return None if stored is None else stored.version

    def load_certificate(self, names: Sequence[str]) -> StoredCertificate | None:
        return self.certs.get(_key(names))

    def save_certificate(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None:
        self._counter += 1
        self.saves += 1
        self.certs[_key(names)] = StoredCertificate(chain_pem, key_pem, str(self._counter))

    def close(self) -> None:
        pass

    def stored_names(self) -> list[tuple[str, ...]]:
        return [tuple(sorted(key)) for key in self.certs]

    def try_lock(self, names: Sequence[str], stale_after: float) -> MemoryLock | None:
        key = _key(names)
        held = self.locks.get(key)
        if held is not None and time.monotonic() - held[1] < stale_after:
            return None
        lock = MemoryLock(self, key)
        self.locks[key] = (lock, time.monotonic())
        self.locks_taken += 1
        return lock

    def publish_challenge(self, challenge: Challenge) -> None:
        self.published.append(challenge)
        self.challenges[(challenge.type, challenge.name if challenge.type == "tls-alpn-01"
                         else challenge.token)] = challenge

    def withdraw_challenge(self, challenge: Challenge) -> None:
        self.withdrawn.append(challenge)
        self.challenges.pop((challenge.type, challenge.name if challenge.type == "tls-alpn-01"
                             else challenge.token), None)

    def http01(self, token: str) -> str | None:
        ch = self.challenges.get(("http-01", token))
        return None if ch is None else ch.key_authorization

    def tls_alpn01(self, name: str) -> str | None:
        ch = self.challenges.get(("tls-alpn-01", name))
        return None if ch is None else ch.key_authorization
