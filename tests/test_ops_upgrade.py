"""``sniport upgrade`` (SIGUSR2) with real processes: a new master exec'd on the same
listening sockets takes over while clients keep connecting, the old one exits, the pid file
names the new one, the unix socket file survives the switch and goes at the final stop.

The test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

from support.backends import echo_backend, free_port
from support.clients import get_body, pt_who
from support.configs import PT_HOST, SITE_HOST, ops_config, short_unix_path
from support.pki import Pki
from support.proc import children, ppid, wait_gone
from support.process import Ops, run_cli
from support.waiting import TIMEOUT, wait_until


class ClientLoop:
    """New connections, one request each, as fast as they go: over TCP to the terminated
    site, over the unix socket to it, over TCP through the passthrough."""

    def __init__(self, pki: Pki, port: int, sock: str) -> None:
        self.ctx = pki.client_context()
        self.port, self.sock = port, sock
        self.done: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True)
                        for k in ("tcp", "tcp", "unix", "passthrough")]

    def run(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                if kind == "tcp":
                    ok = get_body(self.ctx, port=self.port) == b"v1"
                elif kind == "unix":
                    ok = get_body(self.ctx, unix=self.sock) == b"v1"
                else:
                    ok = pt_who(self.ctx, self.port) == PT_HOST
                with self.lock:
                    if ok:
                        self.done[kind] += 1
                    else:
                        self.failures.append(f"{kind}: wrong answer")
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{kind}: {type(exc).__name__}: {exc}")

    def total(self) -> int:
        with self.lock:
            return sum(self.done.values())

    def __enter__(self) -> ClientLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT)


def test_upgrade_hands_the_sockets_to_a_new_master(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    backend = echo_backend(pki, ops)
    port = free_port()
    sock = short_unix_path(tmp_path / "s.sock")
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"127.0.0.1:{port}", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST), workers=2, drain_timeout="5s", backend_port=backend.port))
    old = ops.start(path)
    old_workers = ops.track_workers(old)
    link = tmp_path / "same.sock"
    os.link(sock, link)  # the socket file must stay the very same one
    with ClientLoop(pki, port, sock) as loop:
        wait_until(lambda: loop.total() >= 30, TIMEOUT, "the client loop to run")
        mark = old.mark()
        r = run_cli("upgrade", "-c", str(path))
        assert (r.returncode, r.stdout) == (0, f"upgrade signalled to master {old.pid}\n")
        m = old.wait_log(r"upgrade: new master (\d+) started", start=mark)
        new_pid = int(m.group(1))
        ops.pids.add(new_pid)
        m = old.wait_log(rf"sniport\[{new_pid}\] INFO sniport \S+ \(2 worker\(s\)\) serving "
                         r"\S+ on (.+)$", start=mark)
        assert m.group(1) == f"127.0.0.1:{port}, unix:{sock}"
        old.wait_log(rf"sniport\[{new_pid}\] INFO upgrade: telling the old master {old.pid} "
                     r"to stop", start=mark)
        assert old.wait_exit(TIMEOUT) == 0
        at_exit = loop.total()
        wait_until(lambda: loop.total() >= at_exit + 60, TIMEOUT,
                   "requests after the old master exited")
    sent = loop.total() + len(loop.failures)
    print(f"\n[ops] test_upgrade_hands_the_sockets_to_a_new_master: {sent} requests "
          f"({dict(loop.done)}), {loop.total() - at_exit} after the old master exited")
    assert loop.failures == [], loop.failures[:10]
    wait_gone(old_workers, 5.0)
    new_workers = children(new_pid)
    ops.pids.update(new_workers)
    assert len(new_workers) == 2
    assert ppid(new_pid) != old.pid
    assert old.pid_file.read_text() == f"{new_pid}\n"
    assert os.path.samestat(os.lstat(sock), os.lstat(link))
    assert get_body(pki.client_context(), unix=sock) == b"v1"
    # Several properties of the state after the switch, all checked before the test fails.
    problems = []
    status = run_cli("status", "-c", str(path))
    expected = [f"master:     {new_pid}", f"workers:    {' '.join(map(str, new_workers))}"]
    if status.stdout.splitlines()[:2] != expected:
        problems.append(f"`sniport status` after the upgrade printed {status.stdout!r}; "
                        f"expected it to start with {expected} (status file: "
                        f"{old.status_file.read_text()!r})")
    # The new master is the one that stops now; its exit removes the socket and pid files.
    os.kill(new_pid, signal.SIGTERM)
    wait_gone([new_pid], TIMEOUT)
    old.wait_log(rf"sniport\[{new_pid}\] INFO stopped")
    if old.pid_file.exists():
        problems.append(f"{old.pid_file} left behind by the new master's stop")
    if os.path.lexists(sock):
        problems.append(f"{sock} left behind by the new master's stop (the file it served on; "
                        f"links: {os.lstat(link).st_nlink})")
    assert problems == [], "\n".join(problems)
