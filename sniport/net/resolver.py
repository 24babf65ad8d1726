"""Resolving names per connection, for upstream templates (``{label}.lan:443``).

Job: turn a host name into the addresses to connect to without ever blocking the event
loop, within a timeout, with a small cache and a bound on the work in flight.

How and why (README "Upstreams from the name"):
- ``getaddrinfo`` blocks, so it runs in a small thread pool of this worker (``THREADS``),
  through ``run_in_executor``: plain callbacks on a Future, no Task per connection. It uses
  the machine's resolver as configured (``/etc/hosts``, ``/etc/nsswitch.conf``, DNS), as the
  names of fixed upstreams do at load.
- One lookup per name at a time: connections asking for a name already being looked up wait
  for that lookup (a burst for one machine costs one lookup).
- At most ``MAX_IN_FLIGHT`` names are looked up at once. A thread stuck in a lookup cannot be
  stopped, so a lookup that timed out still counts until it returns; past the bound a new
  name fails at once ("resolver busy") rather than queueing without end, while cached names
  go on working.
- The wait is bounded by the caller's timeout (the block's ``connect_timeout``): on expiry
  that connection goes on without the name (the next upstream, or the end); the lookup
  itself finishes in its thread and its answer is cached for the others.
- Cache: an answer is kept ``POSITIVE_TTL`` seconds (30 s, like nginx ``resolver valid=30s``:
  a machine that moves is found within half a minute, and a burst of connections to one
  name costs one lookup), a failure ``NEGATIVE_TTL`` seconds (5 s: long enough that a flood of
  connections for a name that does not exist costs one lookup per 5 s, short enough that a
  machine just switched on is reachable almost at once). getaddrinfo reports no DNS TTL, so
  these are fixed. Bounded: ``MAX_POSITIVE`` answers and ``MAX_NEGATIVE`` failures, each the
  least recently used out first; failures are kept apart so that a client sending made-up
  names cannot push the good answers out.
- Stale answers (RFC 8767): an expired answer is kept up to ``STALE_TTL`` more; when the
  lookup that refreshes it fails or times out, it is used instead of the failure (and, while
  that failure is remembered, straight from the cache).

Rules: one ``Resolver`` per event loop (``resolver_for``); the lookup function is a
parameter so that the cache and timeout logic can be tested with a resolver that hangs.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sniport.deadlines import deadlines_for
from sniport.logs import diag

POSITIVE_TTL = 30.0  # seconds an answer is used
NEGATIVE_TTL = 5.0  # seconds a failure is remembered
# Seconds an expired answer may still be used when its refresh fails or does not come in
# time (RFC 8767, serving stale data: a DNS hiccup must not cut a machine that was reachable
# a minute ago; bounded, so a machine that is gone for good is let go).
STALE_TTL = 3600.0
MAX_POSITIVE = 1024  # answers cached per worker
MAX_NEGATIVE = 256  # failures cached per worker
# Names being looked up at once per worker, each on a thread of its own: a lookup that hangs
# never makes another name queue behind it for a thread (it would time out there instead of
# failing at once as "resolver busy").
MAX_IN_FLIGHT = 8
THREADS = MAX_IN_FLIGHT  # getaddrinfo threads per worker

Addresses = tuple[tuple[int, Any], ...]  # (family, sockaddr with port 0)
Lookup = Callable[[str], Addresses]  # blocking; raises ResolveError
Done = Callable[[Addresses | None, str], None]  # (addresses, "") or (None, why)


class ResolveError(Exception):
    """The name does not resolve; the message says why."""


def system_lookup(host: str) -> Addresses:
    """The machine's resolver: addresses for TCP, in its order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(exc.strerror or str(exc)) from None
    except UnicodeError as exc:  # a label the IDNA codec refuses (never LDH: defensive)
        raise ResolveError(str(exc)) from None
    out: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        item = (int(family), sockaddr)
        if item not in out:
            out.append(item)
    return tuple(out)


def with_port(sockaddr: Any, port: int) -> Any:
    """A resolved (port 0) IPv4 or IPv6 socket address with ``port``."""
    return (sockaddr[0], port, *sockaddr[2:])


