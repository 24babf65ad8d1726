"""Issue 14, item 17, end to end: a symlink or a FIFO swapped into the static root between
the handler's cached look at a file and its open.

The static handler remembers what it found at a path for a second (``STAT_VALID``, as
nginx's ``open_file_cache``), and a file above 256 KiB is opened for every request. So: ask
for a large file once, ``os.rename`` a symlink to a file outside the root (or a FIFO) over
it, and ask again at once: the second request meets the cached look and a different file at
the path. Every attempt uses a fresh name, and a few attempts are made, so that at least one
is surely inside the window (each takes milliseconds, the window is a second).

One worker, so that both requests meet the same cache, and so that a worker stuck in
``open()`` on a FIFO shows: another connection gets no answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.clients import HttpConn, Response, request_bytes, tls_conn
from support.configs import route, site_config, toml_lines
from support.data import Files, pattern_bytes
from support.pki import Pki
from support.process import Sniport, start_sniport

HOST = "swap.static.test"
MARKER = b"OUTSIDE-THE-ROOT-MARKER-51c2"
LARGE = 300 * 1024  # above SMALL_FILE (256 KiB): opened for every request, never in memory
ATTEMPTS = 4
SMALL = b"small and quick\n"


@dataclass
class Setup:
    s: Sniport
    pki: Pki
    root: Path
    outside: Path
    fifos: list[Path] = field(default_factory=list)

    def conn(self) -> HttpConn:
        return tls_conn(self.s.port, HOST, self.pki.client_context())

    def unblock_fifos(self) -> None:
        """Open every FIFO the tests made for writing, without blocking, and close it: a
        reader stuck in open() on one (a worker of the old code) goes on and reads EOF."""
        for fifo in self.fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("hardening_static")
    outside = tmp / "outside.bin"
    # As large as the files it replaces: a server that follows the symlink sends all of it.
    outside.write_bytes((MARKER * (LARGE // len(MARKER) + 1))[:LARGE])
    www = Files(tmp / "www")
    www.add("small.txt", SMALL)
    config = site_config("swap", [HOST], pki.cert(HOST, directory=tmp / "certs"),
                         route("/", static={"root": www.root}),
                         server=toml_lines(workers=1, state_dir=tmp / "state"))
    with start_sniport(config, tmp) as s:
        setup = Setup(s, pki, www.root, outside)
        try:
            yield setup
        finally:
            setup.unblock_fifos()


def _get(c: HttpConn, name: str) -> Response:
    c.send(request_bytes(f"/{name}", HOST))
    return c.response()


def _large_file(setup: Setup, name: str) -> bytes:
    data = pattern_bytes(LARGE - 7) + name.encode()[:7].ljust(7, b"-")
    (setup.root / name).write_bytes(data)
    return data


def test_symlink_swapped_in_is_not_followed_outside_the_root(setup: Setup) -> None:
    """Issue 14 item 17. A large file replaced, within the handler's 1 s cache, by a symlink
    to a file outside the root: 404 (or 503 "file changed"), and not a byte of the outside
    file; before, the outside file was served (200, all of it)."""
    outcomes = []
    for i in range(ATTEMPTS):
        name = f"sym-{i}.bin"
        data = _large_file(setup, name)
        with setup.conn() as c:
            first = _get(c, name)
            assert (first.status, first.body == data) == (200, True)
            staged = setup.root / f".staged-{name}"
            os.symlink(setup.outside, staged)
            os.rename(staged, setup.root / name)
            second = _get(c, name)
            outcomes.append((second.status, MARKER in second.raw_head + second.body))
            # The connection is still usable, and serves what is in the root.
            assert _get(c, "small.txt").body == SMALL
    assert all(status in (404, 503) and not leaked for status, leaked in outcomes), outcomes


def test_fifo_swapped_in_does_not_block_the_worker(setup: Setup) -> None:
    """Issue 14 item 17. A large file replaced, within the handler's 1 s cache, by a FIFO:
    the request is answered at once (404 or 503), and the worker is not blocked: a request
    on another connection is answered immediately. Before, the worker blocked in open()
    until a writer came, and every other connection of that worker waited."""
    for i in range(ATTEMPTS):
        name = f"fifo-{i}.bin"
        _large_file(setup, name)
        with setup.conn() as a, setup.conn() as b:
            b.sock.settimeout(2.0)
            a.sock.settimeout(2.0)
            assert _get(a, name).status == 200
            staged = setup.root / f".staged-{name}"
            os.mkfifo(staged)
            setup.fifos.append(setup.root / name)
            os.rename(staged, setup.root / name)
            start = time.monotonic()
            a.send(request_bytes(f"/{name}", HOST))
            time.sleep(0.1)  # the FIFO request first: the worker meets it before b's
            try:
                other = _get(b, "small.txt")
            except TimeoutError:
                pytest.fail(f"attempt {i}: another connection got no answer within 2 s: "
                            "the worker is blocked")
            assert (other.status, other.body) == (200, SMALL)
            try:
                swapped = a.response()
            except TimeoutError:
                pytest.fail(f"attempt {i}: the FIFO request got no answer within 2 s")
            elapsed = time.monotonic() - start
            assert swapped.status in (404, 503), (i, swapped.status)
            assert elapsed < 1.5, (i, elapsed)
        # Nothing holds the FIFO open for reading: the server closed what it opened.
        with pytest.raises(OSError) as raised:
            os.close(os.open(setup.root / name, os.O_WRONLY | os.O_NONBLOCK))
        assert raised.value.errno == errno.ENXIO
