"""sniport against the blog post's nginx setup, side by side, on this machine.

Run it through ``bench/run`` (which installs nginx, the stream module, wrk and curl first);
``bench/run --help`` lists the options.

What one run does:

1. a scratch directory with an ECDSA P-256 CA and leaf certificates (pass.test, static.test,
   app.test), the passthrough backend's files (/small 100 B, /big = --bulk-size) and a private
   hosts file;
2. the nginx configs of ../shared/bench-reference (vendored in bench/nginx/) rendered with a
   private prefix per instance, run as ``nginx -p RUN -c RUN/nginx.conf -e RUN/error.log``;
3. the TLS passthrough backend (backend-pass.conf), a separate nginx shared by both servers;
4. rounds: in each, the nginx seed setup and sniport (the equivalent config), ALTERNATING (the
   order flips every round), each started fresh, checked (right certificate, right content),
   then measured;
5. bench/relay_compare.py (splice vs transport relay), unless --no-relay;
6. bench/RESULTS.md (--out), plus logs and raw JSON in bench/out/<stamp>/.

Server cost is the utime+stime of the server's own processes (master + workers, for nginx
and sniport alike: the process we started and every process below it) from /proc/PID/stat
before and after a run, never the load generator's or the backend's. Memory is the VmRSS sum
of the same processes.

Measures are a registry (MEASURES), each a function ``(Session, Server) -> Sample`` with its
metrics and its exact command. M1, M2 and M6p (passthrough) are built. M3, M4, M5 and M6t
(terminated) are declared but not built yet; adding one means: its function, the terminated
sites in ``sniport_config`` (static.test and app.test, as in http-servers.inc), the app
backend (backend-app.conf on PORTS.app_backend) started next to the passthrough backend, and
a check of static.test and app.test next to ``check_passthrough``. ``--workers`` already
sets both servers' worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TEMPLATES = BENCH / "nginx"
VENV_PY = ROOT / ".venv" / "bin" / "python"
SNIPORT = ROOT / ".venv" / "bin" / "sniport"
TICK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
PASS_HOST = "pass.test"
SMALL_BODY = (b"sniport-bench /small: 100 bytes through the passthrough, exactly. "
              b"0123456789abcdef0123456789abcdef!\n")
assert len(SMALL_BODY) == 100


@dataclass(frozen=True)
class Ports:
    """Every port the bench uses: all in 20000-20999 (other benches use other ranges)."""

    seed: int = 20001  # nginx seed setup: stream + ssl_preread
    sniport: int = 20002
    direct: int = 20003  # nginx without the hop (terminated measures, later)
    pass_backend: int = 20443
    app_backend: int = 20080
    relay_a: int = 20901  # bench/relay_compare.py
    relay_b: int = 20902

    def all(self) -> list[int]:
        return [self.seed, self.sniport, self.direct, self.pass_backend, self.app_backend,
                self.relay_a, self.relay_b]


PORTS = Ports()


class BenchError(Exception):
    """A reason to stop the whole bench, worded for the user."""


# ---------------------------------------------------------------------------------------------
# /proc: processes, CPU, memory, listening ports


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """(utime, stime) of ``pids`` (fields 14 and 15 of /proc/PID/stat), in seconds."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            f = _stat_fields(pid)
            user += int(f[11])
            system += int(f[12])
    return user / TICK, system / TICK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def fd_count(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def ensure_free(ports: Sequence[int]) -> None:
    """Refuse to go on if anyone listens on or holds a port we need: a stray process on a
    SO_REUSEPORT port would silently take part of the load."""
    taken = []
    for port in ports:
        if listening(port):
            taken.append(f"{port} (a listener)")
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            taken.append(f"{port} ({exc.strerror})")
        finally:
            s.close()
    if taken:
        raise BenchError("port(s) taken: " + ", ".join(taken) + "; stop whatever holds them "
                         "(ss -ltnp) and run again")


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The lab: certificates, files, hosts file, rendered configs


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Lab:
    dir: Path
    bulk_size: int
    certs_der: dict[str, bytes] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts"

    @property
    def big(self) -> Path:
        return self.dir / "passwww" / "big"

    def build(self, hosts: Sequence[str]) -> None:
        pki = self.dir / "pki"
        pki.mkdir(parents=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(_name("sniport bench CA"))
              .issuer_name(_name("sniport bench CA")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(hours=1))
              .not_valid_after(now + dt.timedelta(days=7))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        for host in hosts:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (x509.CertificateBuilder().subject_name(_name(host))
                    .issuer_name(ca.subject).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - dt.timedelta(hours=1))
                    .not_valid_after(now + dt.timedelta(days=7))
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]),
                                   critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                   critical=True)
                    .sign(ca_key, hashes.SHA256()))
            (pki / f"{host}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (pki / f"{host}.key").write_bytes(_pem_key(key))
            (pki / f"{host}.key").chmod(0o600)
            self.certs_der[host] = cert.public_bytes(serialization.Encoding.DER)

        passwww = self.dir / "passwww"
        passwww.mkdir()
        (passwww / "small").write_bytes(SMALL_BODY)
        block = os.urandom(1 << 20)  # incompressible, and a range read can be checked
        with self.big.open("wb") as f:
            left = self.bulk_size
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
        www = self.dir / "www"  # static.test's root (terminated measures, later)
        www.mkdir()
        (www / "1k.html").write_bytes(b"<!doctype html>" + b"x" * (1024 - 16) + b"\n")
        self.hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                                   f"127.0.0.1 {' '.join(hosts)}\n")

    def big_slice(self, start: int, length: int) -> bytes:
        with self.big.open("rb") as f:
            f.seek(start)
            return f.read(length)

    def render(self, template: str, run: Path, workers: int, listen: str = "") -> Path:
        """Render ``template`` (and the includes) into ``run``; returns run/nginx.conf."""
        run.mkdir(parents=True, exist_ok=True)
        (run / "tmp").mkdir(exist_ok=True)
        (run / "logs").mkdir(exist_ok=True)
        subst = {"@W@": str(workers), "@RUN@": str(run), "@CONF@": str(run),
                 "@LAB@": str(self.dir), "@LISTEN@": listen,
                 "@SEED_PORT@": str(PORTS.seed), "@PASS_PORT@": str(PORTS.pass_backend),
                 "@APP_PORT@": str(PORTS.app_backend)}

        def fill(text: str) -> str:
            for k, v in subst.items():
                text = text.replace(k, v)
            left = re.findall(r"@[A-Z_]+@", text)
            if left:
                raise BenchError(f"{template}: unrendered placeholders {sorted(set(left))}")
            return text

        for inc in ("nginx-common.inc", "http-servers.inc"):
            (run / f"{inc}.out").write_text(fill((TEMPLATES / inc).read_text()))
        conf = run / "nginx.conf"
        conf.write_text(fill((TEMPLATES / template).read_text()))
        return conf


