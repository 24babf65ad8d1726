"""Deadlines: the one timer facility of a worker (every timeout of every connection).

Job: call ``item.expired(now)`` once ``item.deadline`` (event-loop time) has passed, for
thousands of items, where setting or moving a deadline is the common operation (every
request of a keep-alive connection moves its deadline; almost none ever expires).

How: deadlines are filed in slots of ``TICK`` seconds, one event-loop timer for the earliest
slot. Moving a deadline *later* costs an attribute write and nothing else: the item stays
in its earlier slot, and when that slot comes it is filed again under its new deadline.
Moving it *earlier* moves it to the earlier slot. ``clear`` takes it out of its slot at
once: an item that is done (a closed connection, a finished request) must not stay
referenced until its deadline's slot comes, an hour later for an idle relay (measured: the
proxy's finished exchanges, kept for their 60 s timeout, cost 16% more CPU per request).
A timeout fires at most one ``TICK`` after its deadline, and never more than ``SLACK``
before it.

Rules: one ``Deadlines`` per event loop (``deadlines_for``); whoever sets a deadline calls
``clear`` when the item is done; ``expired`` is called with the item no longer filed, so it
may set a new deadline; an exception in ``expired`` is logged and costs that item only
(house rule 6), never the others of the slot or the worker.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol

from sniport.logs import diag

TICK = 0.05  # seconds: the resolution of every timeout
SLACK = 0.002  # seconds a deadline may be declared passed early (the loop clock's steps)
_PER_SECOND = 1.0 / TICK


class Timed(Protocol):
    """What can have a deadline: two attributes and a callback."""

    deadline: float  # event-loop time; 0.0: none
    deadline_slot: int  # where it is filed (0: nowhere); Deadlines' own bookkeeping

    def expired(self, now: float) -> None: ...


class Deadlines:
    __slots__ = ("_heap", "_loop", "_slots", "_timer", "_timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, dict[Timed, None]] = {}  # slot -> its items, in filing order
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0

    def set(self, item: Timed, when: float) -> None:
        """``item.expired`` runs once the loop time passes ``when`` (0: never)."""
        if not when:
            self.clear(item)
            return
        item.deadline = when
        slot = int(when * _PER_SECOND) + 1  # the first slot boundary after ``when``
        filed = item.deadline_slot
        if filed:
            if filed <= slot:
                return  # filed earlier: it is looked at then, and filed again if still waiting
            bucket = self._slots.get(filed)
            if bucket is not None:
                bucket.pop(item, None)
        self._file(item, slot)

    def after(self, item: Timed, delay: float) -> None:
        """``set(item, now + delay)``; a delay of 0 clears the deadline."""
        self.set(item, self._loop.time() + delay if delay else 0.0)

    def clear(self, item: Timed) -> None:
        """No deadline any more; the item is not referenced from here after this."""
        item.deadline = 0.0
        filed = item.deadline_slot
        if filed:
            item.deadline_slot = 0
            bucket = self._slots.get(filed)
            if bucket is not None:
                bucket.pop(item, None)

    def _file(self, item: Timed, slot: int) -> None:
        item.deadline_slot = slot
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket[item] = None
            return
        self._slots[slot] = {item: None}
        heapq.heappush(self._heap, slot)
        if self._timer is None or slot < self._timer_slot:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * TICK, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        # The loop's clock has millisecond steps: a timer may run a hair before its slot
        # boundary, and that slot is due all the same (else it would be re-armed at once).
        now_due = now + SLACK
        due = int(now_due * _PER_SECOND)  # slots up to this one have begun
        heap, slots = self._heap, self._slots
        while heap and heap[0] <= due:
            slot = heapq.heappop(heap)
            for item in slots.pop(slot):
                if item.deadline_slot != slot:
                    continue  # cleared or moved by an item expired before it in this slot
                item.deadline_slot = 0
                when = item.deadline
                if not when:
                    continue
                if when <= now_due:
                    try:
                        item.expired(now)
                    except Exception:
                        diag.exception("a timeout handler failed (%s)", type(item).__name__)
                else:
                    self._file(item, int(when * _PER_SECOND) + 1)
        # Filing above (or a handler) may have armed the timer for a later slot than the
        # earliest left. (_rearm reads self._timer afresh: here mypy would take it for the
        # None assigned above, and the compiled build checks that at run time.)
        self._rearm()

    def _rearm(self) -> None:
        heap = self._heap
        if heap and (self._timer is None or heap[0] < self._timer_slot):
            self._arm(heap[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._heap.clear()


_by_loop: dict[asyncio.AbstractEventLoop, Deadlines] = {}


def deadlines_for(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The loop's Deadlines (one per worker process)."""
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = Deadlines(loop)
    return found
