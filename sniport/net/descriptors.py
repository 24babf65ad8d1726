"""The worker's descriptor ledger: how many file descriptors its connections hold.

Job: let the worker stop accepting *before* the process runs out of descriptors, by counting
what connections really hold (a passthrough connection holds its two sockets, and up to two
pipes, four descriptors more, while bytes are in flight; a terminated one its socket and a
pooled upstream connection) instead of assuming two per connection.

Rules: every place that opens a descriptor for a connection takes it here, and gives it
back when it closes it; ``room(n)`` says whether ``n`` more fit under the limit (the soft
RLIMIT_NOFILE less a reserve for listeners, logs and the event loop's own). The ledger is a
guide for accepting, not a guarantee: EMFILE can still happen (another library, a miscount)
and every place that opens a descriptor survives it with a log line.
"""

from __future__ import annotations

import resource

RESERVE = 128  # descriptors kept for listeners, log files, epoll, the loop's self-pipe
MOST_PER_CONNECTION = 6  # a passthrough connection with data in flight both ways
# Kept free of new connections' sockets: pipes for the relays already running, so that a
# process at its limit still moves bytes (a relay holds a pipe only while its destination
# lags) instead of every relay waiting for one.
PIPE_HEADROOM = 16


class Ledger:
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # descriptors connections may hold in all
        self.used = 0

    def take(self, n: int = 1) -> None:
        self.used += n

    def give(self, n: int = 1) -> None:
        self.used -= n

    def room(self, n: int = 1) -> bool:
        return self.used + n <= self.limit

    def room_for_a_connection(self) -> bool:
        return self.used + MOST_PER_CONNECTION + PIPE_HEADROOM <= self.limit


def soft_limit() -> int:
    """RLIMIT_NOFILE's soft limit, raised to the hard limit first when allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# One per process: a worker is one process with one event loop.
LEDGER = Ledger(1 << 30)
