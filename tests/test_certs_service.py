"""certs/acme_service.py: the long-running loop. Against a real pebble: it obtains a
certificate, renews it when its moment comes (a clock moved forward), and two instances on
one storage order once. Against a fake ACME server on a real socket: failures back off, say
what the CA said, become an ERROR (once an hour) close to expiry, never end the loop; the
CA's renewal window (ARI) moves a renewal earlier and the order names what it replaces."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from cryptography import x509
from support.fakeacme import FakeAcme, Reply, problem
from support.memstorage import MemoryStorage
from support.pebble import PebbleInfo, start_pebble

from sniport.certs.acme_service import AcmeSettings, CertState, ManagedCert, run_service
from sniport.wire import acme

NAMES = ("www.sniport.test", "sniport.test")
DAY = 86400.0


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[PebbleInfo]:
    info = start_pebble(tmp_path, always_valid=True, validity=30, nonce_reject=0)
    try:
        yield info
    finally:
        info.stop()


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sniport")
    return caplog


class Reports:
    def __init__(self) -> None:
        self.calls: list[list[CertState]] = []

    def __call__(self, states: list[CertState]) -> None:
        self.calls.append(states)

    @property
    def last(self) -> CertState:
        return self.calls[-1][0]


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout

    def holds() -> bool:
        try:
            return pred()
        except IndexError:  # nothing reported yet
            return False

    while not holds():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def service(settings: AcmeSettings, storage: MemoryStorage, report: Reports,
                  **kw: Any) -> Any:
    task = asyncio.create_task(run_service(settings, storage, [ManagedCert("site", NAMES)],
                                           report, **kw))
    try:
        yield task
    finally:
        assert not task.done(), task  # nothing but cancellation ends it
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


def leaf_of(storage: MemoryStorage) -> x509.Certificate:
    stored = storage.load_certificate(NAMES)
    assert stored is not None
    return x509.load_pem_x509_certificates(stored.chain_pem)[0]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level
            and r.name.startswith("sniport")]


# --- against pebble ----------------------------------------------------------------------


def test_obtains_then_renews(pebble: PebbleInfo, caplog_info: pytest.LogCaptureFixture) -> None:
    storage = MemoryStorage()
    report = Reports()
    settings = AcmeSettings(pebble.directory_url, pebble.ca_file, "ops@sniport.test",
                            ("http-01",), None, timeout=10)

    # 30-second certificates, renewed a third of their life before the end: 20 s in. The
    # clock is 25 s ahead while the first certificate is the one stored.
    def clock() -> float:
        return time.time() + (25.0 if storage.saves == 1 else 0.0)

    async def main() -> None:
        # lock_stale 0.2: refreshed every 0.05 s while ordering, so refreshes are seen.
        async with service(settings, storage, report, clock=clock, max_sleep=0.05,
                           lock_stale=0.2):
            await until(lambda: storage.saves == 1)
            first = leaf_of(storage)
            await until(lambda: storage.saves == 2)
            second = leaf_of(storage)
            await until(lambda: report.last.not_after == second.not_valid_after_utc.timestamp())
        assert first.serial_number != second.serial_number
        assert first.public_key() != second.public_key()  # a new key per certificate
        state = report.last
        lifetime = (second.not_valid_after_utc - second.not_valid_before_utc).total_seconds()
        assert state.next_renewal == pytest.approx(
            second.not_valid_after_utc.timestamp() - lifetime / 3)
        assert (state.site, state.names, state.source) == ("site", NAMES, "acme")
        assert state.failures == 0 and state.last_error == "" and "Pebble" in state.issuer
        json.dumps([dataclasses.asdict(s) for s in report.calls[-1]])  # JSON-able

    run(main())
    info = messages(caplog_info, logging.INFO)
    assert any("obtained (not after" in m and "www.sniport.test" in m for m in info), info
    assert any("renewed (not after" in m for m in info), info
    assert storage.refreshes > 0  # the lock was kept fresh while ordering
    assert not storage.locks  # and released


def test_two_instances_order_once(pebble: PebbleInfo) -> None:
    storage = MemoryStorage()
    a, b = Reports(), Reports()
    settings = AcmeSettings(pebble.directory_url, pebble.ca_file, "", ("http-01",), None,
                            timeout=10)

    async def main() -> None:
        # Another process holds the lock for these names: no order while it does.
        held = storage.try_lock(NAMES, 600)
        assert held is not None
        async with service(settings, storage, a, max_sleep=0.05):
            await asyncio.sleep(0.4)
            assert storage.saves == 0 and storage.locks_taken == 1
            async with service(settings, storage, b, max_sleep=0.05):
                held.release()
                await until(lambda: storage.saves == 1)
                not_after = leaf_of(storage).not_valid_after_utc.timestamp()
                await until(lambda: a.last.not_after == not_after == b.last.not_after)
                await asyncio.sleep(0.3)  # both had ticks enough to order again
        assert storage.saves == 1

    run(main())


# --- against a fake ACME server ----------------------------------------------------------


def seed(storage: MemoryStorage, now: float, *, age_days: float, left_days: float) -> None:
    ca = trustme.CA()
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    leaf = ca.issue_cert(*NAMES, not_before=when - datetime.timedelta(days=age_days),
                         not_after=when + datetime.timedelta(days=left_days))
    storage.save_certificate(NAMES, leaf.cert_chain_pems[0].bytes() + ca.cert_pem.bytes(),
                             leaf.private_key_pem.bytes())


def test_failures_back_off_and_say_why(tmp_path: Path,
                                       caplog_info: pytest.LogCaptureFixture) -> None:
    storage = MemoryStorage()
    report = Reports()
    now = time.time()
    seed(storage, now, age_days=80, left_days=1)  # due, and close to expiry
    clock = FakeClock(now)

    async def main() -> None:
        async with FakeAcme(tmp_path) as fake:
            fake.routes["/account"] = lambda hit: problem(
                503, "serverInternal", "the CA is down for maintenance")
            settings = AcmeSettings(fake.url("/dir"), fake.ca_file, "", ("http-01",), None,
                                    timeout=2)
            async with service(settings, storage, report, clock=clock, max_sleep=0.02):
                await until(lambda: report.last.failures == 1)
                assert report.last.next_renewal == pytest.approx(now + 60)
                assert "the CA is down for maintenance" in report.last.last_error
                await asyncio.sleep(0.1)  # backing off: no new attempt
                assert report.last.failures == 1
                clock.t += 61
                await until(lambda: report.last.failures == 2)
                assert report.last.next_renewal == pytest.approx(now + 61 + 120)
                clock.t += 3600
                await until(lambda: report.last.failures == 3)
                assert report.last.next_renewal == pytest.approx(now + 3661 + 240)
            # The directory is fetched again after each failure.
            assert fake.paths().count("/dir") >= 3
            assert fake.paths().count("/account") == 3
        assert storage.saves == 1  # only the seed

    run(main())
    errors = messages(caplog_info, logging.ERROR)
    warnings = messages(caplog_info, logging.WARNING)
    # Close to expiry: an ERROR, but once an hour; the failure in between is a warning.
    assert len(errors) == 2, errors
    assert all("cannot be renewed" in m and "the CA is down for maintenance" in m
               for m in errors)
    assert any("failure 2" in m and "the CA is down for maintenance" in m for m in warnings)


def test_garbage_and_timeouts_are_failures(tmp_path: Path,
                                           caplog_info: pytest.LogCaptureFixture) -> None:
    storage = MemoryStorage()
    report = Reports()
    clock = FakeClock(time.time())

    async def main() -> None:
        async with FakeAcme(tmp_path) as fake:
            fake.routes["/dir"] = lambda hit: Reply(200, [], b"}{ not json")
            settings = AcmeSettings(fake.url("/dir"), fake.ca_file, "", ("http-01",), None,
                                    timeout=0.3)
            async with service(settings, storage, report, clock=clock, max_sleep=0.02):
                await until(lambda: report.last.failures == 1)
                assert "not a JSON object" in report.last.last_error
                assert report.last.not_after is None
                fake.routes["/dir"] = lambda hit: Reply(hang=True)
                clock.t += 61
                await until(lambda: report.last.failures == 2)
                assert "no answer within 0.3s" in report.last.last_error
                fake.routes["/dir"] = lambda hit: Reply(
                    raw=b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"newNonce\": ")
                clock.t += 121
                await until(lambda: report.last.failures == 3)
                assert "closed in the middle of the response body" in report.last.last_error

    run(main())
    warnings = messages(caplog_info, logging.WARNING)
    assert any("not a JSON object" in m and "www.sniport.test" in m for m in warnings)
    assert any("no answer within" in m for m in warnings)
    assert not messages(caplog_info, logging.ERROR)  # nothing close to expiry: warnings only


class BrokenStorage(MemoryStorage):
    def certificate_version(self, names: Sequence[str]) -> str | None:
        raise RuntimeError("disk on fire")


def test_unexpected_exception_is_a_failure(caplog_info: pytest.LogCaptureFixture) -> None:
    report = Reports()
    storage = BrokenStorage()

    async def main() -> None:
        settings = AcmeSettings("https://127.0.0.1:1/dir")
        async with service(settings, storage, report, clock=FakeClock(time.time()),
                           max_sleep=0.02):
            await until(lambda: report.last.failures == 1)
            assert "disk on fire" in report.last.last_error

    run(main())
    errors = [r for r in caplog_info.records if r.levelno == logging.ERROR]
    assert errors and "www.sniport.test" in errors[0].getMessage() and errors[0].exc_info


def test_ari_window_moves_renewal_earlier(tmp_path: Path) -> None:
    storage = MemoryStorage()
    report = Reports()
    now = time.time()
    seed(storage, now, age_days=10, left_days=80)  # our own moment: day 60, 50 days ahead
    clock = FakeClock(now)
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    windows = [(5, 6), (-2, -1)]  # days from now: later, the CA wants it renewed at once

    def ari(hit: Any) -> Reply:
        start, end = windows[0]
        body = {"suggestedWindow": {
            "start": (when + datetime.timedelta(days=start)).isoformat(),
            "end": (when + datetime.timedelta(days=end)).isoformat()}}
        return Reply(200, [("Retry-After", "100")], json.dumps(body).encode())

    async def main() -> None:
        async with FakeAcme(tmp_path, ari=True) as fake:
            fake.routes["/ari"] = ari
            fake.routes["/account"] = lambda hit: Reply(
                201, [("Location", fake.url("/acct/1")), ("Replay-Nonce", "abc")],
                b'{"status": "valid"}')
            fake.routes["/order"] = lambda hit: problem(400, "rejectedIdentifier",
                                                        "not today")
            settings = AcmeSettings(fake.url("/dir"), fake.ca_file, "", ("http-01",), None)
            async with service(settings, storage, report, clock=clock, rng=lambda: 0.5,
                               max_sleep=0.02):
                await until(lambda: report.last.next_renewal is not None
                            and report.last.next_renewal < now + 10 * DAY)
                assert report.last.next_renewal == pytest.approx(now + 5.5 * DAY)
                assert "/account" not in fake.paths()
                windows.pop(0)
                clock.t += 101  # Retry-After: ask again; now the window is in the past
                await until(lambda: report.last.failures == 1)
            orders = [h for h in fake.hits if h.path == "/order"]
            payload = json.loads(base64.urlsafe_b64decode(
                json.loads(orders[0].body)["payload"] + "=="))
            assert payload["replaces"] == acme.ari_cert_id(leaf_of(storage))  # RFC 9773 sec. 5
            assert "not today" in report.last.last_error

    run(main())
