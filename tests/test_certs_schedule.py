"""certs/schedule.py: when a certificate is renewed, how long a failure waits, when a
failure becomes an ERROR. Tables for the cases the docstring names, hypothesis for the
promises (never after notAfter, backoff monotonic and capped)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniport.certs.schedule import BACKOFF_MAX, Backoff, close_to_expiry, renew_at
from sniport.wire.acme import RenewalWindow

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def window(start_days: float, end_days: float) -> RenewalWindow:
    return RenewalWindow(T0 + start_days * DAY, T0 + end_days * DAY, None, None)


@pytest.mark.parametrize(("lifetime_days", "renew_before", "ari", "pick", "expect_days"), [
    (90, None, None, 0.0, 60),  # a third of the lifetime left
    (90, 30 * 86400.0, None, 0.0, 60),
    (90, 10 * 86400.0, None, 0.0, 80),
    (7, None, None, 0.0, 7 * 2 / 3),  # short-lived: a third of its lifetime too
    (90, 200 * 86400.0, None, 0.0, -110),  # asked for more than the lifetime: due at once
    (90, None, window(40, 42), 0.0, 40),  # the CA's window is earlier: taken
    (90, None, window(40, 42), 0.5, 41),
    (90, None, window(40, 42), 0.999, 40 + 2 * 0.999),
    (90, None, window(70, 72), 0.5, 60),  # later than ours: ours holds
    (90, None, window(-5, -4), 0.5, -4.5),  # in the past (revocation coming): due at once
    (90, 0.0, window(95, 99), 0.5, 90),  # never after notAfter
])
def test_renew_at(lifetime_days: float, renew_before: float | None, ari: RenewalWindow | None,
                  pick: float, expect_days: float) -> None:
    due = renew_at(T0, T0 + lifetime_days * DAY, renew_before, ari, pick)
    assert abs((due - (T0 + expect_days * DAY)).total_seconds()) < 1e-3


@pytest.mark.parametrize(("failures", "delay"), [
    (1, 60), (2, 120), (3, 240), (8, 7680), (9, 14400), (10, 14400), (1000, 14400),
])
def test_backoff_table(failures: int, delay: float) -> None:
    assert Backoff.delay_for(failures) == delay


def test_backoff_counts_and_resets() -> None:
    b = Backoff()
    assert [b.failed() for _ in range(3)] == [60, 120, 240]
    assert b.failures == 3
    b.reset()
    assert b.failures == 0 and b.failed() == 60


@pytest.mark.parametrize(("lifetime_days", "left", "expect"), [
    (90, 8 * DAY, False),  # 7 days < 15 (a sixth): 7 days is the limit
    (90, 6 * DAY, True),
    (6, 1.1 * DAY, False),  # a sixth (1 day) < 7 days: 1 day is the limit
    (6, 0.9 * DAY, True),
    (90, -DAY, True),  # expired
    (90, 60 * DAY, False),
])
def test_close_to_expiry(lifetime_days: float, left: datetime.timedelta, expect: bool) -> None:
    not_after = T0 + lifetime_days * DAY
    assert close_to_expiry(not_after - left, T0, not_after) is expect


times = st.datetimes(min_value=datetime.datetime(2000, 1, 1),
                     max_value=datetime.datetime(2100, 1, 1), timezones=st.just(datetime.UTC))


@given(nb=times, lifetime=st.floats(0, 400 * 86400), renew_before=st.none() | st.floats(0, 1e9),
       ari=st.none() | st.tuples(times, st.floats(1, 1e8)),
       pick=st.floats(0, 1, exclude_max=True))
def test_due_never_after_not_after(nb: datetime.datetime, lifetime: float,
                                   renew_before: float | None,
                                   ari: tuple[datetime.datetime, float] | None,
                                   pick: float) -> None:
    na = nb + datetime.timedelta(seconds=lifetime)
    win = None if ari is None else RenewalWindow(ari[0], ari[0] + datetime.timedelta(
        seconds=ari[1]), None, None)
    due = renew_at(nb, na, renew_before, win, pick)
    assert due <= na
    assert due <= renew_at(nb, na, renew_before, None, pick)  # ARI only ever moves it earlier
    if win is not None and due < renew_at(nb, na, renew_before, None, pick):
        assert win.start <= due <= win.end


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_backoff_monotonic_and_capped(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert Backoff.delay_for(lo) <= Backoff.delay_for(hi) <= BACKOFF_MAX
    if hi >= 1:
        assert Backoff.delay_for(hi) >= 60
