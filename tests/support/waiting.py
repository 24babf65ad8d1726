"""Waiting for a condition: the one polling loop of the tests, and the bound of every wait."""

from __future__ import annotations

import time
from collections.abc import Callable

TIMEOUT = 10.0  # seconds: the upper bound of every single wait in these tests


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT,
               what: str | Callable[[], str] = "condition") -> float:
    """Poll ``cond`` until it holds; return the seconds it took. After ``timeout`` raise
    TimeoutError naming ``what`` (a text, or a function that writes it at that moment, e.g.
    with the log as it is then)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            text = what if isinstance(what, str) else what()
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {text}")
        time.sleep(0.02)
    return time.monotonic() - start
