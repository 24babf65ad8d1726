"""The compiled build (mypyc, issue 13): the tests run against it, and its module list holds.

``scripts/test`` installs with compilation on; a machine that cannot compile (or a developer
who set ``SNIPORT_PURE_PYTHON=1`` at install) runs the same tests on the plain modules, and
then only the checks here that need the compiled build are skipped, saying why.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from support.configs import passthrough_block, server_table, toml_lines
from support.process import SniportWith

from sniport import compiled

ROOT = Path(__file__).resolve().parent.parent
PURE = bool(os.environ.get("SNIPORT_PURE_PYTHON"))


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Every class defined in sniport, tests and bench: name -> [(module, node)]."""
    found: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for top in ("sniport", "tests", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append((_module_of(path), node))
    return found


def test_no_interpreted_subclass_of_a_compiled_class() -> None:
    # mypyc refuses it at run time ("interpreted classes cannot inherit from compiled"),
    # so a base and its subclasses must be compiled together (house list in compiled.py).
    hot = set(compiled.HOT_MODULES)
    classes = _classes()
    compiled_names = {name for name, defs in classes.items()
                      if any(module in hot for module, _ in defs)}
    offenders = []
    for name, defs in classes.items():
        for module, node in defs:
            if module in hot:
                continue
            for base in node.bases:
                base_name = base.attr if isinstance(base, ast.Attribute) else getattr(
                    base, "id", None)
                if base_name in compiled_names and all(
                        m in hot for m, _ in classes[base_name]):
                    offenders.append(f"{module}.{name}({base_name})")
    assert offenders == []


def test_every_hot_module_exists() -> None:
    for module in compiled.HOT_MODULES:
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), module


@pytest.mark.skipif(PURE, reason="SNIPORT_PURE_PYTHON: installed without compiling")
def test_the_tests_run_against_the_compiled_build() -> None:
    # scripts/test (and so CI) installs with mypyc: a build that silently fell back to
    # Python would leave the compiled code untested.
    assert [m for m in compiled.HOT_MODULES if not compiled.is_compiled(m)] == []
    assert compiled.describe() == f"compiled with mypyc ({len(compiled.HOT_MODULES)} hot modules)"


def test_the_log_at_start_says_which_build_runs(sniport_with: SniportWith, tmp_path: Path) -> None:
    s = sniport_with(server_table(extra=toml_lines(state_dir=tmp_path / "state"))
                     + passthrough_block("pt", ["pt.test"], ["127.0.0.1:9"]))
    s.wait_log(re.escape(f"Python code: {compiled.describe()}"))
