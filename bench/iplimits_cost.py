"""In-process cost of the per-address limits (issue 12 item 3): ``IpLimiter.admit`` then
``release`` for one connection, what a worker adds per accepted connection when a limit is
set (with both limits off the worker does not call in at all). Over 10,000 addresses, with
2 and 16 slots in use (the sum read per bucket grows with the slots), against the per-worker
dict the limit used before.

Run: PYTHONPATH=. .venv/bin/python bench/iplimits_cost.py
"""

from __future__ import annotations

import timeit

from sniport.iplimits import IpLimiter, IpTable, size_for

N = 200_000
ADDRESSES = [f"10.{i >> 8 & 255}.{i & 255}.7" for i in range(10_000)]


def per_connection(fn: object, n: int = N) -> float:
    timer = timeit.Timer("fn()", globals={"fn": fn})
    return min(timer.repeat(5, n)) / n * 1e9


def main() -> None:
    for used in (2, 16):
        buckets, slots = size_for(2, 4096)
        table = IpTable(buckets, slots)
        for _ in range(used):
            table.acquire_slot()
        for label, count, rate in (("count", 100, None), ("rate", 0, (1_000_000, 60.0)),
                                   ("count+rate", 100, (1_000_000, 60.0))):
            lim = IpLimiter(table, 0, count, rate)
            it = iter(ADDRESSES * (6 * N // len(ADDRESSES) + 2))

            def one(lim: IpLimiter = lim, it: object = it) -> None:
                key = lim.admit(next(it))  # type: ignore[call-overload]
                if key >= 0:
                    lim.release(key)

            print(f"slots in use {used:2d}, {label:10s}: {per_connection(one):6.0f} ns "
                  "per admit+release")
    # Before: the per-worker dict of Worker._take_ip / _release.
    counts: dict[str, int] = {}
    it2 = iter(ADDRESSES * (6 * N // len(ADDRESSES) + 2))

    def old() -> None:
        ip = next(it2)
        c = counts.get(ip, 0)
        if c < 100:
            counts[ip] = c + 1
        left = counts[ip] - 1
        if left:
            counts[ip] = left
        else:
            del counts[ip]

    print(f"before (per-worker dict, count only): {per_connection(old):6.0f} ns")


if __name__ == "__main__":
    main()
