"""A throwaway redis-server for the Redis storage tests: its own port on 127.0.0.1, its own
directory, no persistence; never a system service."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from support.backends import free_port


@dataclass
class RedisInfo:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    password: str | None = None

    def stop(self) -> None:
        """Kill it (idempotent): afterwards connecting to ``port`` is refused."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _pong(port: int, password: str | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(100)
            s.sendall(b"PING\r\n")
            return s.recv(100).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmp_path: Path, *, password: str | None = None,
                port: int | None = None) -> RedisInfo:
    """A redis-server answering PING (on ``port`` if given: a restart where it was); stop
    it with ``.stop()``."""
    folder = tmp_path / f"redis-{time.monotonic_ns()}"
    folder.mkdir()
    wanted = port
    for _ in range(3):  # the free port may be taken before redis binds it
        port = wanted if wanted is not None else free_port()
        args = ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(folder),
                "--enable-debug-command", "local"]
        if password is not None:
            args += ["--requirepass", password]
        log = open(folder / "redis.log", "wb")  # noqa: SIM115  # kept by the child
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _pong(port, password):
                auth = f":{password}@" if password is not None else ""
                return RedisInfo(f"redis://{auth}127.0.0.1:{port}/0", port, proc, password)
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
