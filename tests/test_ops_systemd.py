"""systemd integration without systemd as PID 1: the unit files pass ``systemd-analyze
verify``; Type=notify messages go to a NOTIFY_SOCKET the test owns; socket activation with
``systemd-socket-activate`` hands sniport its listening socket, which it uses as is.

Needs the Debian package ``systemd`` (systemd-analyze, systemd-socket-activate).
Each test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from support.backends import free_port
from support.clients import get_body
from support.configs import SITE_HOST, ops_config, short_unix_path
from support.pki import Pki
from support.process import ROOT, SNIPORT_BIN, Master, Ops, report, run_command
from support.waiting import TIMEOUT

UNITS = ROOT / "contrib" / "systemd"


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Rendered with this install's sniport path (the shipped /usr/local/bin is an example)."""
    import subprocess

    rendered = []
    for name in ("sniport.service", "sniport.socket"):
        text = (UNITS / name).read_text()
        out = tmp_path / name
        out.write_text(text.replace("/usr/local/bin/sniport", SNIPORT_BIN))
        rendered.append(str(out))
    r = subprocess.run(["systemd-analyze", "verify", *rendered], capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    service = dict(line.split("=", 1) for line in (UNITS / "sniport.service").read_text()
                   .splitlines() if "=" in line and not line.startswith("#"))
    assert service["Type"] == "notify"
    # `systemctl reload` runs `sniport reload`, which waits and fails when the reload did.
    assert service["ExecReload"] == "/usr/local/bin/sniport reload -c /etc/sniport/sniport.toml"
    assert service["LogsDirectory"] == "sniport"
    assert service["ExecStart"] == "/usr/local/bin/sniport run -c /etc/sniport/sniport.toml"
    socket_unit = (UNITS / "sniport.socket").read_text().splitlines()
    assert "ListenStream=0.0.0.0:443" in socket_unit
    assert "Service=sniport.service" in socket_unit


class Notifications:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(TIMEOUT)

    def next(self, timeout: float = TIMEOUT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if line)

    def none_within(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        with pytest.raises(TimeoutError):
            extra = self.sock.recv(4096)
            print(f"unexpected notification: {extra!r}")


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_notify_ready_reloading_stopping(ops: Ops, pki: Pki, tmp_path: Path, where: str) -> None:
    if where == "path":
        address = short_unix_path(tmp_path / "notify.sock")
        env_value = address
    else:
        name = f"sniport-ops-notify-{os.getpid()}-{tmp_path.name}"
        address, env_value = "\0" + name, "@" + name
    notes = Notifications(address)
    ops.closers.append(notes.sock.close)
    path = ops.write_config(ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"],
                                       cert=pki.cert(SITE_HOST), workers=2))
    master = ops.start(path, env=dict(os.environ, NOTIFY_SOCKET=env_value))
    ready = notes.next()
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(master.pid)
    assert get_body(pki.client_context(), port=master.port) == b"v1"
    # A reload: RELOADING=1, then READY=1 once the new workers serve.
    master.signal(signal.SIGHUP)
    assert notes.next() == {"RELOADING": "1"}
    again = notes.next()
    assert again["READY"] == "1" and again["MAINPID"] == str(master.pid)
    master.wait_log(r"reloaded \S+ \(generation 2\)")
    # A reload that fails: RELOADING=1, then READY=1 (the old config serves on).
    path.write_text(path.read_text().replace("[server]", "[server]\nbogus = 1"))
    master.signal(signal.SIGHUP)
    assert notes.next() == {"RELOADING": "1"}
    assert notes.next()["READY"] == "1"
    master.wait_log(r"reload failed")
    # Stop: STOPPING=1, and nothing after it.
    master.signal(signal.SIGTERM)
    assert notes.next() == {"STOPPING": "1"}
    assert master.wait_exit() == 0
    notes.none_within(0.3)
    report(f"test_notify_ready_reloading_stopping[{where}]", 1)


def socket_activated(ops: Ops, listen: str, config: Path, *extra: str) -> Master:
    """``systemd-socket-activate -l LISTEN -- python -m sniport run -c CONFIG``: it binds,
    waits for the first connection, then execs sniport (same pid) with the socket as fd 3."""
    proc = ops.spawn(["systemd-socket-activate", "-l", listen, *extra, "--",
                      *run_command(config)])
    assert proc.stderr is not None
    master = Master(proc, config, ops.state_dir_of(config))
    master.wait_log(r"Listening on .* as 3\.")
    return master


def listening_inodes(port: int) -> list[int]:
    """Socket inodes of every TCP socket listening on 127.0.0.1:port in this namespace."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], int(fields[9])
        if state == "0A" and local == f"0100007F:{port:04X}":
            out.append(inode)
    return out


def socket_inode(pid: int, fd: int) -> int:
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert link.startswith("socket:["), link
    return int(link[len("socket:["):-1])


def test_socket_activation_tcp(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=[f"127.0.0.1:{port}"],
                                       cert=pki.cert(SITE_HOST), workers=2))
    master = socket_activated(ops, f"127.0.0.1:{port}", path)
    [held] = listening_inodes(port)
    ctx = pki.client_context()
    # The first connection makes systemd-socket-activate exec sniport; it waits in the
    # backlog of the inherited socket and is served once sniport runs.
    answers: list[bytes] = []
    first = threading.Thread(target=lambda: answers.append(get_body(ctx, port=port)))
    first.start()
    m = master.wait_log(r"serving \S+ on (.+)$")
    first.join(TIMEOUT)
    assert answers == [b"v1"]
    assert m.group(1) == f"127.0.0.1:{port}"
    master.wait_log(rf"INFO systemd passed 127\.0\.0\.1:{port}$")
    # The very socket systemd bound: the only one listening on the port, held by the
    # master (exec'd in place: same pid) at fd 3; sniport did not bind another.
    assert listening_inodes(port) == [held]
    assert socket_inode(master.pid, 3) == held
    assert master.pid_file.read_text() == f"{master.pid}\n"
    # It reloads and stops like any start.
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    assert get_body(ctx, port=port) == b"v1"
    assert listening_inodes(port) == [held]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert listening_inodes(port) == []
    report("test_socket_activation_tcp", 2)


def test_socket_activation_unix_with_a_name(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    sock = short_unix_path(tmp_path / "activated.sock")
    path = ops.write_config(ops_config(state_dir=tmp_path / "state", listen=[f"unix:{sock}"],
                                       cert=pki.cert(SITE_HOST)))
    master = socket_activated(ops, sock, path, "--fdname=web")
    before = os.lstat(sock)
    ctx = pki.client_context()
    answers: list[bytes] = []
    first = threading.Thread(target=lambda: answers.append(get_body(ctx, unix=sock)))
    first.start()
    master.wait_log(r"serving \S+ on (.+)$")
    first.join(TIMEOUT)
    assert answers == [b"v1"]
    master.wait_log(rf"INFO systemd passed unix:{sock} \(web\)$")
    assert os.path.samestat(os.lstat(sock), before)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    # The file belongs to whoever bound it (systemd): sniport leaves it.
    assert os.path.samestat(os.lstat(sock), before)
    report("test_socket_activation_unix_with_a_name", 1)
