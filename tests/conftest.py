from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Pki
from ops_helpers import Ops


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield Pki(trustme.CA(), tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    """The operations tests' process tracker: everything it started is killed at the end."""
    with Ops(tmp_path) as o:
        yield o
