"""In-process cost of counting one HTTP request in the metrics (issue 11 item 3).

``RequestLog.request`` with a route's cells (what every request of a site does now) against
without them, with the access log off. Before metrics, the call was skipped when the log
was off, so the added cost per request is the first figure. Same code whether
``metrics_listen`` is set or not (unset, the worker writes into a private buffer).

Run: .venv/bin/python bench/metrics_cost.py
"""

from __future__ import annotations

import time
import timeit
from typing import Any

from sniport.http.accesslog import RequestLog
from sniport.metrics import Layout, RouteCells, SharedMetrics

N = 2_000_000


class _Off:
    enabled = False
    json = False


class _Request:
    start = time.monotonic()


class _Exchange:
    def __init__(self, cells: RouteCells | None) -> None:
        self.mcells = cells
        self.status = 200
        self.stream_id = 0
        self.request = _Request()


def best(call: Any) -> float:
    return min(timeit.repeat(call, number=N, repeat=5)) / N


def main() -> None:
    layout = Layout(listeners=["a"], sites=["s"], routes=[("s", "/"), ("s", "")])
    shared = SharedMetrics(4, 1 << 12)
    view = shared.worker_metrics(0, layout).view
    log = RequestLog(_Off(), view)  # type: ignore[arg-type]
    now = time.monotonic() + 0.003
    counted = _Exchange(RouteCells(layout, "s", "/"))
    uncounted = _Exchange(None)
    on = best(lambda: log.request(None, counted, now))  # type: ignore[arg-type]
    off = best(lambda: log.request(None, uncounted, now))  # type: ignore[arg-type]
    empty = best(lambda: None)
    print(f"a request counted: {on * 1e9:.0f} ns; the call without cells: {off * 1e9:.0f} ns; "
          f"an empty call: {empty * 1e9:.0f} ns")


if __name__ == "__main__":
    main()
