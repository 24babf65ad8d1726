"""A real OpenSSH server (Debian ``openssh-server``) on loopback, and the real ``ssh`` client.

The server runs in the foreground with its own host key, one authorized key and a config in
the test's directory (never the system's ``/etc/ssh``), on a port of its own; it is stopped
at the end. ``/run/sshd`` (the privilege-separation directory sshd insists on) is made if it
is missing, which needs root: the test command runs as root on CI.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.backends import free_port
from support.waiting import wait_until

SSHD = "/usr/sbin/sshd"
TIMEOUT = 10.0


@dataclass
class Sshd:
    port: int
    user_key: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def run(self, port: int, *command: str,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """``ssh -p PORT user@127.0.0.1 COMMAND``, with this server's user key, no config
        file, no known-hosts file and no prompts."""
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(self.user_key), "-p", str(port),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
             "-o", f"ConnectTimeout={int(timeout)}",
             f"{getpass.getuser()}@127.0.0.1", *command],
            capture_output=True, timeout=timeout + 5)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=TIMEOUT)


def start_sshd(tmp: Path) -> Sshd:
    base = tmp / "sshd"
    base.mkdir()
    _keygen(base / "host_key")
    _keygen(base / "user_key")
    authorized = base / "authorized_keys"
    authorized.write_bytes((base / "user_key.pub").read_bytes())
    authorized.chmod(0o600)
    if not Path("/run/sshd").is_dir():
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = free_port()
    config = base / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {base / "host_key"}
AuthorizedKeysFile {authorized}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {base / "sshd.pid"}
""")
    log = base / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    server = Sshd(port, base / "user_key", proc, log)
    try:
        wait_until(lambda: b"Server listening" in log.read_bytes() or proc.poll() is not None,
                   TIMEOUT, "sshd to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()}")
    except BaseException:
        server.stop()
        raise
    return server
