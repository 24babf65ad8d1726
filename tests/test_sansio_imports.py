"""House rule 1 (DESIGN.md): protocol parsing is sans-IO; ``wire/`` and ``routing.py`` import no
asyncio, socket or ssl.

The honest form of the rule is about each module's own source: the stdlib helpers they use may
import ``socket`` themselves (``email.utils`` does), and ``routing`` reads the config model,
whose address module resolves names. So the source files are read with ``ast``; every import
statement counts, wherever it stands (top level, inside a function, under ``TYPE_CHECKING``),
and so do ``__import__("x")`` / ``importlib.import_module("x")`` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sniport

PACKAGE = Path(sniport.__file__).parent
PURE_FILES = [*sorted(PACKAGE.glob("wire/*.py")), PACKAGE / "routing.py"]
FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "uvloop"}
# The I/O side of sniport: a pure module importing it would pull the event loop in.
IO_PACKAGES = {"sniport.net", "sniport.http", "sniport.worker", "sniport.supervisor",
               "sniport.cli", "sniport.runtime"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` of module ``module``."""
    found: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from x import y" may import the submodule x.y.
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = (func.id if isinstance(func, ast.Name)
                      else func.attr if isinstance(func, ast.Attribute) else "")
            if (called in {"__import__", "import_module"} and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.append((node.lineno, node.args[0].value))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def violations(source: str, module: str) -> list[str]:
    out = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top in FORBIDDEN or any(name == p or name.startswith(p + ".") for p in IO_PACKAGES):
            out.append(f"{module}:{line} imports {name}")
    return out


def test_the_pure_modules_are_all_there() -> None:
    names = {module_name(p) for p in PURE_FILES}
    assert {"sniport.wire.clienthello", "sniport.wire.proxyproto", "sniport.wire.alerts",
            "sniport.routing"} <= names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: module_name(p))
def test_pure_module_imports_no_io(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), module_name(path)) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("import asyncio\n", ["m.x:1 imports asyncio"]),
    ("import socket as s\n", ["m.x:1 imports socket"]),
    ("import asyncio.events\n", ["m.x:1 imports asyncio.events"]),
    ("from ssl import SSLContext\n", ["m.x:1 imports ssl", "m.x:1 imports ssl.SSLContext"]),
    ("def f():\n    import selectors\n", ["m.x:2 imports selectors"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ssl\n",
     ["m.x:3 imports ssl"]),
    ("x = __import__('socket')\n", ["m.x:1 imports socket"]),
    ("import importlib\nm = importlib.import_module('asyncio')\n", ["m.x:2 imports asyncio"]),
    ("from sniport.net import relay\n",
     ["m.x:1 imports sniport.net", "m.x:1 imports sniport.net.relay"]),
    ("from sniport import worker\n", ["m.x:1 imports sniport.worker"]),
    ("import ipaddress, struct\nfrom dataclasses import dataclass\nimport sslkeylog\n", []),
    ("import socketserver_like\n", []),
])
def test_the_checker_itself(source: str, expected: list[str]) -> None:
    # The rule is only as good as its detector: it must see every form of import.
    assert violations(source, "m.x") == expected


def test_relative_imports_are_resolved() -> None:
    assert imported_modules("from . import clienthello\nfrom ..net import relay\n",
                            "sniport.wire.x") == [
        (1, "sniport.wire"), (1, "sniport.wire.clienthello"),
        (2, "sniport.net"), (2, "sniport.net.relay")]


def test_importing_the_wire_layer_starts_no_event_loop_and_no_tls() -> None:
    # In a fresh interpreter: neither asyncio nor ssl is loaded by the wire modules, directly or
    # through what they import. (socket is not checked here: email.utils imports it.)
    modules = [module_name(p) for p in sorted(PACKAGE.glob("wire/*.py"))
               if p.name != "__init__.py"]
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('asyncio', 'ssl', 'uvloop') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
