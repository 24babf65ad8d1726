"""When to renew a certificate, and how long to wait after a failed order. Pure: no clock.

Rules:
- Renew ``renew_before`` seconds before notAfter; without it, when a third of the lifetime is
  left (a 90-day certificate at day 60, as Let's Encrypt and certbot do).
- With a renewal window from the CA (ARI, RFC 9773 section 4.2), renew at a uniformly random
  point of it (``pick`` in [0, 1), drawn by the caller), when that is earlier than our own
  moment: the CA can pull a renewal forward (a revocation coming), never push it past ours.
- The moment is never after notAfter.
- After a failure wait 1 minute, doubling per failure in a row, at most 4 hours; never give
  up (a certificate left to expire is worse than a CA asked every 4 hours).
- "Close to expiry" (worth an ERROR, not a warning): less than a sixth of the lifetime or 7
  days left, whichever is less.
"""

from __future__ import annotations

import datetime

from sniport.wire.acme import RenewalWindow

BACKOFF_FIRST = 60.0
BACKOFF_MAX = 4 * 3600.0
CLOSE_TO_EXPIRY = datetime.timedelta(days=7)


def renew_at(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    renew_before: float | None,
    ari: RenewalWindow | None,
    pick: float,
) -> datetime.datetime:
    lifetime = max(not_after - not_before, datetime.timedelta(0))
    if renew_before is None:
        before = lifetime / 3
    else:
        before = datetime.timedelta(seconds=max(renew_before, 0.0))
    due = not_after - before
    if ari is not None:
        pick = min(max(pick, 0.0), 1.0)
        point = ari.start + (ari.end - ari.start) * pick
        if point < due:
            due = point
    return min(due, not_after)


class Backoff:
    """Failures in a row -> the delay before the next try."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures = 0

    @staticmethod
    def delay_for(failures: int) -> float:
        if failures <= 0:
            return 0.0
        # 60 * 2**18 is far past the cap already; bounding the exponent keeps it a float.
        return min(BACKOFF_FIRST * 2.0 ** min(failures - 1, 32), BACKOFF_MAX)

    def failed(self) -> float:
        """One more failure: the delay until the next try."""
        self.failures += 1
        return self.delay_for(self.failures)

    def reset(self) -> None:
        self.failures = 0


def close_to_expiry(
    now: datetime.datetime, not_before: datetime.datetime, not_after: datetime.datetime
) -> bool:
    lifetime = max(not_after - not_before, datetime.timedelta(0))
    return not_after - now < min(lifetime / 6, CLOSE_TO_EXPIRY)
