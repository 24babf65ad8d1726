"""One access-log line per HTTP request, and its count in the metrics.

Rules: the combined log format plus SNI, Host, time to first byte and total time by default;
one JSON object with the same fields when ``log_format = "json"``. Formatted only when the
log is on. Every request of a site is counted (status class, protocol, duration) in the
worker's metrics slot whether the log is on or not: two indexed adds and a bisect.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from sniport.logs import AccessLog, clf_quoted, text_field
from sniport.metrics import DURATION_BUCKETS, SUM_OFFSET

if TYPE_CHECKING:
    from sniport.http.contract import Connection, Exchange


def _clf_time() -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())


class RequestLog:
    __slots__ = ("_log", "_view", "enabled")

    def __init__(self, log: AccessLog, view: memoryview | None = None) -> None:
        self._log = log
        self.enabled = log.enabled
        # The worker's metrics slot (metrics.WorkerMetrics.view); a private one if none.
        self._view = view if view is not None else memoryview(bytearray(8)).cast("q")

    def request(self, conn: Connection, ex: Exchange, now: float) -> None:
        req = ex.request
        cells = ex.mcells
        if cells is not None and ex.status:  # 0: gone before any response; not a status
            view = self._view
            status = ex.status // 100
            klass = status - 1 if 1 <= status <= 5 else 4
            view[cells.requests[klass * 2 + (ex.stream_id != 0)]] += 1
            elapsed = now - req.start
            view[cells.duration + bisect_left(DURATION_BUCKETS, elapsed)] += 1
            view[cells.duration + SUM_OFFSET] += int(elapsed * 1_000_000)
        if not self.enabled:
            return
        ttfb = round(ex.ttfb - req.start, 6) if ex.ttfb else None
        total = round(now - req.start, 6)
        if self._log.json:
            fields: dict[str, Any] = {
                "client": conn.client, "sni": conn.sni, "host": req.header(b"host"),
                "method": req.method, "path": req.target, "version": req.version,
                "status": ex.status, "bytes": ex.sent, "referer": req.header(b"referer"),
                "user_agent": req.header(b"user-agent"), "route": ex.route_name,
                "ttfb": ttfb, "total": total,
            }
            if ex.stream_id:
                fields["stream"] = ex.stream_id
            if ex.upstream:
                fields["upstream"] = ex.upstream
            if ex.note:
                fields["note"] = ex.note
            self._log.write("req", fields)
            return
        ip = conn.client.rsplit(":", 1)[0].strip("[]") if conn.client != "unix" else "unix"
        request_line = f"{req.method} {req.target} HTTP/{req.version}"
        line = (f'{ip} - - [{_clf_time()}] {clf_quoted(request_line)} {ex.status} {ex.sent} '
                f'{clf_quoted(req.header(b"referer"))} {clf_quoted(req.header(b"user-agent"))} '
                f'sni={text_field(conn.sni)} host={text_field(req.header(b"host"))} '
                f'ttfb={ttfb if ttfb is not None else "-"} total={total}')
        if ex.stream_id:
            line += f" stream={ex.stream_id}"
        if ex.upstream:
            line += f" upstream={text_field(ex.upstream)}"
        if ex.note:
            line += f" note={clf_quoted(ex.note)}"
        self._log.write_line(line)
