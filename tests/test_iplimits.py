"""The per-address limits table (iplimits.py): counts shared by slots, given back when a
slot is retired, count-min never under-counting, the sliding-window rate, and two forked
processes writing at once."""

from __future__ import annotations

import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from sniport import iplimits
from sniport.iplimits import NOT_COUNTED, OVER_COUNT, OVER_RATE, IpLimiter, IpTable, size_for


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def table(slots: int = 4, buckets: int = 4096) -> IpTable:
    t = IpTable(buckets, slots)
    for _ in range(slots):
        t.acquire_slot()
    return t


def test_open_connections_are_counted_across_slots_and_given_back() -> None:
    t = table()
    a = IpLimiter(t, 0, 3, None)
    b = IpLimiter(t, 1, 3, None)
    keys = [a.admit("192.0.2.1"), b.admit("192.0.2.1"), a.admit("192.0.2.1")]
    assert all(k >= 0 for k in keys)
    assert t.open_count("192.0.2.1") == 3
    assert b.admit("192.0.2.1") == OVER_COUNT  # the fourth, wherever it lands
    assert a.admit("192.0.2.1") == OVER_COUNT
    assert a.admit("192.0.2.2") >= 0  # another address is not limited by this one's count
    b.release(keys[1])
    again = a.admit("192.0.2.1")
    assert again >= 0
    assert t.open_count("192.0.2.1") == 3


def test_retiring_a_slot_gives_back_what_it_held() -> None:
    t = table()
    a = IpLimiter(t, 0, 2, None)
    b = IpLimiter(t, 1, 2, None)
    a.admit("2001:db8::1")
    b.admit("2001:db8::1")
    assert a.admit("2001:db8::1") == OVER_COUNT
    t.retire_slot(1)  # the master, once it has reaped slot 1's worker
    assert t.open_count("2001:db8::1") == 1
    assert a.admit("2001:db8::1") >= 0
    assert t.acquire_slot() == 1  # reused, and it starts from nothing
    assert t.open_count("2001:db8::1") == 2


def test_one_spelling_per_address() -> None:
    t = table()
    a = IpLimiter(t, 0, 1, None)
    assert a.admit("2001:db8::1") >= 0
    assert a.admit("2001:0db8:0:0::0001") == OVER_COUNT


def test_high_water_mark_follows_the_slots_in_use() -> None:
    t = IpTable(4096, 8)
    assert t.high_water == 0
    assert [t.acquire_slot() for _ in range(3)] == [0, 1, 2]
    assert t.high_water == 3
    t.retire_slot(2)
    assert t.high_water == 2
    t.retire_slot(0)
    assert t.high_water == 2  # slot 1 is still in use


def test_size_for_is_bounded() -> None:
    buckets, slots = size_for(2, 4096)
    assert (buckets, slots) == (32768, 16)
    buckets, slots = size_for(512, 1_000_000)
    assert buckets * slots <= iplimits.MAX_CELLS or buckets == iplimits.MIN_BUCKETS
    assert buckets & (buckets - 1) == 0


def test_rate_is_limited_per_window_and_recovers() -> None:
    t = table()
    clock = Clock(1000.0)  # the start of a window of 10 s
    a = IpLimiter(t, 0, 0, (5, 10.0), clock)
    b = IpLimiter(t, 1, 0, (5, 10.0), clock)
    got = [(a if i % 2 else b).admit("198.51.100.7") for i in range(7)]
    assert got == [NOT_COUNTED] * 5 + [OVER_RATE] * 2
    assert a.admit("198.51.100.8") == NOT_COUNTED
    clock.now += 10.0  # the next window: the last one counts in full at its start
    assert a.admit("198.51.100.7") == OVER_RATE
    clock.now += 5.0  # half-way: the previous window counts for half (2.5): 3 more fit
    assert [a.admit("198.51.100.7") for _ in range(4)] == [NOT_COUNTED] * 3 + [OVER_RATE]
    clock.now += 25.0  # both windows are long gone
    assert [b.admit("198.51.100.7") for _ in range(6)] == [NOT_COUNTED] * 5 + [OVER_RATE]


def test_count_and_rate_together() -> None:
    t = table()
    clock = Clock()
    a = IpLimiter(t, 0, 2, (3, 1.0), clock)
    k1, k2 = a.admit("192.0.2.9"), a.admit("192.0.2.9")
    assert a.admit("192.0.2.9") == OVER_COUNT  # refused: not counted in the rate either
    a.release(k1)
    assert a.admit("192.0.2.9") >= 0
    a.release(k2)
    assert a.admit("192.0.2.9") == OVER_RATE  # three new ones in this second already


