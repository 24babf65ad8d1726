"""The per-connection resolver (sniport/net/resolver.py): cache, negative cache expiry, one
lookup per name, the in-flight bound and the timeout.

The lookup function is injected here (a counter, or one that hangs on an Event) so that the
cache and timeout logic can be driven exactly; lookups still run in the resolver's real
thread pool, on a real uvloop loop. ``test_system_lookup_*`` use the machine's resolver
(``localhost`` is in every /etc/hosts); the end-to-end tests (test_passthrough_templates.py)
use only the real one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop

from sniport.net.resolver import Addresses, ResolveError, Resolver, system_lookup

ADDR: Addresses = ((socket.AF_INET, ("127.0.0.1", 0)),)


class Lookups:
    """A lookup that answers from a table, counts its calls, and may be held."""

    def __init__(self, answers: dict[str, Addresses]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, host: str) -> Addresses:
        self.calls.append(host)
        self.gate.wait(10)
        if host not in self.answers:
            raise ResolveError("Name or service not known")
        return self.answers[host]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def ask(loop: asyncio.AbstractEventLoop, resolver: Resolver, host: str,
        timeout: float = 2.0) -> tuple[Addresses | None, str]:
    """``cached`` then ``resolve``, as UpstreamConnect does; the outcome."""

    async def go() -> tuple[Addresses | None, str]:
        hit = resolver.cached(host)
        if isinstance(hit, tuple):
            return hit, ""
        if isinstance(hit, str):
            return None, hit
        done: asyncio.Future[tuple[Addresses | None, str]] = loop.create_future()
        waiter = resolver.resolve(host, timeout, lambda a, why: done.set_result((a, why)))
        if waiter is None:
            return None, "busy"
        return await done

    return loop.run_until_complete(go())


def make(loop: asyncio.AbstractEventLoop, lookup: Callable[[str], Addresses],
         **kw: float) -> Resolver:
    return Resolver(loop, lookup, **kw)  # type: ignore[arg-type]


def test_answer_is_cached(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    r = make(loop, lookups)
    assert ask(loop, r, "nas.lan") == (ADDR, "")
    assert ask(loop, r, "nas.lan") == (ADDR, "")
    assert lookups.calls == ["nas.lan"]
    r.close()


def test_positive_entry_expires(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    r = make(loop, lookups, ttl=0.1)
    ask(loop, r, "nas.lan")
    loop.run_until_complete(asyncio.sleep(0.15))
    assert r.cached("nas.lan") is None
    ask(loop, r, "nas.lan")
    assert lookups.calls == ["nas.lan", "nas.lan"]
    r.close()


def test_failure_is_remembered_then_expires(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({})
    r = make(loop, lookups, negative_ttl=0.2)
    assert ask(loop, r, "gone.lan") == (None, "Name or service not known")
    assert ask(loop, r, "gone.lan") == (None, "Name or service not known")  # from the cache
    assert lookups.calls == ["gone.lan"]
    loop.run_until_complete(asyncio.sleep(0.25))
    lookups.answers["gone.lan"] = ADDR  # the machine came up
    assert ask(loop, r, "gone.lan") == (ADDR, "")
    assert lookups.calls == ["gone.lan", "gone.lan"]
    r.close()


def test_empty_answer_is_a_failure(loop: asyncio.AbstractEventLoop) -> None:
    r = make(loop, Lookups({"empty.lan": ()}))
    assert ask(loop, r, "empty.lan") == (None, "no address")
    r.close()


def test_one_lookup_per_name_for_many_waiters(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    lookups.gate.clear()
    r = make(loop, lookups)
    got: list[tuple[Addresses | None, str]] = []

    async def go() -> None:
        for _ in range(5):
            assert r.resolve("nas.lan", 2.0, lambda a, why: got.append((a, why))) is not None
        await asyncio.sleep(0.05)
        lookups.gate.set()
        while len(got) < 5:
            await asyncio.sleep(0.01)

    loop.run_until_complete(go())
    assert got == [(ADDR, "")] * 5 and lookups.calls == ["nas.lan"]
    r.close()


def test_a_hanging_lookup_times_out_and_its_late_answer_is_cached(
        loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"slow.lan": ADDR})
    lookups.gate.clear()
    r = make(loop, lookups)
    start = loop.time()
    assert ask(loop, r, "slow.lan", timeout=0.2) == (None, "no answer within 0.2s")
    assert 0.18 <= loop.time() - start < 1.0
    lookups.gate.set()  # the thread's lookup finishes after all
    loop.run_until_complete(asyncio.sleep(0.1))
    assert r.cached("slow.lan") == ADDR
    assert lookups.calls == ["slow.lan"]
    r.close()


def test_in_flight_bound(loop: asyncio.AbstractEventLoop) -> None:
    """Past ``max_in_flight`` names being looked up (timed-out ones included: their threads
    are still busy) a new name fails at once; a cached name still answers."""
    lookups = Lookups({"a.lan": ADDR, "b.lan": ADDR, "c.lan": ADDR, "ok.lan": ADDR})
    r = make(loop, lookups, max_in_flight=2)
    ask(loop, r, "ok.lan")
    lookups.gate.clear()
    assert ask(loop, r, "a.lan", timeout=0.1) == (None, "no answer within 0.1s")
    assert ask(loop, r, "b.lan", timeout=0.1) == (None, "no answer within 0.1s")
    assert ask(loop, r, "c.lan") == (None, "busy")
    assert ask(loop, r, "ok.lan") == (ADDR, "")
    lookups.gate.set()
    loop.run_until_complete(asyncio.sleep(0.1))
    assert ask(loop, r, "c.lan") == (ADDR, "")
    r.close()


def test_cache_bounds_keep_failures_apart(loop: asyncio.AbstractEventLoop) -> None:
    """Made-up names fill the failure cache, not the answers'; each is LRU-bounded."""
    lookups = Lookups({f"m{i}.lan": ADDR for i in range(3)})
    r = make(loop, lookups, max_positive=2, max_negative=2)
    for i in range(3):
        ask(loop, r, f"m{i}.lan")
    assert r.cached("m0.lan") is None and r.cached("m2.lan") == ADDR
    for i in range(10):
        ask(loop, r, f"junk{i}.lan")
    assert r.cached("m1.lan") == ADDR and r.cached("m2.lan") == ADDR
    assert r.cached("junk0.lan") is None and isinstance(r.cached("junk9.lan"), str)
    r.close()


