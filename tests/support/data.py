"""Test data: a byte pattern for transfers (with its sha256, computed without holding the
bytes), and document trees written with fixed modification times."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # files the tests read (tests/data)

# What downloads, uploads and the backends' streams are made of: 1 MiB of seeded random
# bytes, repeated. Not periodic within a MiB, so a relay that drops, doubles or reorders a
# piece changes the sha256 even when the length is right.
BLOCK = random.Random(20240607).randbytes(1 << 20)


def pattern(n: int, piece: int = len(BLOCK)) -> Iterator[memoryview]:
    """``n`` bytes of BLOCK repeated, in pieces of at most ``piece`` bytes."""
    view = memoryview(BLOCK)
    offset = 0
    while n > 0:
        k = min(n, piece, len(BLOCK) - offset)
        yield view[offset:offset + k]
        offset = (offset + k) % len(BLOCK)
        n -= k


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of the pattern, in one piece."""
    return b"".join(pattern(n))


@lru_cache(maxsize=16)
def pattern_sha256(n: int) -> str:
    """sha256 of the first ``n`` bytes of the pattern, as hex."""
    h = hashlib.sha256()
    for piece in pattern(n):
        h.update(piece)
    return h.hexdigest()


@dataclass
class Files:
    """A document root being built: ``add(relpath, data)`` with a fixed mtime."""

    root: Path
    mtime: int = 1_700_000_000
    written: dict[str, bytes] = field(default_factory=dict)

    def add(self, rel: str, data: bytes | str, *, mtime: int | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        stamp = self.mtime if mtime is None else mtime
        os.utime(path, (stamp, stamp))
        self.written[rel] = data.encode() if isinstance(data, str) else data
        return path