# ---------------------------------------------------------------------------------------------
# Properties

ADDRESSES = [f"10.0.0.{i}" for i in range(6)] + ["2001:db8::1", "2001:db8::2"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "release", "retire"]),
                          st.integers(0, 2), st.sampled_from(ADDRESSES)), max_size=60),
       st.integers(1, 4), st.sampled_from([1, 2, 4096]))
def test_counts_never_under_count(ops: list[tuple[str, int, str]], limit: int,
                                  buckets: int) -> None:
    """Whatever the order of admits, releases and slots retired, and however few buckets
    (1: everything collides): the estimate is never below the true count, equals it when
    the address shares no bucket with another one in play, and admit refuses exactly when
    the estimate is at the limit."""
    t = table(3, buckets)
    limiters = [IpLimiter(t, i, limit, None) for i in range(3)]
    held: list[list[tuple[str, int]]] = [[], [], []]
    pairs = {ip: iplimits.bucket_pair(t.key, buckets, ip) for ip in ADDRESSES}
    for op, slot, ip in ops:
        if op == "admit":
            before = t.open_count(ip)
            key = limiters[slot].admit(ip)
            assert (key == OVER_COUNT) == (before >= limit)
            if key >= 0:
                held[slot].append((ip, key))
        elif op == "release" and held[slot]:
            limiters[slot].release(held[slot].pop()[1])
        elif op == "retire":
            t.retire_slot(slot)
            held[slot].clear()
            assert t.acquire_slot() == slot
        for addr in ADDRESSES:
            true = sum(h[0] == addr for s in held for h in s)
            estimate = t.open_count(addr)
            assert estimate >= true
            alone = all(not set(pairs[addr]) & set(pairs[o]) for o in ADDRESSES if o != addr)
            if alone:
                assert estimate == true


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=80),
       st.integers(1, 6), st.sampled_from([0.5, 1.0, 10.0]))
def test_rate_bounds(gaps: list[float], n: int, window: float) -> None:
    """From one address, over any arrival times: never more than 2n admitted within any
    window's length (the approximation's bound), and a refusal only when n or more were
    admitted within the two windows' length before it."""
    t = table(2)
    clock = Clock(5000.0)
    a = IpLimiter(t, 0, 0, (n, window), clock)
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap * window
        got = a.admit("203.0.113.5")
        now = clock.now
        if got == NOT_COUNTED:
            admitted.append(now)
            assert sum(now - x < window for x in admitted) <= 2 * n
        else:
            assert got == OVER_RATE
            assert sum(now - x < 2 * window for x in admitted) >= n


def test_two_forked_processes_write_at_once() -> None:
    """Two processes, each with its own slot, admit and release on the same buckets at the
    same time: no update is lost (single writer per cell), and the sum is exact."""
    t = table(2)
    rounds, kept = 20000, (7, 11)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pids = []
    for slot in (0, 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                lim = IpLimiter(t, slot, 1 << 30, None)
                os.read(go_r, 1)
                for _ in range(rounds):
                    lim.release(lim.admit("192.0.2.77"))
                for _ in range(kept[slot]):
                    lim.admit("192.0.2.77")
                os.write(done_w, b"x")
                os.read(go_r, 1)  # hold until the parent has looked
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.write(go_w, b"gg")
    assert len(os.read(done_r, 1)) + len(os.read(done_r, 1)) == 2
    assert t.open_count("192.0.2.77") == sum(kept)
    os.kill(pids[1], 9)  # as a worker SIGKILLed: the master reaps it, then retires its slot
    os.waitpid(pids[1], 0)
    t.retire_slot(1)
    assert t.open_count("192.0.2.77") == kept[0]
    os.write(go_w, b"g")
    _, status = os.waitpid(pids[0], 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert t.open_count("192.0.2.77") == kept[0]  # an exit does not give back: the reap does


def test_admit_release_cost() -> None:
    """Not a benchmark, a guard: admit+release with both limits on stays in microseconds."""
    t = table(16)
    lim = IpLimiter(t, 0, 100, (1_000_000 // 2, 60.0))
    start = time.perf_counter()
    for i in range(2000):
        lim.release(lim.admit(f"10.1.{i % 200}.1"))
    per = (time.perf_counter() - start) / 2000
    assert per < 100e-6