# ---------------------------------------------------------------------------------------------
# Servers


class Server:
    """A process tree we started: a server under test or a backend."""

    label: str
    port: int
    command: list[str]

    def __init__(self, label: str, port: int, run: Path) -> None:
        self.label = label
        self.port = port
        self.run = run
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run / "stderr.log"

    def start(self) -> None:
        ensure_free([self.port])
        self.run.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, cwd=self.run,
                                         start_new_session=True)
        try:
            wait_for(lambda: listening(self.port) or not self.alive(), 20,
                     f"{self.label} to listen on {self.port}")
            if not self.alive():
                raise BenchError(f"{self.label} exited at start:\n{self.log_tail()}")
            self.ready()
        except BenchError:
            self.stop()
            raise

    def ready(self) -> None:
        """Extra readiness condition after the port listens."""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        assert self.proc is not None
        return descendants(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        wait_for(lambda: not listening(self.port), 10, f"{self.label} to release {self.port}")
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def problems(self) -> list[str]:
        """Log lines that say something went wrong (nginx: [error] and worse)."""
        return []


class Nginx(Server):
    def __init__(self, label: str, port: int, run: Path, conf: Path, workers: int) -> None:
        super().__init__(label, port, run)
        self.workers = workers
        self.command = ["nginx", "-p", str(run), "-c", str(conf), "-e",
                        str(run / "error.log"), "-g", "daemon off;"]

    def ready(self) -> None:
        wait_for(lambda: len(self.pids()) >= 1 + self.workers, 10,
                 f"{self.label}'s {self.workers} worker(s)")

    def stop(self, sig: int = signal.SIGQUIT) -> int | None:  # graceful, like `nginx -s quit`
        return super().stop(sig)

    def problems(self) -> list[str]:
        with contextlib.suppress(OSError):
            text = (self.run / "error.log").read_text(errors="replace")
            return [line for line in text.splitlines()
                    if re.search(r"\[(error|crit|alert|emerg)\]", line)]
        return []


class Sniport(Server):
    def __init__(self, label: str, port: int, run: Path, workers: int) -> None:
        super().__init__(label, port, run)
        run.mkdir(parents=True, exist_ok=True)
        (run / "state").mkdir(exist_ok=True)
        self.workers = workers
        self.config = run / "sniport.toml"
        self.config.write_text(sniport_config(workers, run / "state"))
        self.command = [str(SNIPORT), "run", "-c", str(self.config)]

    def ready(self) -> None:  # the master and its workers
        wait_for(lambda: len(self.pids()) >= 1 + self.workers, 20,
                 f"{self.label}'s {self.workers} worker(s)")

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if re.search(r"Traceback|ERROR|CRITICAL|Error:|exception|died", line)]


