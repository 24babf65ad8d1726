"""Build sniport's hot modules with mypyc, falling back to pure Python.

Everything else about the package is in pyproject.toml. ``sniport/compiled.py`` names the
modules (one list for the build and for the log line at start). The compiled extensions are
optional: where no C compiler is present the build says so and installs the same modules as
plain Python; ``SNIPORT_PURE_PYTHON=1`` asks for that on purpose (say, while editing them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent


def _hot_modules() -> tuple[str, ...]:
    sys.path.insert(0, str(HERE))
    try:
        from sniport.compiled import HOT_MODULES
    finally:
        sys.path.pop(0)
    return HOT_MODULES


def _remove_built_in_place() -> None:
    """An earlier editable install left compiled modules beside the sources, and Python
    imports those before the .py files: remove them, or "pure Python" would not be."""
    built = [*HERE.glob("*__mypyc.*.so")]
    for module in _hot_modules():
        source = HERE.joinpath(*module.split("."))
        built += source.parent.glob(f"{source.name}.*.so")
    for path in built:
        path.unlink()
    if built:
        print(f"sniport: removed {len(built)} compiled module(s) of an earlier build",
              file=sys.stderr)


def _extensions() -> list[Extension]:
    if os.environ.get("SNIPORT_PURE_PYTHON"):
        print("sniport: SNIPORT_PURE_PYTHON is set: installing pure Python", file=sys.stderr)
        _remove_built_in_place()
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        print(f"sniport: mypyc unavailable ({exc}): installing pure Python", file=sys.stderr)
        return []
    paths = [str(Path(*m.split("."))) + ".py" for m in _hot_modules()]
    os.chdir(HERE)  # mypyc resolves the paths and pyproject's [tool.mypy] from here
    extensions = mypycify(paths, opt_level="3", group_name="sniport_native")
    for ext in extensions:
        # A failed compile (no C compiler, no Python headers) is a warning from build_ext,
        # and the .py modules that are installed anyway are used instead.
        ext.optional = True
    return extensions


setup(ext_modules=_extensions())
