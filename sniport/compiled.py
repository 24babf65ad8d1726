"""Which of sniport's hot modules run compiled (mypyc) and which run as plain Python.

Job: name the modules that ``pip install .`` compiles with mypyc (``setup.py`` reads
``HOT_MODULES`` from here, so the list exists once), and say at start which of them this
process runs compiled.

Rules:
- Nothing in sniport depends on which one runs: the compiled module is the same source,
  type-checked by ``mypy --strict``, and the tests run against the compiled build in CI.
- A machine without a C compiler (or with ``SNIPORT_PURE_PYTHON=1`` at install) gets the
  pure-Python modules; the log line at start says so, since requests then cost more CPU.
- A module on this list must not have subclasses in a module off it (mypyc refuses
  interpreted subclasses of compiled classes), so a base class and its subclasses are
  compiled together; ``tests/test_compiled.py`` checks the list for that.
"""

from __future__ import annotations

import importlib
from importlib.machinery import EXTENSION_SUFFIXES

# The per-request and per-connection paths (bench/PROFILES.md), and the modules whose
# classes subclass theirs (the ACME client's response collector, the HTTP/2 stream).
# (wire/h2_nghttp2.py's ctypes declarations are in wire/nghttp2_abi.py, not compiled:
# mypyc cannot compile a ctypes.Structure subclass.)
HOT_MODULES: tuple[str, ...] = (
    "sniport.deadlines",
    "sniport.iplimits",
    "sniport.routing",
    "sniport.net.conn",
    "sniport.net.listener",
    "sniport.net.passthrough",
    "sniport.net.poller",
    "sniport.net.relay",
    "sniport.net.tls",
    "sniport.wire.clienthello",
    "sniport.wire.detect",
    "sniport.wire.h1",
    "sniport.wire.h2",
    "sniport.wire.h2_nghttp2",
    "sniport.wire.httprules",
    "sniport.wire.proxyheaders",
    "sniport.http.accesslog",
    "sniport.http.engine",
    "sniport.http.exchange",
    "sniport.http.h2conn",
    "sniport.http.handlers",
    "sniport.http.proxy",
    "sniport.http.request",
    "sniport.http.site",
    "sniport.http.static",
    "sniport.http.upstream",
    "sniport.certs.acme_client",
)


def is_compiled(module: str) -> bool:
    """True when ``module`` was loaded from an extension module (mypyc's output)."""
    path = getattr(importlib.import_module(module), "__file__", None) or ""
    return path.endswith(tuple(EXTENSION_SUFFIXES))


def describe() -> str:
    """One line for the log at start: compiled, pure Python, or (a broken build) partly."""
    compiled = [m for m in HOT_MODULES if is_compiled(m)]
    if len(compiled) == len(HOT_MODULES):
        return f"compiled with mypyc ({len(compiled)} hot modules)"
    if not compiled:
        return ("pure Python (no compiled modules: installed without a C compiler or with "
                "SNIPORT_PURE_PYTHON=1; requests cost more CPU)")
    missing = ", ".join(m for m in HOT_MODULES if m not in compiled)
    return f"partly compiled ({len(compiled)} of {len(HOT_MODULES)}; pure Python: {missing})"
