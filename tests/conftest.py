from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from support.pki import Pki
from support.process import Ops, Sniport, SniportWith, start_sniport

from sniport.compiled import HOT_MODULES

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test stale compiled modules: an editable install compiles the hot modules
    next to their sources (sniport/compiled.py), and Python imports the compiled one first,
    so a source edited since would not be what runs."""
    stale = []
    for module in HOT_MODULES:
        source = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        for built in source.parent.glob(f"{source.stem}.*.so"):
            if built.stat().st_mtime < source.stat().st_mtime:
                stale.append(str(source.relative_to(ROOT)))
    if stale:
        pytest.exit(f"changed since they were compiled: {', '.join(stale)}; rebuild with "
                    "scripts/test (or .venv/bin/pip install -e .), or install with "
                    "SNIPORT_PURE_PYTHON=1 to test them as Python", returncode=4)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield Pki(trustme.CA(), tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    """The operations tests' process tracker: everything it started is killed at the end."""
    with Ops(tmp_path) as o:
        yield o


@pytest.fixture
def sniport_with(tmp_path: Path) -> Iterator[SniportWith]:
    """``sniport_with(config_text, **options)``: sniport started on that config in the
    test's tmp dir (options: ``name`` of the config file, ``args``, a command ``prefix``,
    ``env``), serving when it returns; stopped, with whatever it started, at the end of the
    test."""
    started: list[Sniport] = []

    def start(config_text: str, *, name: str = "sniport.toml", args: Sequence[str] = (),
              prefix: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Sniport:
        s = start_sniport(config_text, tmp_path, name=name, args=args, prefix=prefix, env=env)
        started.append(s)
        return s

    yield start
    for s in reversed(started):
        s.stop()