def sniport_config(workers: int, state_dir: Path | str) -> str:
    """The sniport equivalent of nginx-seed.conf's passthrough part. The terminated sites
    (static.test, app.test) join here with the terminated measures (M3-M5, M6t)."""
    return f"""\
# sniport's side of the bench: the passthrough half of nginx-seed.conf
[server]
listen = ["127.0.0.1:{PORTS.sniport}"]
workers = {workers}                   # nginx: worker_processes {workers}
max_connections = 9000        # per worker; M6 holds 5,000 (nginx: worker_connections 19000)
access_log = "off"            # nginx: access_log off, and its stream logs nothing by default
log_level = "warning"
state_dir = "{state_dir}"     # pid file; never the system's /var/lib/sniport
drain_timeout = "5s"

[[passthrough]]
name = "pass"
hosts = ["{PASS_HOST}"]
upstreams = ["127.0.0.1:{PORTS.pass_backend}"]

[default]
to = "reject"
"""


# ---------------------------------------------------------------------------------------------
# Checks: each route answers correctly (right certificate, right content) through a server


def _client_context(lab: Lab) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@dataclass
class Answer:
    """One HTTP/1.1 exchange over a fresh TLS connection, and what the TLS layer showed."""

    status: int
    headers: dict[str, str]
    body: bytes
    cert_der: bytes | None
    version: str | None
    cipher: str | None
    ticket: bool


def _https(lab: Lab, port: int, host: str, method: str, path: str,
           headers: dict[str, str] | None = None) -> Answer:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with _client_context(lab).wrap_socket(raw, server_hostname=host) as tls:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                    f"{extra}\r\n".encode())
        data = bytearray()
        while chunk := tls.recv(1 << 16):
            data += chunk
        cipher = tls.cipher()
        answer_tls = (tls.getpeercert(binary_form=True), tls.version(),
                      cipher[0] if cipher else None,
                      tls.session is not None and tls.session.has_ticket)
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise http.client.HTTPException(f"no complete response head in {len(data)} bytes")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, v in
              (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return Answer(status, fields, body, *answer_tls)


def check_passthrough(lab: Lab, port: int) -> list[str]:
    """pass.test through ``port``: the backend's own certificate (verified, and the very DER
    we issued), TLS 1.3 without a session ticket, /small exactly, /big's length and tail."""
    bad: list[str] = []
    try:
        a = _https(lab, port, PASS_HOST, "GET", "/small")
        if a.cert_der != lab.certs_der[PASS_HOST]:
            bad.append("pass.test: the certificate is not the backend's")
        if a.version != "TLSv1.3":
            bad.append(f"pass.test: {a.version} negotiated, not TLSv1.3")
        if a.cipher != "TLS_AES_256_GCM_SHA384":
            bad.append(f"pass.test: cipher {a.cipher}, not TLS_AES_256_GCM_SHA384")
        if a.ticket:
            bad.append("pass.test: a session ticket was issued (tickets must be off)")
        if a.status != 200 or a.body != SMALL_BODY:
            bad.append(f"pass.test/small: status {a.status}, {len(a.body)} bytes, "
                       f"{'right' if a.body == SMALL_BODY else 'WRONG'} content")
        a = _https(lab, port, PASS_HOST, "HEAD", "/big")
        if a.status != 200 or a.headers.get("content-length") != str(lab.bulk_size):
            bad.append(f"pass.test/big HEAD: status {a.status}, length "
                       f"{a.headers.get('content-length')} (expected {lab.bulk_size})")
        tail = 1 << 16
        start = lab.bulk_size - tail
        a = _https(lab, port, PASS_HOST, "GET", "/big",
                   {"Range": f"bytes={start}-{lab.bulk_size - 1}"})
        right = a.body == lab.big_slice(start, tail)
        if a.status != 206 or not right:
            bad.append(f"pass.test/big tail: status {a.status}, {len(a.body)} bytes, content "
                       f"{'right' if right else 'WRONG'}")
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        bad.append(f"pass.test: {type(exc).__name__}: {exc}")
    return bad


# ---------------------------------------------------------------------------------------------
# Measures


@dataclass
class Sample:
    metrics: dict[str, float]
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Session:
    lab: Lab
    args: argparse.Namespace
    out: Path


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lower_is_better: bool
    fmt: str = "{:.3f}"


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    command: Callable[[Session, str], str]  # the exact command, for RESULTS.md
    run: Callable[[Session, Server], Sample] | None  # None: declared, not built yet
    why_not: str = ""


def settle(server: Server, baseline_fds: int, timeout: float = 15.0) -> None:
    """Wait until the server has closed what the last measure opened."""
    with contextlib.suppress(BenchError):
        wait_for(lambda: fd_count(server.pids()) <= baseline_fds + 2, timeout,
                 f"{server.label} to close its connections")
    time.sleep(0.2)


def curl_command(session: Session, port: str) -> list[str]:
    return ["curl", "-sS", "--fail", "--tlsv1.3", "--cacert", str(session.lab.ca_file),
            "--resolve", f"{PASS_HOST}:{port}:127.0.0.1", "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{time_total}\\n",
            f"https://{PASS_HOST}:{port}/big"]


def m1_bulk(session: Session, server: Server) -> Sample:
    pids = server.pids()
    cmd = curl_command(session, str(server.port))
    u0, s0 = cpu_split(pids)
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    wall = time.monotonic() - t0
    time.sleep(0.2)  # the last FINs
    u1, s1 = cpu_split(pids)
    cpu = (u1 - u0) + (s1 - s0)
    problems = []
    try:
        code, size_s, total_s = done.stdout.split()
        size, total = int(size_s), float(total_s)
    except ValueError:
        code, size, total = "?", 0, wall
    if done.returncode != 0 or code != "200" or size != session.lab.bulk_size:
        problems.append(f"curl exit {done.returncode}, HTTP {code}, {size} bytes "
                        f"(expected {session.lab.bulk_size}): {done.stderr.strip()}")
    gib = max(size, 1) / GIB
    return Sample({"MB/s": size / total / 1e6 if total else 0.0, "CPU-s/GiB": cpu / gib},
                  {"bytes": size, "seconds": total, "utime_s": round(u1 - u0, 2),
                   "stime_s": round(s1 - s0, 2)}, problems)


def wrk_command(session: Session, port: str) -> list[str]:
    a = session.args
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(session.lab.hosts_file), "wrk", f"-t{a.wrk_threads}", f"-c{a.wrk_connections}",
            f"-d{a.wrk_duration}s", "-H", "Connection: close",
            f"https://{PASS_HOST}:{port}/small"]


