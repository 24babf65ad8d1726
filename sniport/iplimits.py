"""Per-address connection limits shared by every worker: ``max_connections_per_ip`` (open
connections) and ``max_connection_rate_per_ip`` (new connections per window).

Job: tell a worker, at accept and before any byte is read, whether one more connection from
an address is over either limit, counting what all the workers of the server hold, past
generations still draining included.

Rules:
- One anonymous shared mapping (``IpTable``), made by the master before its first fork and
  kept for its whole life (reloads included), exactly like ``metrics.SharedMetrics``: a
  mapping made later would not be shared with workers forked earlier. Its size is fixed at
  start: ``buckets`` x ``slots`` cells, nothing grows, whatever the traffic.
- No locks: a worker killed with SIGKILL must not leave anything held. Each cell has one
  writer, the worker that owns that slot; readers sum the cells of every slot. A bucket
  keeps its slots' cells side by side, so a sum is one ``struct.unpack_from``; only slots
  below the high-water mark the master publishes in the header (slots are handed out lowest
  first) are read. Cells are aligned 32-bit (counts) and 64-bit (rates) words, written with
  one store each, so a reader never sees half a write; it may see a count one connection
  old, which is the "approximately" of these limits.
- Slots: the master gives each worker it forks a free slot (``acquire_slot``) and, once it
  has reaped the worker (exited, crashed or SIGKILLed), zeroes that slot's open-connection
  cells (``retire_slot``), which gives back every connection the dead worker held. A
  worker without a slot (more workers alive at once than slots) counts in a private table
  of its own: its limits are then per worker, and the master warns.
- Addresses are hashed with keyed BLAKE2b (a random key per master, so nobody can aim
  addresses at one bucket) of the packed address (``inet_pton``: one spelling per address),
  into two buckets (count-min): a connection is counted in both, and the estimate for an
  address is the smaller of the two sums. Collisions only ever over-count.
- When the table is "full" it neither evicts nor fails open: it over-counts. An innocent
  address is refused only if both its buckets carry at least the limit from others. With
  load ``lam`` = (connections counted) / ``buckets`` and a limit ``n``, the chance of that is
  at most ``(lam / n) ** 2`` (Markov's bound, each bucket independently); ``buckets`` is
  sized at four per connection the server can hold at start (``size_for``); each connection
  is counted in two buckets, so with every worker full of connections from distinct
  addresses lam is 2 / 4 and the chance at most ``1 / (4 n**2)``: 25% for ``n = 1`` (the
  tightest limit possible; measured 16% with 4 workers), 1% for ``n = 5``. The same holds
  for the rate with lam = 2 * new connections per window / buckets. ``MAX_CELLS`` bounds the
  mapping, so past about 8 workers of 4096 connections there are fewer buckets per
  connection, and the master warns.
- The rate is a sliding-window counter: each cell holds, for its slot, the window number
  (time.monotonic(), the same clock in every process, divided by the window length) and the
  counts of that window and the one before. The estimate is ``previous * (1 - elapsed
  fraction of this window) + current``; a connection is admitted while it is below the
  limit. A steady flood gets the limit per window on average; a burst at a window's end
  followed by another at the next one's start can reach up to twice the limit within one
  window's length (the classic bound of this approximation). Counts per slot and window
  saturate at 65535 (``MAX_RATE`` caps the configured count).
- Cost: nothing at all when both limits are 0 (the worker does not call in here); else one
  hash, one or two unpacks per bucket and one or two stores per accept, and one or two
  stores per close.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

COUNT_BYTES: Final = 4  # one signed 32-bit open-connection count per (bucket, slot)
RATE_BYTES: Final = 8  # epoch (32 bits) | this window's count (16) | the previous one's (16)
HEADER_BYTES: Final = 64  # the slot high-water mark, then padding to keep cells aligned
MAX_RATE: Final = 0xFFFF
MIN_BUCKETS, MAX_BUCKETS = 4096, 1 << 17
MAX_CELLS: Final = 1 << 21  # buckets x slots at most: 24 MiB of mapping, touched as used

# What ``IpLimiter.admit`` returns besides a counted key (>= 0).
NOT_COUNTED: Final = -1  # admitted; nothing to give back at close (rate limit only)
OVER_COUNT: Final = -2  # max_connections_per_ip reached
OVER_RATE: Final = -3  # max_connection_rate_per_ip reached

_U32: Final = 0xFFFFFFFF
_HWM = struct.Struct("=q")


def size_for(workers: int, max_connections: int) -> tuple[int, int]:
    """(buckets, slots) for a server of ``workers`` workers holding up to ``max_connections``
    each: slots for two generations during a reload plus respawns (as the metrics' slots),
    buckets a power of two, four per connection the server can hold, within bounds."""
    slots = 4 * workers + 8
    want = 4 * workers * max_connections
    buckets = MIN_BUCKETS
    while buckets < want and buckets < MAX_BUCKETS and buckets * 2 * slots <= MAX_CELLS:
        buckets *= 2
    return buckets, slots


class IpTable:
    """The shared mapping: a header, then the open-connection counts (``buckets`` rows of
    ``slots`` 32-bit cells), then the rate cells (``buckets`` rows of ``slots`` 64-bit
    cells). Made by the master before it forks; ``acquire_slot`` and ``retire_slot`` are
    the master's, the rest is read and written by workers through ``IpLimiter``."""

    def __init__(self, buckets: int, slots: int) -> None:
        if buckets < 1 or buckets & (buckets - 1) or slots < 1:
            raise ValueError("buckets must be a power of two and slots positive")
        self.buckets = buckets
        self.slots = slots
        self.key = os.urandom(16)
        self._counts_at = HEADER_BYTES
        self._rates_at = HEADER_BYTES + buckets * slots * COUNT_BYTES
        size = self._rates_at + buckets * slots * RATE_BYTES
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.buf = memoryview(self._map)
        self.counts = self.buf[self._counts_at:self._rates_at].cast("i")
        self.rates = self.buf[self._rates_at:].cast("Q")
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._used: set[int] = set()

    @property
    def high_water(self) -> int:
        """Slots below this may hold counts (the master's word; workers read it per accept)."""
        return int(_HWM.unpack_from(self.buf, 0)[0])

    def _publish(self) -> None:
        _HWM.pack_into(self.buf, 0, max(self._used) + 1 if self._used else 0)

    def acquire_slot(self) -> int | None:
        """A slot for a worker about to be forked; None when all are in use."""
        if not self._free:
            return None
        i = self._free.pop()
        self._used.add(i)
        self._publish()
        return i

    def retire_slot(self, i: int) -> None:
        """Give back every connection slot ``i`` held, and free it. Master only, once the
        worker that wrote it has been reaped. Rate cells are kept: the connections they
        count were made, and they age out on their own within two windows."""
        if i not in self._used:
            raise ValueError(f"slot {i} is not in use")
        # A strided store of zeros: touches only pages that hold this slot's cells.
        self.counts[i::self.slots] = memoryview(bytes(self.buckets * COUNT_BYTES)).cast("i")
        self._used.discard(i)
        self._free.append(i)
        self._publish()

    def open_count(self, ip: str) -> int:
        """The estimate for ``ip`` (tests and diagnostics): min over its two buckets."""
        b1, b2 = bucket_pair(self.key, self.buckets, ip)
        return min(self._sum(b1), self._sum(b2))

    def _sum(self, bucket: int) -> int:
        hwm = self.high_water
        return sum(self.counts[bucket * self.slots:bucket * self.slots + hwm])

    def close(self) -> None:
        """Unmap, unless views handed out are still alive (then it goes with the last)."""
        try:
            self.counts.release()
            self.rates.release()
            self.buf.release()
            self._map.close()
        except BufferError:
            pass


def packed(ip: str) -> bytes:
    """One spelling per address: 4 or 16 bytes (anything unparsable: its text)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        return ip.encode()


def bucket_pair(key: bytes, buckets: int, ip: str) -> tuple[int, int]:
    h = int.from_bytes(hashlib.blake2b(packed(ip), key=key, digest_size=8).digest(), "little")
    mask = buckets - 1
    return h & mask, (h >> 32) & mask


class IpLimiter:
    """A worker's handle on the table: its slot, and the limits of its generation.

    ``max_connections`` 0 = no count; ``rate`` None = no rate limit (then nothing calls
    ``admit`` at all: the worker keeps None instead of a limiter)."""

    __slots__ = ("_buf", "_clock", "_counts", "_counts_off", "_key", "_mask", "_max",
                 "_rate_n", "_rate_w", "_rates", "_rates_off", "_slot", "_slots", "_structs")

    def __init__(self, table: IpTable, slot: int, max_connections: int,
                 rate: tuple[int, float] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._buf = table.buf
        self._counts = table.counts
        self._rates = table.rates
        self._counts_off = table._counts_at
        self._rates_off = table._rates_at
        self._slot = slot
        self._slots = table.slots
        self._key = table.key
        self._mask = table.buckets - 1
        self._max = max_connections
        self._rate_n = min(rate[0], MAX_RATE) if rate else 0
        self._rate_w = rate[1] if rate else 1.0
        # One Struct per possible high-water mark: a bucket's row is read in one unpack.
        self._structs = [(struct.Struct(f"={n}i"), struct.Struct(f"={n}Q"))
                         for n in range(table.slots + 1)]
        self._clock = clock

    def key_of(self, ip: str) -> int:
        """Both buckets of ``ip`` in one int (the first in the low 32 bits)."""
        h = int.from_bytes(hashlib.blake2b(packed(ip), key=self._key,
                                           digest_size=8).digest(), "little")
        mask = self._mask
        return (h & mask) | (((h >> 32) & mask) << 32)

    def admit(self, ip: str) -> int:
        """One more connection from ``ip``? A key (>= 0) to give to ``release`` at its
        close, ``NOT_COUNTED`` (admitted, nothing to give back), or ``OVER_COUNT`` /
        ``OVER_RATE`` (refused; nothing was counted)."""
        key = self.key_of(ip)
        b1, b2 = key & _U32, key >> 32
        hwm = _HWM.unpack_from(self._buf, 0)[0]
        counts_row, rates_row = self._structs[hwm]
        slots = self._slots
        if self._max:
            row = slots * COUNT_BYTES
            if (sum(counts_row.unpack_from(self._buf, self._counts_off + b1 * row))
                    >= self._max and
                    sum(counts_row.unpack_from(self._buf, self._counts_off + b2 * row))
                    >= self._max):
                return OVER_COUNT
        if self._rate_n:
            now = self._clock() / self._rate_w
            epoch = int(now)
            frac = now - epoch
            epoch &= _U32
            row = slots * RATE_BYTES
            n = self._rate_n
            if (_estimate(rates_row.unpack_from(self._buf, self._rates_off + b1 * row),
                          epoch, frac) >= n and
                    _estimate(rates_row.unpack_from(self._buf, self._rates_off + b2 * row),
                              epoch, frac) >= n):
                return OVER_RATE
            rates = self._rates
            own = self._slot
            for b in (b1,) if b1 == b2 else (b1, b2):
                i = b * slots + own
                rates[i] = _bump(rates[i], epoch)
            if not self._max:
                return NOT_COUNTED
        counts = self._counts
        counts[b1 * slots + self._slot] += 1
        if b2 != b1:
            counts[b2 * slots + self._slot] += 1
        return key

    def adopt(self, ip: str) -> int:
        """Count a connection that is already open (a relay handed over at a reload) without
        checking the limits: it keeps its place. The key for ``release``, or NOT_COUNTED."""
        if not self._max:
            return NOT_COUNTED
        key = self.key_of(ip)
        b1, b2 = key & _U32, key >> 32
        counts = self._counts
        counts[b1 * self._slots + self._slot] += 1
        if b2 != b1:
            counts[b2 * self._slots + self._slot] += 1
        return key

    def release(self, key: int) -> None:
        """A counted connection closed (or left this worker): its place is given back."""
        b1, b2 = key & _U32, key >> 32
        counts = self._counts
        counts[b1 * self._slots + self._slot] -= 1
        if b2 != b1:
            counts[b2 * self._slots + self._slot] -= 1


def _estimate(cells: tuple[int, ...], epoch: int, frac: float) -> float:
    """New connections in the sliding window ending now, from every slot's cell."""
    cur = prev = 0
    before = (epoch - 1) & _U32
    for v in cells:
        e = v >> 32
        if e == epoch:
            cur += (v >> 16) & 0xFFFF
            prev += v & 0xFFFF
        elif e == before:
            prev += (v >> 16) & 0xFFFF
    return prev * (1.0 - frac) + cur


def _bump(v: int, epoch: int) -> int:
    """A slot's rate cell with one more connection in window ``epoch``."""
    e = v >> 32
    if e == epoch:
        cur = min(((v >> 16) & 0xFFFF) + 1, MAX_RATE)
        return (v & ~0xFFFF0000) | (cur << 16)
    prev = (v >> 16) & 0xFFFF if e == ((epoch - 1) & _U32) else 0
    return (epoch << 32) | (1 << 16) | prev
