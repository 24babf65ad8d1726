"""Full against resumed TLS handshakes through sniport: server CPU per connection.

Usage: .venv/bin/python bench/resumption.py [--connections 2000] [--workers 2] [--port 21500]

Starts sniport (tickets on, a `respond` site, ECDSA P-256 certificate, TLS 1.3) with the
given number of workers, then runs the same client loop twice: every connection a new
session (full handshake), and every connection resuming the previous session. Each
connection sends one request with "Connection: close" and reads the answer. Server CPU is
utime+stime of sniport's master and workers from /proc, before and after each loop. Several
client processes run at once so that the server, not the client, is the busy side; the
resumed loop checks that every connection but the first of each client did resume.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent


def server_cpu(master: int) -> float:
    pids = [master] + [int(p) for p in os.listdir("/proc") if p.isdigit()
                       and _ppid(int(p)) == master]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def client(port: int, cafile: str, count: int, resume: bool, out: multiprocessing.Queue) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    session = None
    reused = 0
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="resume.test",
                             session=session if resume else None) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: resume.test\r\nConnection: close\r\n\r\n")
            while tls.recv(4096):
                pass
            reused += tls.session_reused
            session = tls.session
    out.put(reused)


def measure(port: int, cafile: str, master: int, connections: int, resume: bool,
            clients: int) -> dict[str, float]:
    out: multiprocessing.Queue = multiprocessing.Queue()
    per = connections // clients
    procs = [multiprocessing.Process(target=client, args=(port, cafile, per, resume, out))
             for _ in range(clients)]
    c0, t0 = server_cpu(master), time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    c1, t1 = server_cpu(master), time.monotonic()
    reused = sum(out.get() for _ in procs)
    n = per * clients
    return {"connections": n, "reused": reused, "conn_per_s": round(n / (t1 - t0)),
            "cpu_ms_per_conn": round((c1 - c0) / n * 1000, 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--port", type=int, default=21500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        leaf = ca.issue_cert("resume.test", key_type=trustme.KeyType.ECDSA)
        cert, key, cafile = f"{tmp}/c.pem", f"{tmp}/k.pem", f"{tmp}/ca.pem"
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        ca.cert_pem.write_to_path(cafile)
        Path(f"{tmp}/s.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{args.port}"]
workers = {args.workers}
access_log = "off"
state_dir = "{tmp}/state"
[[site]]
name = "s"
hosts = ["resume.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
  [[site.route]]
  path = "/"
  respond = {{ body = "ok" }}
""")
        proc = subprocess.Popen([sys.executable, "-m", "sniport", "run", "-c", f"{tmp}/s.toml"],
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            time.sleep(2.0)
            results = {}
            for name, resume in (("full", False), ("resumed", True), ("full2", False),
                                 ("resumed2", True)):
                results[name] = measure(args.port, cafile, proc.pid, args.connections,
                                        resume, args.clients)
            print(json.dumps({"workers": args.workers, **results}))
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
