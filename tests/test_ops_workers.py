"""Workers and signals with real processes: two workers, a killed one replaced with backoff,
a second SIGTERM during a drain, SIGINT, SIGUSR1 log reopening; ``sniport status`` and
``sniport --version``.

Each test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from support.backends import echo_backend
from support.clients import Stream, get_body
from support.configs import SITE_HOST, ops_config
from support.logs import json_log_file
from support.pki import Pki
from support.proc import alive, children, open_paths, ppid
from support.process import PYTHON, SNIPORT_BIN, Ops, report, run_cli
from support.waiting import TIMEOUT, wait_until

import sniport
from sniport import compiled


def test_two_workers_and_a_killed_one_is_replaced(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
                                       workers=2))
    master = ops.start(path)
    ctx = pki.client_context()
    workers = ops.track_workers(master)
    assert len(workers) == 2 and len(set(workers)) == 2
    assert children(master.pid) == sorted(workers)
    assert all(ppid(w) == master.pid for w in workers)
    sent = 0
    for _ in range(10):
        assert get_body(ctx, port=master.port) == b"v1"
        sent += 1
    current = list(workers)
    # The same slot dies twice in a row: 0.5s, then 1.0s before it is replaced (backoff).
    for delay in ("0.5", "1.0"):
        victim = current[0]
        mark = master.mark()
        os.kill(victim, signal.SIGKILL)
        master.wait_log(rf"ERROR worker {victim} died \(killed by SIGKILL\) after [\d.]+s; "
                        rf"restarting in {delay}s", start=mark)
        # The other worker serves meanwhile.
        assert get_body(ctx, port=master.port) == b"v1"
        sent += 1
        def replaced(gone: int = victim) -> bool:
            now = master.workers()
            return len(now) == 2 and gone not in now

        wait_until(replaced, 5.0, "a replacement worker")
        now = master.workers()
        ops.pids.update(now)
        (replacement,) = set(now) - set(current)
        assert ppid(replacement) == master.pid
        assert children(master.pid) == sorted(now)
        assert not alive(victim)
        current = [replacement, *(set(now) - {replacement})]
        for _ in range(10):
            assert get_body(ctx, port=master.port) == b"v1"
            sent += 1
    status = run_cli("status", "-c", str(path))
    assert status.returncode == 0
    assert f"workers:    {' '.join(map(str, sorted(current)))}" in status.stdout.splitlines()
    assert master.status()["generation"] == 1
    report("test_two_workers_and_a_killed_one_is_replaced", sent)


def test_a_second_sigterm_during_the_drain_makes_it_fast(ops: Ops, pki: Pki,
                                                         tmp_path: Path) -> None:
    backend = echo_backend(pki, ops)
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
                                       drain_timeout="30s", backend_port=backend.port))
    master = ops.start(path)
    workers = ops.track_workers(master)
    stream = Stream(pki.client_context(), master.port)
    assert stream.echo(b"before") == b"before"
    mark = master.mark()
    master.signal(signal.SIGTERM)
    master.wait_log(r"graceful stop: draining for up to 30s", start=mark)
    time.sleep(0.5)
    # Draining: the stream still flows, the master waits for it.
    assert stream.echo(b"during the drain") == b"during the drain"
    assert alive(master.pid)
    t0 = time.monotonic()
    master.signal(signal.SIGTERM)
    master.wait_log(r"fast stop", start=mark)
    assert master.wait_exit(5.0) == 0
    took = time.monotonic() - t0
    stream.wait_closed(2.0)
    stream.close()
    assert took < 2.0, took
    assert not any(alive(w) for w in workers)
    report("test_a_second_sigterm_during_the_drain_makes_it_fast", 2)


def test_sigint_stops_fast(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    backend = echo_backend(pki, ops)
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
                                       drain_timeout="30s", backend_port=backend.port,
                                       workers=2))
    master = ops.start(path)
    workers = ops.track_workers(master)
    stream = Stream(pki.client_context(), master.port)
    assert stream.echo(b"before") == b"before"
    t0 = time.monotonic()
    master.signal(signal.SIGINT)
    assert master.wait_exit(5.0) == 0
    took = time.monotonic() - t0
    stream.wait_closed(2.0)
    stream.close()
    assert took < 2.0, took
    assert master.stderr.count(r"INFO fast stop") == 1
    assert master.stderr.count(r"graceful stop") == 0
    assert not any(alive(w) for w in workers)
    assert not master.pid_file.exists()
    report("test_sigint_stops_fast", 1)


def test_sigusr1_reopens_the_access_log(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
                                       workers=2, access_log=access))
    master = ops.start(path)
    ctx = pki.client_context()
    workers = ops.track_workers(master)
    for _ in range(4):
        assert get_body(ctx, port=master.port, path="/before") == b"v1"
    wait_until(lambda: len(json_log_file(access, "req")) == 4, 5.0, "4 request lines")
    os.rename(access, rotated)  # logrotate's move
    mark = master.mark()
    master.signal(signal.SIGUSR1)
    master.wait_log(r"INFO log files reopened", start=mark)

    def reopened() -> bool:
        return all(str(access) in open_paths(w) and str(rotated) not in open_paths(w)
                   for w in workers)

    wait_until(reopened, 5.0, "every worker to hold the new access.log")
    for _ in range(4):
        assert get_body(ctx, port=master.port, path="/after") == b"v1"
    wait_until(lambda: len(json_log_file(access, "req")) == 4, 5.0,
               "4 request lines in the new file")
    assert [r["path"] for r in json_log_file(access, "req")] == ["/after"] * 4
    assert [r["path"] for r in json_log_file(rotated, "req")] == ["/before"] * 4
    report("test_sigusr1_reopens_the_access_log", 8)


def test_status_and_version(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
                                       workers=2))
    not_running = run_cli("status", "-c", str(path))
    assert not_running.returncode == 3
    assert not_running.stdout.startswith("no running sniport found: cannot read ")
    before = time.time()
    master = ops.start(path)
    workers = ops.track_workers(master)

    def status() -> dict[str, str]:
        r = run_cli("status", "-c", str(path))
        assert r.returncode == 0, r.stderr
        out = {}
        for line in r.stdout.splitlines():
            if line.startswith(("certificate:", " ")):
                continue  # the certificates' section (test_acme_serving checks it)
            key, _, value = line.partition(":")
            out[key] = value.strip()
        assert "\ncertificate: site " in r.stdout
        return out

    def loaded_at(text: str) -> tuple[float, int]:
        m = re.fullmatch(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \S+ \(generation (\d+)\)", text)
        assert m, text
        stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        return stamp, int(m.group(2))

    first = status()
    assert set(first) == {"master", "workers", "config", "loaded", "listeners", "last reload"}
    assert first["last reload"] == "none since start"
    assert first["master"] == str(master.pid)
    assert first["workers"] == " ".join(map(str, sorted(workers)))
    assert first["config"] == str(path)
    assert first["listeners"] == f"127.0.0.1:{master.port}"
    stamp, generation = loaded_at(first["loaded"])
    assert generation == 1
    assert int(before) - 1 <= stamp <= time.time() + 1
    time.sleep(1.1)  # the next load time is a later second
    mark = master.mark()
    master.reload(via_cli=True)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    new_workers = master.wait_generation(2)
    second = status()
    ops.pids.update(new_workers)
    assert second["master"] == str(master.pid)
    assert second["workers"] == " ".join(map(str, sorted(new_workers)))
    assert not set(new_workers) & set(workers)
    stamp2, generation2 = loaded_at(second["loaded"])
    assert generation2 == 2
    assert stamp2 > stamp
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ ok: generation 2 serving",
                        second["last reload"]), second["last reload"]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    gone = run_cli("status", "-c", str(path))
    assert gone.returncode == 3
    # --version, from both entry points.
    for argv in ([SNIPORT_BIN], [PYTHON, "-m", "sniport"]):
        r = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                           timeout=TIMEOUT)
        expected = f"sniport {sniport.__version__} ({compiled.describe()})\n"
        assert (r.returncode, r.stdout, r.stderr) == (0, expected, "")
    assert sniport.__version__ == version("sniport")
    report("test_status_and_version", 0)