def parse_wrk(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        out["requests"] = int(m.group(1))
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        out["seconds"] = float(m.group(2)) * scale
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      text):
        for k, v in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            out[f"err_{k}"] = int(v)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx_3xx"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    return out


def m2_new_conns(session: Session, server: Server) -> Sample:
    pids = server.pids()
    cmd = wrk_command(session, str(server.port))
    u0, s0 = cpu_split(pids)
    done = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=session.args.wrk_duration + 60, check=False)
    time.sleep(0.2)
    u1, s1 = cpu_split(pids)
    cpu = (u1 - u0) + (s1 - s0)
    w = parse_wrk(done.stdout)
    problems = []
    if done.returncode != 0 or "requests" not in w:
        problems.append(f"wrk exit {done.returncode}: {done.stdout.strip()} "
                        f"{done.stderr.strip()}")
    errors = sum(int(v) for k, v in w.items() if k.startswith("err_"))
    non2xx = int(w.get("non_2xx_3xx", 0))
    if errors:
        problems.append("wrk socket errors: " + ", ".join(
            f"{k[4:]} {int(v)}" for k, v in w.items() if k.startswith("err_") and v))
    if non2xx:
        problems.append(f"wrk: {non2xx} responses neither 2xx nor 3xx")
    requests = w.get("requests", 0)
    return Sample({"conn/s": w.get("rps", 0.0),
                   "CPU-ms/conn": cpu * 1000 / requests if requests else 0.0,
                   "errors": errors, "non-2xx": non2xx},
                  {"wrk": w, "utime_s": round(u1 - u0, 2), "stime_s": round(s1 - s0, 2),
                   "wrk_stdout": done.stdout}, problems)


def idle_command(session: Session, port: str) -> list[str]:
    return [str(VENV_PY), str(BENCH / "idle_clients.py"), "--port", port, "--sni", PASS_HOST,
            "--cafile", str(session.lab.ca_file), "--count", str(session.args.idle_count)]


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"no answer from the idle client in {timeout:.0f}s")
    return proc.stdout.readline()


