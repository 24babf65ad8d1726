"""Issue 10 item 2: the ACME service runs in a child process the master supervises.

Real processes: the child is restarted when it dies (with a growing delay); a reload that
changes what it must do replaces it at once, also while it waits to be restarted (found in
review: the old plan came back); a graceful stop while it waits does not spin the master
(found in review: a timeout of zero on every turn until the drain ended).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

from support.configs import route, site_block, toml_lines
from support.proc import _stat
from support.process import Sniport, start_sniport

STARTED = r"ACME service started \(pid (\d+)\)"


def config(tmp: Path, backend_port: int, renew_before: str) -> str:
    return ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=1,
                                      state_dir=tmp / "state", drain_timeout="4s")
            + "\n[acme]\n" + toml_lines(directory="https://127.0.0.1:1/dir",
                                        renew_before=renew_before)
            + "\n" + site_block("auto", ["auto.proc.test"], "acme",
                                route("/", respond={"body": "x"}))
            + "[[passthrough]]\n" + toml_lines(name="held", hosts=["held.proc.test"],
                                               upstreams=[f"127.0.0.1:{backend_port}"])
            + '[default]\nnon_tls = "passthrough:held"\n')


def service_pid(s: Sniport, start: int = 0) -> int:
    return int(s.wait_log(STARTED, start=start).group(1))


def own_cpu(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_service_is_restarted_replaced_on_reload_and_stopped(tmp_path: Path) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(backend.accept()[0]), daemon=True).start()
    path = tmp_path / "sniport.toml"
    s = start_sniport(config(tmp_path, backend.getsockname()[1], "240h"), tmp_path)
    try:
        first = service_pid(s)
        # Dies: restarted after a short delay.
        mark = s.mark()
        os.kill(first, signal.SIGKILL)
        s.wait_log(rf"ACME service {first} died \(killed by SIGKILL\); restarting in 2s",
                   start=mark)
        second = service_pid(s, mark)
        assert second != first
        # Dies again (the next delay is 4 s), and a reload changes the plan meanwhile: the
        # new plan's service starts at once, and the old plan never comes back.
        mark = s.mark()
        os.kill(second, signal.SIGKILL)
        s.wait_log(r"restarting in 4s", start=mark)
        path.write_text(config(tmp_path, backend.getsockname()[1], "100h"))
        reload_at = time.monotonic()
        s.signal(signal.SIGHUP)
        third = service_pid(s, mark)
        assert time.monotonic() - reload_at < 3.0
        time.sleep(5)  # past the old restart time
        log = s.log()
        assert re.findall(STARTED, log[log.index(f"(pid {third})"):]) == []
        # A graceful stop while the service waits to be restarted, with a relay that holds
        # the drain for its 4 s: the master must sleep, not spin.
        client = socket.create_connection(("127.0.0.1", s.port))
        client.sendall(b"not TLS, relayed to the held backend\n")
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held, "the relay did not reach the backend"
        mark = s.mark()
        os.kill(third, signal.SIGKILL)
        s.wait_log(r"restarting in 2s", start=mark)
        before = own_cpu(s.pid)
        s.signal(signal.SIGTERM)
        time.sleep(3.5)  # the restart time passes at 2 s; the drain holds until 4 s
        spent = own_cpu(s.pid) - before
        assert spent < 0.5, f"the master used {spent:.2f}s of CPU in 3.5s of draining"
        client.close()
        assert s.wait_exit(15) == 0
    finally:
        s.stop()
        backend.close()