class Waiter:
    """One connection waiting for a lookup; ``cancel()`` when it no longer wants it."""

    __slots__ = ("_done", "_host", "_resolver", "deadline", "deadline_slot", "timeout")

    def __init__(self, resolver: Resolver, host: str, timeout: float, done: Done) -> None:
        self._resolver = resolver
        self._host = host
        self.timeout = timeout
        self._done: Done | None = done
        self.deadline = 0.0
        self.deadline_slot = 0

    def cancel(self) -> None:
        self._done = None
        self._resolver._forget(self)

    def expired(self, now: float) -> None:
        done, self._done = self._done, None
        self._resolver._forget(self)
        if done is not None:
            stale = self._resolver.stale(self._host)
            if stale is not None:
                done(stale, "")
            else:
                done(None, f"no answer within {self.timeout:g}s")

    def _answer(self, addresses: Addresses | None, why: str) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(addresses, why)


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop, lookup: Lookup = system_lookup, *,
                 ttl: float = POSITIVE_TTL, negative_ttl: float = NEGATIVE_TTL,
                 stale_ttl: float = STALE_TTL,
                 max_positive: int = MAX_POSITIVE, max_negative: int = MAX_NEGATIVE,
                 max_in_flight: int = MAX_IN_FLIGHT, threads: int = THREADS) -> None:
        self._loop = loop
        self._lookup = lookup
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_ttl = stale_ttl
        self._max_positive = max_positive
        self._max_negative = max_negative
        self._max_in_flight = max_in_flight
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None  # started at the first lookup
        self._positive: OrderedDict[str, tuple[float, Addresses]] = OrderedDict()
        self._negative: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._in_flight: dict[str, list[Waiter]] = {}
        self.lookups = 0  # lookups started (for tests and debugging)

    def cached(self, host: str) -> Addresses | str | None:
        """The cached answer (addresses), failure (why), or None when not cached (or stale)."""
        now = self._loop.time()
        hit = self._positive.get(host)
        if hit is not None:
            if hit[0] > now:
                self._positive.move_to_end(host)
                return hit[1]
            if hit[0] + self._stale_ttl <= now:
                del self._positive[host]
                hit = None
        miss = self._negative.get(host)
        if miss is not None:
            if miss[0] > now:
                self._negative.move_to_end(host)
                # Its refresh failed a moment ago: the stale answer, if any, over the failure.
                return hit[1] if hit is not None else miss[1]
            del self._negative[host]
        return None

    def stale(self, host: str) -> Addresses | None:
        """An expired answer for ``host`` still within ``STALE_TTL``, if any."""
        hit = self._positive.get(host)
        if hit is not None and hit[0] + self._stale_ttl > self._loop.time():
            return hit[1]
        return None

    def resolve(self, host: str, timeout: float, done: Done) -> Waiter | None:
        """Look ``host`` up (not cached: ask ``cached`` first); ``done`` is called once, later,
        with the addresses or the reason there are none. None (and ``done`` not called) when
        too many names are being looked up: the caller takes that as a failure at once."""
        waiters = self._in_flight.get(host)
        if waiters is None:
            if len(self._in_flight) >= self._max_in_flight:
                return None
            waiters = self._in_flight[host] = []
            try:
                self._start(host)
            except RuntimeError as exc:  # no thread could be started: this name fails now
                del self._in_flight[host]
                diag.warning("resolver: cannot look %s up: %s", host, exc)
                return None
        waiter = Waiter(self, host, timeout, done)
        waiters.append(waiter)
        deadlines_for(self._loop).after(waiter, timeout)
        return waiter

    def _start(self, host: str) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads,
                                                thread_name_prefix="sniport-resolve")
        self.lookups += 1
        future = self._loop.run_in_executor(self._executor, self._lookup, host)
        future.add_done_callback(lambda f: self._finished(host, f))

    def _finished(self, host: str, future: asyncio.Future[Addresses]) -> None:
        waiters = self._in_flight.pop(host, [])
        now = self._loop.time()
        addresses: Addresses | None = None
        why = ""
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled():
            why = "lookup cancelled"
        elif isinstance(exc, ResolveError):
            why = str(exc)
        elif exc is not None:
            why = f"{type(exc).__name__}: {exc}"
        else:
            addresses = future.result()
            if not addresses:
                addresses, why = None, "no address"
        if addresses is not None:
            self._remember(self._positive, host, (now + self._ttl, addresses), self._max_positive)
            diag.debug("resolver: %s -> %s (cached %gs)", host,
                       ", ".join(str(sa[0]) for _, sa in addresses), self._ttl)
        else:
            self._remember(self._negative, host, (now + self._negative_ttl, why),
                           self._max_negative)
            diag.debug("resolver: %s: %s (remembered %gs)", host, why, self._negative_ttl)
            stale = self.stale(host)
            if stale is not None:
                diag.debug("resolver: %s: using the expired answer (RFC 8767)", host)
                addresses, why = stale, ""
        for waiter in waiters:
            self._forget(waiter, listed=False)
            try:
                waiter._answer(addresses, why)
            except Exception:  # one connection's bug costs that connection only (rule 6)
                diag.exception("resolver: a waiter for %s failed", host)

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], host: str, entry: Any, bound: int) -> None:
        cache[host] = entry
        cache.move_to_end(host)
        while len(cache) > bound:
            cache.popitem(last=False)

    def _forget(self, waiter: Waiter, *, listed: bool = True) -> None:
        deadlines_for(self._loop).clear(waiter)
        if listed:
            waiters = self._in_flight.get(waiter._host)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)  # the lookup goes on: its answer is cached

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_by_loop: dict[asyncio.AbstractEventLoop, Resolver] = {}


def resolver_for(loop: asyncio.AbstractEventLoop) -> Resolver:
    """The loop's Resolver (one per worker process), made at the first templated upstream."""
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = Resolver(loop)
    return found