def m6_idle_pass(session: Session, server: Server) -> Sample:
    count = session.args.idle_count
    pids = server.pids()
    fds0 = fd_count(pids)
    rss0 = rss_kib(pids)
    proc = subprocess.Popen(idle_command(session, str(server.port)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    problems: list[str] = []
    try:
        line = _readline(proc, 120)
        opened = json.loads(line) if line else {"ok": 0, "failed": count,
                                                 "errors": {"client died": 1}}
        time.sleep(1.0)  # let the server finish what the last handshakes started
        rss1 = rss_kib(pids)
        fds1 = fd_count(pids)
        assert proc.stdin is not None
        proc.stdin.write("status\n")
        proc.stdin.flush()
        status = json.loads(_readline(proc, 30) or "{}")
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ok = int(opened.get("ok", 0))
    if opened.get("failed"):
        problems.append(f"{opened['failed']} of {count} connections failed: "
                        f"{opened.get('errors')}")
    still = int(status.get("open", -1))
    if still != ok:
        problems.append(f"only {still} of {ok} connections still open when RSS was read")
    settle(server, fds0)
    return Sample({"KiB/conn": (rss1 - rss0) / ok if ok else 0.0},
                  {"rss_before_kib": rss0, "rss_after_kib": rss1, "connections": ok,
                   "fds_before": fds0, "fds_after": fds1, "handshake_seconds":
                   opened.get("seconds"), "still_open": still}, problems)


def _cmd(build: Callable[[Session, str], list[str]]) -> Callable[[Session, str], str]:
    return lambda s, port: shlex.join(build(s, port))


MEASURES: tuple[Measure, ...] = (
    Measure("M6p", "M6 memory per idle passthrough connection",
            (Metric("KiB/conn", "KiB", True, "{:.1f}"),), _cmd(idle_command), m6_idle_pass),
    Measure("M1", "M1 bulk passthrough (1 GiB)",
            (Metric("MB/s", "MB/s", False, "{:.0f}"), Metric("CPU-s/GiB", "s", True)),
            _cmd(curl_command), m1_bulk),
    Measure("M2", "M2 new passthrough connections",
            (Metric("conn/s", "conn/s", False, "{:.0f}"),
             Metric("CPU-ms/conn", "ms", True), Metric("errors", "", True, "{:.0f}"),
             Metric("non-2xx", "", True, "{:.0f}")),
            _cmd(wrk_command), m2_new_conns),
    Measure("M3", "M3 static 1 KiB, keep-alive", (Metric("CPU-us/req", "us", True),),
            lambda s, p: "", None, "not built in the bench yet (passthrough only)"),
    Measure("M4", "M4 reverse proxy, keep-alive", (Metric("CPU-us/req", "us", True),),
            lambda s, p: "", None, "not built in the bench yet (passthrough only)"),
    Measure("M5", "M5 TLS handshake + 1 request", (Metric("CPU-ms/conn", "ms", True),),
            lambda s, p: "", None, "not built in the bench yet (passthrough only)"),
    Measure("M6t", "M6 memory per idle terminated connection", (Metric("KiB/conn", "KiB",
            True),), lambda s, p: "", None, "not built in the bench yet (passthrough only)"),
)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Record:
    measure: str
    server: str
    round: int
    sample: Sample


@dataclass
class Outcome:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    log_lines: list[tuple[str, str]] = field(default_factory=list)  # (server, line)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_server(name: str, session: Session, rnd: int) -> Server:
    run = session.out / "run" / f"{name}-{rnd}"
    workers = session.args.workers
    if name == "nginx":
        conf = session.lab.render("nginx-seed.conf", run, workers,
                                  listen=f"unix:{run}/https.sock")
        return Nginx("nginx seed", PORTS.seed, run, conf, workers)
    return Sniport("sniport", PORTS.sniport, run, workers)


def server_session(session: Session, name: str, rnd: int, measures: Sequence[Measure],
                   outcome: Outcome) -> None:
    server = make_server(name, session, rnd)
    log(f"round {rnd + 1}: starting {server.label}: {shlex.join(server.command)}")
    with running(server):
        bad = check_passthrough(session.lab, server.port)
        outcome.checks.append(f"round {rnd + 1}, {server.label}: "
                              + ("; ".join(bad) if bad else "pass.test ok (backend's "
                                 "certificate, TLSv1.3 TLS_AES_256_GCM_SHA384, no ticket, "
                                 "/small 100 B exact, /big length and tail)"))
        if bad:
            outcome.problems += [f"round {rnd + 1}, {server.label}, check: {b}" for b in bad]
            log(f"  check FAILED: {bad}; skipping its measures this round")
            return
        pids0 = set(server.pids())
        for m in measures:
            assert m.run is not None
            fds0 = fd_count(server.pids())
            sample = m.run(session, server)
            outcome.records.append(Record(m.key, name, rnd, sample))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in sample.metrics.items())
            log(f"  {m.key} {server.label}: {shown}"
                + (f"  PROBLEMS: {sample.problems}" if sample.problems else ""))
            outcome.problems += [f"round {rnd + 1}, {server.label}, {m.key}: {p}"
                                 for p in sample.problems]
            if not server.alive():
                outcome.problems.append(f"round {rnd + 1}, {server.label} DIED during {m.key} "
                                        f"(exit {server.proc.returncode if server.proc else '?'}"
                                        f"); log tail:\n{server.log_tail()}")
                return
            gone = pids0 - set(server.pids())
            if gone:  # a worker died (and may have been replaced): its CPU time is lost too
                outcome.problems.append(f"round {rnd + 1}, {server.label}: process(es) "
                                        f"{sorted(gone)} exited during {m.key}; log tail:\n"
                                        f"{server.log_tail()}")
                pids0 = set(server.pids())
            settle(server, fds0)
    code = server.proc.returncode if server.proc else None
    if name == "sniport" and code not in (0, -signal.SIGTERM):
        outcome.problems.append(f"round {rnd + 1}, sniport exit status {code} on SIGTERM")
    lines = server.problems()
    outcome.log_lines += [(server.label, line) for line in lines]
    if name == "sniport":  # an error line from sniport is sniport misbehaving
        outcome.problems += [f"round {rnd + 1}, sniport log: {line}" for line in lines]


# ---------------------------------------------------------------------------------------------
# Machine and report


def sh(cmd: str) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    return {
        "date": sh("date -u"),
        "nproc": sh("nproc"),
        "cpu": cpu,
        "kernel": sh("uname -r"),
        "memory": f"{int(mem) // 1024} MiB",
        "nginx": sh("nginx -v").replace("nginx version: ", ""),
        "wrk": sh("wrk -v | head -1").split(" Copyright")[0],
        "curl": sh("curl -V | head -1"),
        "python": sys.version.split()[0],
        "uvloop": importlib.metadata.version("uvloop"),
        "openssl (python)": ssl.OPENSSL_VERSION,
        "sniport": (sh(f"{SNIPORT} --version") + " @ " + sh(f"git -C {ROOT} rev-parse --short "
                    "HEAD") + (" + uncommitted changes" if sh(f"git -C {ROOT} status "
                               "--porcelain -- sniport") else "")),
        "RLIMIT_NOFILE hard": sh("ulimit -Hn"),
        "loadavg": Path("/proc/loadavg").read_text().strip(),
    }


def _stats(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _values(outcome: Outcome, key: str, server: str, metric: str) -> list[float]:
    return [r.sample.metrics[metric] for r in outcome.records
            if r.measure == key and r.server == server and metric in r.sample.metrics]


def ratio(outcome: Outcome, key: str, metric: str) -> float | None:
    n, s = _values(outcome, key, "nginx", metric), _values(outcome, key, "sniport", metric)
    if not n or not s or statistics.median(n) == 0:
        return None
    return statistics.median(s) / statistics.median(n)


TARGETS = {("M1", "CPU-s/GiB"): "<= 0.70", ("M2", "CPU-ms/conn"): "<= 1.00",
           ("M6p", "KiB/conn"): "<= 0.25"}


def tidy(text: str, session: Session | None = None) -> str:
    """Commands as a reader can rerun them: paths relative to the repository, the scratch
    directory as $SCRATCH and the run's output directory as $OUT."""
    if session is not None:
        text = text.replace(str(session.lab.dir), "$SCRATCH").replace(str(session.out), "$OUT")
    return text.replace(str(ROOT) + "/", "")


def report(session: Session, outcome: Outcome, info: dict[str, str], measures: list[Measure],
           relay_md: str, argv: list[str], elapsed: float) -> str:
    a = session.args
    lines = [
        "# sniport vs the blog post's nginx setup",
        "",
        "Generated by `bench/run` (bench/suite.py); every number below was measured in the run "
        "described here. Rerun to refresh; absolute numbers drift on this shared 2-core box, "
        "the ratios and CPU per unit much less.",
        "",
        f"- command: `{shlex.join(['bench/run', *argv])}` ({elapsed:.0f} s wall)",
        f"- date: {info['date']}",
        f"- machine: {info['nproc']} cores ({info['cpu']}), kernel {info['kernel']}, "
        f"{info['memory']} RAM, RLIMIT_NOFILE hard {info['RLIMIT_NOFILE hard']}; /proc/loadavg "
        f"at the start `{info['loadavg']}`, at the end "
        f"`{Path('/proc/loadavg').read_text().strip()}`"
        " (other work on the box shows here: it moves rates more than CPU per unit)",
        f"- software: nginx {info['nginx']}, {info['wrk']}, {info['curl'].split(' (')[0]}, "
        f"Python {info['python']}, uvloop {info['uvloop']}, {info['openssl (python)']}, "
        f"{info['sniport']}",
        f"- servers: nginx seed setup (bench/nginx/nginx-seed.conf: stream + ssl_preread, "
        f"master + {a.workers} worker) on 127.0.0.1:{PORTS.seed}; sniport (master + "
        f"{a.workers} worker, config below) on 127.0.0.1:{PORTS.sniport}; both pass pass.test "
        "to the same TLS backend, a "
        f"separate nginx (bench/nginx/backend-pass.conf, 1 worker) on 127.0.0.1:"
        f"{PORTS.pass_backend}",
        "- TLS (end to end with the backend, identical for both): TLS 1.3 only, "
        "TLS_AES_256_GCM_SHA384, ECDSA P-256 certificates, session tickets and cache off "
        "(checked before each round: no ticket issued)",
        f"- method: {a.runs} rounds; in each, both servers are started fresh, checked, and "
        "measured one after the other, the order flipping every round (nginx first in round "
        "1); figures are medians with the (min-max) spread. Server CPU = utime+stime of the "
        "server's own processes from /proc/PID/stat (master + workers, for both), before and "
        "after each run; memory = VmRSS sum of the same processes.",
        "",
        "- server commands ($OUT = bench/out/<stamp>, where the logs and rendered configs "
        "stay; $SCRATCH = the scratch directory with the certificates and files, removed at "
        "the end): `nginx -p $OUT/run/nginx-N -c $OUT/run/nginx-N/nginx.conf -e "
        "$OUT/run/nginx-N/error.log -g 'daemon off;'` (N = round), `.venv/bin/sniport run -c "
        "$OUT/run/sniport-N/sniport.toml`; the backend: `nginx -p $OUT/run/backend-pass ...`",
        "",
        "## Summary: sniport / nginx (medians)",
        "",
        "| measure | nginx seed | sniport | sniport / nginx | issue 6 target |",
        "|---|---|---|---|---|",
    ]
    for m in measures:
        for metric in m.metrics:
            if metric.name in ("errors", "non-2xx"):
                continue
            n = _values(outcome, m.key, "nginx", metric.name)
            s = _values(outcome, m.key, "sniport", metric.name)
            rs = ratio(outcome, m.key, metric.name)
            better = "lower is better" if metric.lower_is_better else "higher is better"
            lines.append(f"| {m.title}: {metric.name} ({better}) | "
                         f"{_stats(n, metric.fmt)} | {_stats(s, metric.fmt)} | "
                         f"{'-' if rs is None else f'{rs:.2f}'} | "
                         f"{TARGETS.get((m.key, metric.name), '')} |")
    for m in MEASURES:
        if m.run is None:
            lines.append(f"| {m.title} | - | - | not measured: {m.why_not} | |")
    lines += ["", "Reference figures (../shared/bench-reference/README.md, 2026-11-26, 1 worker):"
              " nginx seed M1 0.73 CPU-s/GiB, M2 0.205 CPU-ms/conn, M6 15.7 KiB per idle "
              "passthrough connection.", ""]

    for m in measures:
        lines += [f"## {m.title}", ""]
        lines.append("Command (PORT = "
                     f"{PORTS.seed} for nginx, {PORTS.sniport} for sniport):")
        lines += ["", "```", tidy(m.command(session, "PORT"), session), "```", ""]
        header = "| server | round | " + " | ".join(x.name for x in m.metrics) + " | raw |"
        lines += [header, "|" + "---|" * (len(m.metrics) + 3)]
        for r in sorted((r for r in outcome.records if r.measure == m.key),
                        key=lambda r: (r.server, r.round)):
            raw = {k: v for k, v in r.sample.raw.items() if k != "wrk_stdout"}
            vals = " | ".join(x.fmt.format(r.sample.metrics.get(x.name, float("nan")))
                              for x in m.metrics)
            lines.append(f"| {r.server} | {r.round + 1} | {vals} | "
                         f"{json.dumps(raw, separators=(',', ':'))} |")
        lines.append("")
        for metric in m.metrics:
            rr = ratio(outcome, m.key, metric.name)
            if rr is not None and metric.name not in ("errors", "non-2xx"):
                lines.append(f"- ratio sniport / nginx, {metric.name}: **{rr:.2f}**")
        lines.append("")

    lines += ["## Checks before measuring", ""]
    lines += [f"- {c}" for c in outcome.checks]
    lines += ["", "## Problems seen", ""]
    if outcome.problems:
        lines += [f"- {p}" for p in outcome.problems]
    else:
        lines.append("- none: every check passed, no wrk socket errors, no non-2xx responses, "
                     "no failed idle connections, no sniport error line (nginx's error-level "
                     "log lines, if any, are in the next section)")
    lines += ["", "## Error-level lines in the servers' logs", ""]
    groups: dict[tuple[str, str], list[str]] = {}
    for label, line in outcome.log_lines:
        shape = re.sub(r"\d+", "N", line.split("] ", 1)[-1])
        shape = re.sub(r"(client|server|upstream): [^,]*", r"\1: ...", shape)
        groups.setdefault((label, shape), []).append(line)
    if not groups:
        lines.append("- none")
    for (label, _), found in sorted(groups.items()):
        lines.append(f"- {label}: {len(found)} line(s) like `{found[0]}`")
    lines += ["", "## sniport config used", "", "```toml",
              sniport_config(a.workers, "$OUT/run/sniport-N/state").rstrip(),
              "```", ""]
    if relay_md:
        lines += [relay_md.rstrip(), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="rounds (medians over them); default 3")
    p.add_argument("--measures", default="M1,M2,M6p",
                   help="comma-separated; built: M1, M2, M6p (default all three)")
    p.add_argument("--servers", default="nginx,sniport", help="default nginx,sniport")
    p.add_argument("--workers", type=int, default=1, help="worker processes of both servers "
                   "(nginx worker_processes, sniport [server].workers); default 1")
    p.add_argument("--bulk-size", type=int, default=GIB, help="M1 bytes; default 1 GiB")
    p.add_argument("--idle-count", type=int, default=5000, help="M6 connections; default 5000")
    p.add_argument("--wrk-duration", type=int, default=3, help="M2 seconds; default 3")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-connections", type=int, default=64)
    p.add_argument("--no-relay", action="store_true", help="skip bench/relay_compare.py")
    p.add_argument("--relay-bytes", type=int, default=GIB, help="relay_compare bytes per run")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"),
                   help="markdown report; '-' for stdout only; default bench/RESULTS.md")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.monotonic()
    keys = [k.strip() for k in args.measures.split(",") if k.strip()]
    by_key = {m.key: m for m in MEASURES}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        print(f"unknown measure(s) {unknown}; known: {list(by_key)}", file=sys.stderr)
        return 2
    not_built = [k for k in keys if by_key[k].run is None]
    if not_built:
        print(f"not built yet: {not_built} ({by_key[not_built[0]].why_not})", file=sys.stderr)
        return 2
    measures = [m for m in MEASURES if m.key in keys]  # registry order: M6 first, on a fresh
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]  # server
    if not set(servers) <= {"nginx", "sniport"}:
        print("--servers: nginx and/or sniport", file=sys.stderr)
        return 2

    try:
        ensure_free(PORTS.all())
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = BENCH / "out" / stamp
    out.mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="sniport-bench-"))
    backend: Server | None = None
    try:
        info = machine()
        log(f"scratch {scratch}; logs and raw data in {out}")
        lab = Lab(scratch, args.bulk_size)
        lab.build([PASS_HOST, "static.test", "app.test"])
        session = Session(lab, args, out)
        log(f"lab ready: certificates, /small, /big = {args.bulk_size} bytes")

        conf = lab.render("backend-pass.conf", out / "run" / "backend-pass", 1)
        backend = Nginx("passthrough backend", PORTS.pass_backend, out / "run" / "backend-pass",
                        conf, 1)
        backend.start()
        direct = check_passthrough(lab, PORTS.pass_backend)
        if direct:
            raise BenchError(f"the passthrough backend itself fails its check: {direct}")

        outcome = Outcome()
        for rnd in range(args.runs):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                server_session(session, name, rnd, measures, outcome)
        if not backend.alive():
            outcome.problems.append("the passthrough backend died during the bench")
        outcome.log_lines += [(backend.label, x) for x in backend.problems()]
        backend.stop()
        backend = None

        relay_md = ""
        if not args.no_relay:
            log("relay comparison: bench/relay_compare.py")
            done = subprocess.run([str(VENV_PY), str(BENCH / "relay_compare.py"),
                                   "--runs", str(args.runs), "--bytes", str(args.relay_bytes),
                                   "--ports", f"{PORTS.relay_a},{PORTS.relay_b}",
                                   "--markdown"], capture_output=True, text=True, check=False)
            (out / "relay_compare.stderr").write_text(done.stderr)
            if done.returncode != 0:
                outcome.problems.append(f"relay_compare.py exit {done.returncode}: "
                                        f"{done.stderr.strip()[-2000:]}")
            relay_md = done.stdout

        (out / "raw.json").write_text(json.dumps(
            {"machine": info, "records": [
                {"measure": r.measure, "server": r.server, "round": r.round,
                 "metrics": r.sample.metrics, "raw": r.sample.raw,
                 "problems": r.sample.problems} for r in outcome.records],
             "problems": outcome.problems, "checks": outcome.checks}, indent=1))
        text = report(session, outcome, info, measures, relay_md, argv,
                      time.monotonic() - t_start)
        if args.out == "-":
            print(text)
        else:
            Path(args.out).write_text(text)
            (out / "RESULTS.md").write_text(text)
            log(f"wrote {args.out}")
        for p in outcome.problems:
            log(f"PROBLEM: {p}")
        return 1 if outcome.problems else 0
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        if backend is not None:
            backend.stop()
        if args.keep:
            log(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