def test_cancelled_waiter_is_not_called(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    lookups.gate.clear()
    r = make(loop, lookups)
    called: list[str] = []

    async def go() -> None:
        waiter = r.resolve("nas.lan", 0.2, lambda a, why: called.append(why))
        assert waiter is not None
        waiter.cancel()
        await asyncio.sleep(0.3)
        lookups.gate.set()
        await asyncio.sleep(0.1)

    loop.run_until_complete(go())
    assert called == [] and r.cached("nas.lan") == ADDR
    r.close()


def test_system_lookup_localhost() -> None:
    found = system_lookup("localhost")
    assert (socket.AF_INET, ("127.0.0.1", 0)) in found


def test_system_lookup_failure() -> None:
    with pytest.raises(ResolveError):
        system_lookup("nosuch-sniport-name.invalid")


def test_a_failed_refresh_serves_the_stale_answer(loop: asyncio.AbstractEventLoop) -> None:
    """RFC 8767: a machine reachable a moment ago is not cut by a resolver hiccup; while the
    failure is remembered the stale answer comes straight from the cache."""
    lookups = Lookups({"nas.lan": ADDR})
    r = make(loop, lookups, ttl=0.1, negative_ttl=0.3, stale_ttl=5.0)
    assert ask(loop, r, "nas.lan") == (ADDR, "")
    loop.run_until_complete(asyncio.sleep(0.15))
    del lookups.answers["nas.lan"]  # DNS fails now
    assert ask(loop, r, "nas.lan") == (ADDR, "")
    assert ask(loop, r, "nas.lan") == (ADDR, "")  # from the cache: no third lookup
    assert lookups.calls == ["nas.lan", "nas.lan"]
    r.close()


def test_a_hanging_refresh_serves_the_stale_answer(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    r = make(loop, lookups, ttl=0.1, stale_ttl=5.0)
    ask(loop, r, "nas.lan")
    loop.run_until_complete(asyncio.sleep(0.15))
    lookups.gate.clear()  # the refresh hangs
    assert ask(loop, r, "nas.lan", timeout=0.2) == (ADDR, "")
    lookups.gate.set()
    r.close()


def test_a_stale_answer_is_let_go_after_stale_ttl(loop: asyncio.AbstractEventLoop) -> None:
    lookups = Lookups({"nas.lan": ADDR})
    r = make(loop, lookups, ttl=0.1, stale_ttl=0.1)
    ask(loop, r, "nas.lan")
    loop.run_until_complete(asyncio.sleep(0.25))
    del lookups.answers["nas.lan"]
    assert ask(loop, r, "nas.lan") == (None, "Name or service not known")
    r.close()
