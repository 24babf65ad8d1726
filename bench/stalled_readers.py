#!/usr/bin/env python3
"""Memory a server spends on clients that ask for a large file and never read it.

Opens ``--count`` TLS connections (each with a small receive buffer, set before connect) to
``--port``, sends one GET for ``--path`` on each, reads nothing, waits ``--settle`` seconds,
and prints the growth of the resident memory of ``--pid`` and its children (a server's
master and workers), per client; then closes every connection, waits again, and prints what
stayed. Run it twice against the same server to see what the second round costs once the
first one's memory is there to reuse.

    bench/stalled_readers.py --port 18600 --sni localhost --path /big.bin --pid MASTER_PID

Used for issue 14 item 6 (bench/RESULTS.md); it starts no server itself.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import time
from pathlib import Path


def family(pid: int) -> list[int]:
    """``pid`` and its children (one level: a master and its workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, kids)]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost")
    p.add_argument("--path", default="/big.bin")
    p.add_argument("--pid", type=int, required=True, help="the server's master")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--rcvbuf", type=int, default=4096)
    p.add_argument("--settle", type=float, default=3.0)
    a = p.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pids = family(a.pid)
    before = rss_kib(pids)
    clients = []
    for _ in range(a.count):
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf)
        raw.connect(("127.0.0.1", a.port))
        tls = ctx.wrap_socket(raw, server_hostname=a.sni)
        tls.sendall(f"GET {a.path} HTTP/1.1\r\nHost: {a.sni}\r\n\r\n".encode())
        clients.append(tls)
    time.sleep(a.settle)
    during = rss_kib(pids)
    for tls in clients:
        tls.close()
    time.sleep(a.settle)
    after = rss_kib(pids)
    print(f"{a.count} stalled clients: RSS {before} -> {during} KiB "
          f"(+{(during - before) / a.count:.1f} KiB per client); {after} KiB after they left")


if __name__ == "__main__":
    main()
