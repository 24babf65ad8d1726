"""Which storage backend a ``storage`` setting names, for the ACME service and the workers.

Job: one place that turns the setting into a ``Storage`` (service, watcher, ``check``) or a
``ChallengeSource`` (a worker's async challenge reads).

Rules:
- ``redis://`` and ``rediss://`` are Redis (``certs/redis_store.py``); any other
  ``scheme://`` is refused (ValueError); everything else is a directory path.
- Opening does no I/O: ``problem()`` says whether the storage can be used.
- redis-py is imported only when a Redis storage is configured (it is big, and a single
  instance never needs it).
"""

from __future__ import annotations

import re

from sniport.certs.directory import DirectoryStorage
from sniport.certs.storage import ChallengeSource, Storage

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
REDIS_SCHEMES = ("redis", "rediss")


def is_redis(storage_setting: str) -> bool:
    """Whether the setting names a Redis server (ValueError for another URL scheme)."""
    match = _SCHEME.match(storage_setting)
    if match is None:
        return False
    if match.group(1).lower() in REDIS_SCHEMES:
        return True
    raise ValueError(f"storage {match.group(0)}: unknown scheme (a directory path, "
                     "redis:// or rediss://)")


def open_storage(storage_setting: str, *, timeout: float = 2.0) -> Storage:
    """The ``Storage`` the setting names (ValueError for a bad URL)."""
    if is_redis(storage_setting):
        from sniport.certs.redis_store import RedisStorage  # only a fleet pays for redis-py

        return RedisStorage(storage_setting, timeout=timeout)
    return DirectoryStorage(storage_setting)


def challenge_source(storage_setting: str, *, timeout: float = 2.0) -> ChallengeSource:
    """The async challenge reader for the setting (ValueError for a bad URL)."""
    if is_redis(storage_setting):
        from sniport.certs.redis_store import RedisChallenges

        return RedisChallenges(storage_setting, timeout=timeout)
    return DirectoryChallenges(storage_setting)


class DirectoryChallenges:
    """``ChallengeSource`` over the directory backend: an answer is one read of a small
    local file (1 KiB at most), done in the loop, as the workers always did."""

    def __init__(self, path: str) -> None:
        self._storage = DirectoryStorage(path)  # creates nothing

    async def http01(self, token: str) -> str | None:
        return self._storage.http01(token)

    async def tls_alpn01(self, name: str) -> str | None:
        return self._storage.tls_alpn01(name)

    async def close(self) -> None:
        return None
