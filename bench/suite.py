"""sniport against the blog post's nginx setup, side by side, on this machine.

Run it through ``bench/run`` (which installs nginx, the stream module, wrk and curl first);
``bench/run --help`` lists the options.

What one run does:

1. a scratch directory with an ECDSA P-256 CA and leaf certificates (pass.test, static.test,
   app.test), the passthrough backend's files (/small 100 B, /big = --bulk-size), static.test's
   root (/1k.bin, 1024 bytes; index.html, 1024 bytes, for M3i's /; /100k.bin and /1m.bin for
   M3s's mix, which wrk asks for in turn through the Lua script ``mix.lua``, MIX_SCRIPT) and
   a private hosts file;
2. the nginx configs of ../shared/bench-reference (vendored in bench/nginx/) rendered with a
   private prefix per instance, run as ``nginx -p RUN -c RUN/nginx.conf -e RUN/error.log``;
3. two backends shared by both servers, each a separate nginx with 1 worker: the TLS
   passthrough target (backend-pass.conf) and the 100-byte HTTP app (backend-app.conf);
4. rounds: in each, for each worker count of --workers (nginx worker_processes = sniport
   [server].workers), the nginx seed setup, nginx without the hop (nginx-direct.conf, on the
   terminated measures only: Measure.direct) and sniport (the equivalent config, see
   ``sniport_config``) ALTERNATING (the order reverses every round and between worker counts),
   each started fresh, checked (right certificate subject and DER, TLS 1.3 with
   TLS_AES_256_GCM_SHA384 over X25519, no session ticket and no resumption, right content on
   every route), then measured. The memory measures (M6p, M6t) each get a server of their own,
   started just for them; M1-M5 share one;
5. with --scaling, a second pass: M3 and M4 at 1, 64 and 1,000 concurrent connections (and
   the peak RSS per busy connection), M6 (passthrough and terminated) at 1, 64, 1,000, 4,000
   and 8,000 idle connections held at once on one fresh server (the connections are added,
   the RSS read at each count); with --config-scaling, the config-size rows (run_config_pass);
6. bench/relay_compare.py (splice vs transport relay), unless --no-relay;
   (M7 and M8, issue 9 item 4, are HTTP/2 against HTTP/1.1: h2load, and bench/pageload.py
   for page loads as a browser makes them; a server that does not select h2 in ALPN shows
   "h2 not negotiated" in their h2 cells, a problem for nginx, a note for sniport);
7. bench/RESULTS.md (--out), plus logs and raw JSON in bench/out/<stamp>/.

Server cost is the utime+stime of the server's own processes (master + workers, for nginx
and sniport alike: the process we started and every process below it) from /proc/PID/stat
before and after a run, never the load generator's or the backends'. Memory is the VmRSS sum
of the same processes. wrk's socket errors and non-2xx responses are counted and reported,
and the bytes wrk read per response are checked against the size of the right answer.

Measures are a registry (MEASURES), each a function ``(Session, Server) -> Sample`` with its
metrics and its exact command; the issue 13 targets (ratios sniport / nginx seed, and for some
sniport / nginx direct) are in TARGETS.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import importlib.metadata
import itertools
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
from collections.abc import Callable, Sequence
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
# sniport runs from a copy of its source taken at the start of the run (Lab.snapshot): others
# may edit the working tree meanwhile, and every round must measure the same code.
SNIPORT_SRC = ROOT / "sniport"
TICK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
PASS_HOST = "pass.test"
SMALL_BODY = (b"sniport-bench /small: 100 bytes through the passthrough, exactly. "
              b"0123456789abcdef0123456789abcdef!\n")
assert len(SMALL_BODY) == 100
STATIC_HOST = "static.test"
STATIC_PATH = "/1k.bin"
STATIC_BODY = bytes(range(256)) * 4  # 1 KiB, every byte value: a wrong byte shows
INDEX_PATH = "/"  # M3i: the static root's index.html, found by index resolution


def _index_body() -> bytes:
    """A 1 KiB index.html (exactly 1,024 bytes): what ``/`` of static.test answers."""
    head = (b"<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            b"<title>sniport bench index</title></head>\n<body>\n<h1>static.test</h1>\n<p>")
    tail = b"</p>\n</body>\n</html>\n"
    filler = b"The bench's M3i asks for / and gets this page by index resolution. " * 20
    return head + filler[:1024 - len(head) - len(tail)] + tail


INDEX_BODY = _index_body()
assert len(INDEX_BODY) == 1024, len(INDEX_BODY)
# M3s: a mix of static sizes over keep-alive, wrk rotating the paths (bench/suite.py writes
# the Lua script: mix_script). 1 KiB is M3's file itself.
MIX: tuple[tuple[str, int], ...] = (("/1k.bin", 1 << 10), ("/100k.bin", 100 << 10),
                                    ("/1m.bin", 1 << 20))
assert MIX[0] == (STATIC_PATH, len(STATIC_BODY))
SITES_CERT = "*.sites.test"  # the config-size rows' extra site, one name of it per connection
APP_HOST = "app.test"
APP_PATH = "/"
PAGE_PATH = "/page/index.html"  # M8: static.test's page and its 30 assets (make_page)
PAGE_ASSETS = 30


def make_page(www: Path, assets: int = PAGE_ASSETS) -> list[str]:
    """A page as a browser loads it, under ``www``/page: index.html (about 3 KiB) naming
    ``assets`` small files, a third each of css, js and png-ish, 2-10 KiB, sizes and bytes
    fixed by a seed (the same page every run). Returns every path, the page first."""
    import random

    rng = random.Random(9)
    page = www / "page"
    (page / "css").mkdir(parents=True)
    (page / "js").mkdir()
    (page / "img").mkdir()
    links, scripts, imgs = [], [], []
    paths = []
    for i in range(assets):
        size = rng.randint(2 << 10, 10 << 10)
        kind = ("css", "js", "img")[i % 3]
        if kind == "css":
            rule = f".c{i} {{ margin: 0 auto; padding: 4px 8px; color: #{i:06x}; }}\n"
            body = (rule * (size // len(rule) + 1)).encode()[:size]
            rel = f"/page/css/s{i:02d}.css"
            links.append(f'<link rel="stylesheet" href="{rel}">')
        elif kind == "js":
            line = f"function f{i}(a, b) {{ return a * {i} + b; }} // sniport bench\n"
            body = (line * (size // len(line) + 1)).encode()[:size]
            rel = f"/page/js/a{i:02d}.js"
            scripts.append(f'<script src="{rel}" defer></script>')
        else:  # a PNG signature, then bytes that do not compress
            body = b"\x89PNG\r\n\x1a\n" + rng.randbytes(size - 8)
            rel = f"/page/img/i{i:02d}.png"
            imgs.append(f'<img src="{rel}" width="64" height="64" alt="image {i}">')
        (www / rel.lstrip("/")).write_bytes(body)
        paths.append(rel)
    filler = "".join(f"<p>Paragraph {n}: sniport serves this page over HTTP/1.1 and HTTP/2 "
                     "for the bench's M8.</p>\n" for n in range(20))
    html = ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>sniport bench page</title>\n" + "\n".join(links) + "\n"
            + "\n".join(scripts) + "\n</head>\n<body>\n<h1>A page and 30 assets</h1>\n"
            + filler + "\n".join(imgs) + "\n</body>\n</html>\n")
    (www / PAGE_PATH.lstrip("/")).write_text(html)
    return [PAGE_PATH, *paths]


def _app_body() -> bytes:
    """The app backend's fixed answer, from bench/nginx/backend-app.conf itself."""
    text = (TEMPLATES / "backend-app.conf").read_text()
    found = re.search(r'return 200 "([^"]*)";', text)
    if found is None:
        raise RuntimeError("bench/nginx/backend-app.conf: no `return 200 \"...\";`")
    return found.group(1).replace("\\n", "\n").encode()


APP_BODY = _app_body()
assert len(APP_BODY) == 100, len(APP_BODY)


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
    sniport_metrics: int = 20909  # sniport's /metrics, with --sniport-metrics only

    def all(self) -> list[int]:
        return [self.seed, self.sniport, self.direct, self.pass_backend, self.app_backend,
                self.relay_a, self.relay_b, self.sniport_metrics]


PORTS = Ports()


@dataclass(frozen=True)
class Extra:
    """More names for the config-size rows: in the passthrough block (sniport) / the stream
    map (nginx seed), each to the passthrough backend like pass.test; and in one more site
    (sniport [[site]] "bulk" / an nginx `server` with these server_names), SITES_CERT's
    certificate, static.test's root."""

    passthrough: tuple[str, ...] = ()
    site: tuple[str, ...] = ()


NO_EXTRA = Extra()


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


def cert_stem(host: str) -> str:
    """The file name of ``host``'s certificate and key in pki/, without .crt / .key."""
    return host.replace("*", "_")


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
            stem = cert_stem(host)
            (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (pki / f"{stem}.key").write_bytes(_pem_key(key))
            (pki / f"{stem}.key").chmod(0o600)
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
        www = self.dir / "www"  # static.test's root
        www.mkdir()
        (www / STATIC_PATH.lstrip("/")).write_bytes(STATIC_BODY)
        (www / "index.html").write_bytes(INDEX_BODY)
        for path, size in MIX[1:]:  # incompressible, different in every run
            (www / path.lstrip("/")).write_bytes(os.urandom(size))
        make_page(www)
        self.hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                                   f"127.0.0.1 {' '.join(h for h in hosts if '*' not in h)}\n")

    def big_slice(self, start: int, length: int) -> bytes:
        with self.big.open("rb") as f:
            f.seek(start)
            return f.read(length)

    def render(self, template: str, run: Path, workers: int, listen: str = "",
               extra: Extra = NO_EXTRA) -> Path:
        """Render ``template`` (and the includes) into ``run``; returns run/nginx.conf.
        ``extra``: more names for the seed setup's map and one more `http` server (the
        config-size rows), with hashes big enough for them."""
        pass_extra, site_extra = extra.passthrough, extra.site
        site_block = ""
        if site_extra:
            site_block = (f"server {{\n    listen {listen} ssl http2;\n    server_name "
                          + "\n        ".join(site_extra) + ";\n"
                          f"    ssl_certificate {self.dir}/pki/{cert_stem(SITES_CERT)}.crt;\n"
                          f"    ssl_certificate_key {self.dir}/pki/{cert_stem(SITES_CERT)}.key;\n"
                          f"    root {self.dir}/www;\n}}")
        run.mkdir(parents=True, exist_ok=True)
        (run / "tmp").mkdir(exist_ok=True)
        (run / "logs").mkdir(exist_ok=True)
        subst = {"@W@": str(workers), "@RUN@": str(run), "@CONF@": str(run),
                 "@LAB@": str(self.dir), "@LISTEN@": listen,
                 "@SEED_PORT@": str(PORTS.seed), "@PASS_PORT@": str(PORTS.pass_backend),
                 "@APP_PORT@": str(PORTS.app_backend),
                 "@PASS_EXTRA@": "\n        ".join(f"{h}  127.0.0.1:{PORTS.pass_backend};"
                                                   for h in pass_extra),
                 # nginx refuses to build a map hash bigger than map_hash_max_size (2048)
                 "@MAP_HASH@": (f"map_hash_max_size {max(2048, 4 * len(pass_extra))}; "
                                "map_hash_bucket_size 64;" if pass_extra else ""),
                 "@SERVER_NAMES_HASH@": (f"server_names_hash_max_size "
                                         f"{max(1024, 4 * len(site_extra))}; "
                                         "server_names_hash_bucket_size 64;"
                                         if site_extra else ""),
                 "@SITE_EXTRA@": site_block}

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
        self.env: dict[str, str] | None = None
        self.log_path = run / "stderr.log"

    def start(self) -> None:
        ensure_free([self.port])
        self.run.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, env=self.env,
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
    def __init__(self, label: str, port: int, run: Path, workers: int, lab: Path,
                 metrics: bool = False, extra: Extra = NO_EXTRA,
                 ip_limits: bool = False) -> None:
        super().__init__(label, port, run)
        self.ip_limits = ip_limits
        run.mkdir(parents=True, exist_ok=True)
        (run / "state").mkdir(exist_ok=True)
        self.workers = workers
        self.metrics = metrics
        self.lab = lab
        self.config = run / "sniport.toml"
        self.write_config(extra)
        self.command = [str(VENV_PY), "-m", "sniport", "run", "-c", str(self.config)]
        self.env = snapshot_env(lab)

    def write_config(self, extra: Extra) -> None:
        self.config.write_text(sniport_config(self.workers, self.run / "state", self.lab,
                                              metrics=self.metrics, extra=extra,
                                              ip_limits=self.ip_limits))

    def start(self) -> None:
        if self.metrics:  # the master binds it: nobody else may hold it
            ensure_free([PORTS.sniport_metrics])
        super().start()

    def ready(self) -> None:  # the master and its workers
        wait_for(lambda: len(self.pids()) >= 1 + self.workers, 20,
                 f"{self.label}'s {self.workers} worker(s)")
        if self.metrics:
            wait_for(lambda: listening(PORTS.sniport_metrics), 20,
                     f"{self.label}'s /metrics on {PORTS.sniport_metrics}")

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if re.search(r"Traceback|ERROR|CRITICAL|Error:|exception|died", line)]


def sniport_config(workers: int, state_dir: Path | str, lab: Path | str, *,
                   metrics: bool = False, extra: Extra = NO_EXTRA,
                   ip_limits: bool = False) -> str:
    """The sniport equivalent of nginx-seed.conf + http-servers.inc: pass.test passed
    through, static.test and app.test terminated with the same certificates. ``metrics``
    (--sniport-metrics) adds [server] metrics_listen: workers then count into the shared
    mapping the master serves, instead of a private buffer (issue 11 item 3). ``extra``:
    more names in the passthrough block's hosts and one more site (the config-size rows).
    ``ip_limits`` (--sniport-ip-limits): both per-address limits on, set far above what the
    bench opens, so that every connection pays their cost and none is refused."""
    hosts = ", ".join(f'"{h}"' for h in (PASS_HOST, *extra.passthrough))
    site_block = ""
    if extra.site:
        names = ", ".join(f'"{h}"' for h in extra.site)
        pem = f"{lab}/pki/{cert_stem(SITES_CERT)}"
        site_block = f"""
[[site]]
name = "bulk"                 # the config-size rows only (nginx: one more server, these names)
hosts = [{names}]
tls = {{ cert = "{pem}.crt", key = "{pem}.key" }}

  [[site.route]]
  path = "/"
  static = {{ root = "{lab}/www" }}
"""
    metrics_line = (f'metrics_listen = "127.0.0.1:{PORTS.sniport_metrics}"  # --sniport-metrics; '
                    "nginx: no equivalent\n" if metrics else "")
    limits_line = ('max_connections_per_ip = 1000000     # --sniport-ip-limits: counted, '
                   'never reached\nmax_connection_rate_per_ip = "65535/s"\n'
                   if ip_limits else "")
    return f"""\
# sniport's side of the bench: the equivalent of nginx-seed.conf + http-servers.inc
[server]
listen = ["127.0.0.1:{PORTS.sniport}"]
workers = {workers}                   # nginx: worker_processes {workers}
max_connections = 9000        # per worker; M6 holds up to 8,000 (nginx: worker_connections 19000)
access_log = "off"            # nginx: access_log off, and its stream logs nothing by default
log_level = "warning"
state_dir = "{state_dir}"     # pid file; never the system's /var/lib/sniport
drain_timeout = "5s"
tls_session_tickets = false   # nginx: ssl_session_tickets off; ssl_session_cache off; NumTickets 0
header_timeout = "60s"        # nginx: client_header_timeout 60s (M6 holds connections, no request)
keepalive_timeout = "75s"     # nginx: keepalive_timeout 75s
http2_max_requests = 1000000  # nginx: keepalive_requests 1000000 (HTTP/2 streams too, 1.19.7+)
http2_max_streams = 128       # nginx: http2_max_concurrent_streams 128 (its default)
{metrics_line}{limits_line}
[[passthrough]]
name = "pass"
hosts = [{hosts}]
upstreams = ["127.0.0.1:{PORTS.pass_backend}"]

[[site]]
name = "static"
hosts = ["{STATIC_HOST}"]
tls = {{ cert = "{lab}/pki/{STATIC_HOST}.crt", key = "{lab}/pki/{STATIC_HOST}.key" }}
http2 = true                  # the default; nginx: listen ... ssl http2

  [[site.route]]
  path = "/"
  static = {{ root = "{lab}/www" }}   # nginx: root {lab}/www

[[site]]
name = "app"
hosts = ["{APP_HOST}"]
tls = {{ cert = "{lab}/pki/{APP_HOST}.crt", key = "{lab}/pki/{APP_HOST}.key" }}
http2 = true

  [[site.route]]
  path = "/"
  # nginx: upstream app_backend {{ server 127.0.0.1:{PORTS.app_backend}; keepalive 64; }}
  proxy = {{ upstreams = ["http://127.0.0.1:{PORTS.app_backend}"], keepalive = 64 }}
{site_block}
[default]
to = "site:static"            # nginx: any other name reaches the http servers (static.test first)
"""


# ---------------------------------------------------------------------------------------------
# Checks: each route answers correctly (right certificate, right content) through a server


_CONTEXTS: dict[Path, ssl.SSLContext] = {}


def _client_context(lab: Lab) -> ssl.SSLContext:
    """One client context per lab: a session can only be offered again through the context
    that made it."""
    ctx = _CONTEXTS.get(lab.dir)
    if ctx is None:
        ctx = _CONTEXTS[lab.dir] = ssl.create_default_context(cafile=str(lab.ca_file))
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
    session: ssl.SSLSession | None
    reused: bool


def _https(lab: Lab, port: int, host: str, method: str, path: str,
           headers: dict[str, str] | None = None,
           session: ssl.SSLSession | None = None) -> Answer:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with _client_context(lab).wrap_socket(raw, server_hostname=host, session=session) as tls:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                    f"{extra}\r\n".encode())
        data = bytearray()
        while chunk := tls.recv(1 << 16):
            data += chunk
        cipher = tls.cipher()
        got = tls.session  # after reading: TLS 1.3 tickets arrive after the handshake
        answer_tls = (tls.getpeercert(binary_form=True), tls.version(),
                      cipher[0] if cipher else None, got is not None and got.has_ticket,
                      got, bool(tls.session_reused))
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise http.client.HTTPException(f"no complete response head in {len(data)} bytes")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, v in
              (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return Answer(status, fields, body, *answer_tls)


def tls_brief(lab: Lab, port: int, host: str) -> dict[str, str]:
    """What ``openssl s_client -brief`` saw: protocol, suite, group, signature, subject."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", host,
           "-brief", "-CAfile", str(lab.ca_file), "-verify_return_error",
           "-verify_hostname", host]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, check=False)
    facts = {"exit": str(done.returncode)}
    for line in (done.stdout + done.stderr).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            facts.setdefault(key.strip(), value.strip())
    return facts


def check_tls(lab: Lab, port: int, host: str, a: Answer) -> list[str]:
    """The handshake of ``a`` and one by openssl s_client: the certificate we issued for
    ``host``, TLS 1.3, TLS_AES_256_GCM_SHA384, X25519, ECDSA, no ticket."""
    bad = []
    if a.cert_der != lab.certs_der[host]:
        bad.append(f"{host}: the certificate is not the one issued for {host}")
    if a.version != "TLSv1.3":
        bad.append(f"{host}: {a.version} negotiated, not TLSv1.3")
    if a.cipher != "TLS_AES_256_GCM_SHA384":
        bad.append(f"{host}: cipher {a.cipher}, not TLS_AES_256_GCM_SHA384")
    if a.ticket:
        bad.append(f"{host}: a session ticket was issued (tickets must be off)")
    f = tls_brief(lab, port, host)
    want = {"Protocol version": "TLSv1.3", "Ciphersuite": "TLS_AES_256_GCM_SHA384",
            "Peer certificate": f"CN = {host}", "Signature type": "ECDSA",
            "Verification": "OK"}
    for key, value in want.items():
        if f.get(key) != value:
            bad.append(f"{host}: openssl s_client saw {key} {f.get(key)!r}, not {value!r} "
                       f"(exit {f['exit']})")
    if not f.get("Server Temp Key", "").startswith("X25519"):
        bad.append(f"{host}: key exchange {f.get('Server Temp Key')!r}, not X25519")
    return bad


def check_passthrough(lab: Lab, port: int) -> list[str]:
    """pass.test through ``port``: the backend's own certificate (verified, and the very DER
    we issued), TLS 1.3 without a session ticket, /small exactly, /big's length and tail."""
    bad: list[str] = []
    try:
        a = _https(lab, port, PASS_HOST, "GET", "/small")
        bad += check_tls(lab, port, PASS_HOST, a)
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


def check_terminated(lab: Lab, port: int) -> list[str]:
    """static.test and app.test through ``port``: each site's own certificate, TLS as in
    check_tls, the exact content, and a second handshake offering the first one's session
    that is NOT resumed (every handshake full)."""
    bad: list[str] = []
    try:
        a = _https(lab, port, STATIC_HOST, "GET", STATIC_PATH)
        bad += check_tls(lab, port, STATIC_HOST, a)
        if a.status != 200 or a.body != STATIC_BODY:
            bad.append(f"static.test{STATIC_PATH}: status {a.status}, {len(a.body)} bytes, "
                       f"{'right' if a.body == STATIC_BODY else 'WRONG'} content")
        if a.headers.get("content-length") != str(len(STATIC_BODY)):
            bad.append(f"static.test{STATIC_PATH}: Content-Length "
                       f"{a.headers.get('content-length')}, not {len(STATIC_BODY)}")
        again = _https(lab, port, STATIC_HOST, "GET", STATIC_PATH, session=a.session)
        if again.reused:
            bad.append("static.test: a second connection RESUMED the first one's session "
                       "(resumption must be off: every handshake full)")
        if again.ticket:
            bad.append("static.test: a session ticket was issued on the second connection")
        # M3i's / (index resolution) and M3s's sizes: the exact bytes and Content-Length
        wanted = [(INDEX_PATH, INDEX_BODY)] + [
            (path, (lab.dir / "www" / path.lstrip("/")).read_bytes()) for path, _ in MIX[1:]]
        for path, body in wanted:
            c = _https(lab, port, STATIC_HOST, "GET", path)
            if c.status != 200 or c.body != body:
                bad.append(f"static.test{path}: status {c.status}, {len(c.body)} bytes, "
                           f"{'right' if c.body == body else 'WRONG'} content "
                           f"(expected {len(body)} bytes)")
            if c.headers.get("content-length") != str(len(body)):
                bad.append(f"static.test{path}: Content-Length "
                           f"{c.headers.get('content-length')}, not {len(body)}")
        b = _https(lab, port, APP_HOST, "GET", APP_PATH)
        bad += check_tls(lab, port, APP_HOST, b)
        if b.status != 200 or b.body != APP_BODY:
            bad.append(f"app.test{APP_PATH}: status {b.status}, {len(b.body)} bytes, "
                       f"{'right' if b.body == APP_BODY else 'WRONG'} content")
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        bad.append(f"terminated sites: {type(exc).__name__}: {exc}")
    return bad


CHECKED = ("pass.test (the backend's certificate) and static.test, app.test (their own "
           "certificates): the DER we issued, subject CN = the name, verified against our CA; "
           "TLSv1.3, TLS_AES_256_GCM_SHA384, X25519, ECDSA (Python ssl and openssl s_client); no "
           "session ticket; a second static.test handshake offering the first session is not "
           "resumed; pass.test /small 100 B exact, /big length and tail; static.test "
           f"{STATIC_PATH} 1024 B exact, {INDEX_PATH} the root's 1 KiB index.html exact (index "
           "resolution), " + ", ".join(f"{p} {n:,} B" for p, n in MIX[1:]) + " exact with "
           f"their Content-Length; app.test {APP_PATH} the app's 100 B exact")


def check_app_backend(port: int) -> list[str]:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", APP_PATH, headers={"Host": APP_HOST})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return [f"app backend: {type(exc).__name__}: {exc}"]
    if resp.status != 200 or body != APP_BODY:
        return [f"app backend: status {resp.status}, {len(body)} bytes"]
    return []


# ---------------------------------------------------------------------------------------------
# Measures


@dataclass
class Sample:
    metrics: dict[str, float]
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # metric -> why it has no value (e.g. "h2 not negotiated"): shown in its cells instead
    missing: dict[str, str] = field(default_factory=dict)


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


COUNTS = ("errors", "non-2xx")  # metrics that are tallies of things gone wrong, not rates


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    command: Callable[[Session, str], str]  # the exact command, for RESULTS.md
    run: Callable[[Session, Server], Sample]
    fresh: bool = False  # memory: on a server of its own, started just for it
    # nginx without the hop (nginx-direct.conf) has the terminated sites only: measured there too
    direct: bool = False
    note: str = ""  # how it works, for the report under its command
    settle_slack: int = 0  # fds per worker the server may keep after it (upstream keepalive)


def settle(server: Server, baseline_fds: int, slack: int = 0, timeout: float = 15.0) -> None:
    """Wait until the server has closed what the last measure opened."""
    with contextlib.suppress(BenchError):
        wait_for(lambda: fd_count(server.pids()) <= baseline_fds + 2 + slack, timeout,
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


def wrk_command(session: Session, port: str, host: str, path: str, *, close: bool,
                connections: int | None = None) -> list[str]:
    a = session.args
    conns = connections or a.wrk_connections
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
           str(session.lab.hosts_file), "wrk", f"-t{min(a.wrk_threads, conns)}", f"-c{conns}",
           f"-d{a.wrk_duration}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    return [*cmd, f"https://{host}:{port}{path}"]


_BINARY = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_wrk(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)([KMGT]?B) read", text):
        out["requests"] = int(m.group(1))
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        out["seconds"] = float(m.group(2)) * scale
        out["bytes_read"] = round(float(m.group(4)) * _BINARY[m.group(5)])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      text):
        for k, v in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            out[f"err_{k}"] = int(v)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx_3xx"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    return out


class PeakRss:
    """The highest VmRSS sum of ``pids`` while in the ``with`` block, read every 0.1 s by a
    thread (the bench's own CPU: never counted as the server's)."""

    def __init__(self, pids: Sequence[int]) -> None:
        import threading

        self.pids = pids
        self.before = rss_kib(pids)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_kib(self.pids))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _WrkRun:
    """One wrk run and the server's CPU around it (user and system seconds)."""

    done: subprocess.CompletedProcess[str]
    w: dict[str, float]
    problems: list[str]
    utime: float
    stime: float
    rss: PeakRss | None

    @property
    def cpu(self) -> float:
        return self.utime + self.stime


def _timed_wrk(session: Session, server: Server, cmd: list[str],
               peak_rss: bool = False) -> _WrkRun:
    pids = server.pids()
    u0, s0 = cpu_split(pids)
    with PeakRss(pids) if peak_rss else contextlib.nullcontext() as rss:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=session.args.wrk_duration + 90, check=False)
    time.sleep(0.2)
    u1, s1 = cpu_split(pids)
    w = parse_wrk(done.stdout)
    return _WrkRun(done, w, _wrk_problems(done, w), u1 - u0, s1 - s0,
                   rss if isinstance(rss, PeakRss) else None)


def run_wrk(session: Session, server: Server, host: str, path: str, body_len: int, *,
            close: bool, connections: int | None = None, peak_rss: bool = False) -> Sample:
    """wrk against ``server``: the rate, the server's CPU per request (or per connection
    with ``close``), wrk's socket errors and non-2xx responses, and a check that the bytes
    read per response fit the right answer (body + a head of 60-800 bytes). ``peak_rss``
    (the scaling pass): also the server's peak RSS during the run minus before, per wrk
    connection ("KiB/conn peak": memory per busy connection)."""
    cmd = wrk_command(session, str(server.port), host, path, close=close,
                      connections=connections)
    run = _timed_wrk(session, server, cmd, peak_rss)
    done, w, problems, rss = run.done, run.w, run.problems, run.rss
    cpu = run.cpu
    errors = sum(int(v) for k, v in w.items() if k.startswith("err_"))
    non2xx = int(w.get("non_2xx_3xx", 0))
    requests = int(w.get("requests", 0))
    per_response = w.get("bytes_read", 0) / requests if requests else 0.0
    if requests and not body_len + 60 <= per_response <= body_len + 800:
        problems.append(f"wrk read {per_response:.0f} bytes per response; the right answer "
                        f"is {body_len} bytes of body and a head: wrong content?")
    if close:
        metrics = {"conn/s": w.get("rps", 0.0),
                   "CPU-ms/conn": cpu * 1e3 / requests if requests else 0.0}
    else:
        metrics = {"req/s": w.get("rps", 0.0),
                   "CPU-us/req": cpu * 1e6 / requests if requests else 0.0}
    metrics |= {"errors": errors, "non-2xx": non2xx}
    raw = {"wrk": w, "bytes_per_response": round(per_response), "utime_s": round(run.utime, 2),
           "stime_s": round(run.stime, 2), "wrk_stdout": done.stdout}
    if isinstance(rss, PeakRss):
        conns = connections or session.args.wrk_connections
        metrics["KiB/conn peak"] = (rss.peak - rss.before) / conns
        raw |= {"rss_before_kib": rss.before, "rss_peak_kib": rss.peak}
    return Sample(metrics, raw, problems)


MIX_SCRIPT = """\
-- bench/suite.py M3s: every wrk thread asks for {paths} in turn (one of each per
-- three requests), on keep-alive connections; each answer's body is counted by its size.
local paths = {{{lua_paths}}}
local sizes = {{{lua_sizes}}}
local reqs = {{}}
local i = 0
local threads = {{}}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   for k, p in ipairs(paths) do reqs[k] = wrk.format("GET", p) end
   for k = 1, #sizes do _G["got" .. k] = 0 end
   wrong = 0
   not200 = 0
end

function request()
   i = i % #reqs + 1
   return reqs[i]
end

function response(status, headers, body)
   if status ~= 200 then not200 = not200 + 1 end
   local n = #body
   for k = 1, #sizes do
      if n == sizes[k] then
         _G["got" .. k] = _G["got" .. k] + 1
         return
      end
   end
   wrong = wrong + 1
end

function done(summary, latency, requests)
   local got = {{}}
   local w, bad = 0, 0
   for k = 1, #sizes do got[k] = 0 end
   for _, thread in ipairs(threads) do
      for k = 1, #sizes do got[k] = got[k] + thread:get("got" .. k) end
      w = w + thread:get("wrong")
      bad = bad + thread:get("not200")
   end
   io.write("sniport-bench-mix: sizes")
   for k = 1, #sizes do io.write(string.format(" %d:%d", sizes[k], got[k])) end
   io.write(string.format(" wrong %d not200 %d\\n", w, bad))
end
"""


def mix_script(session: Session) -> Path:
    """M3s's Lua script for wrk (written once per run into the output directory)."""
    path = session.out / "mix.lua"
    if not path.exists():
        path.write_text(MIX_SCRIPT.format(
            paths=", ".join(p for p, _ in MIX),
            lua_paths=", ".join(f'"{p}"' for p, _ in MIX),
            lua_sizes=", ".join(str(n) for _, n in MIX)))
    return path


def mix_command(session: Session, port: str) -> list[str]:
    cmd = wrk_command(session, port, STATIC_HOST, "/", close=False)
    return [*cmd[:-1], "-s", str(mix_script(session)), cmd[-1]]


def run_wrk_mix(session: Session, server: Server) -> Sample:
    """M3s: wrk with mix.lua against static.test (MIX, one of each size per three requests,
    keep-alive): req/s, body MB/s, server CPU-us per request and CPU-ms per MB of body (10^6
    bytes), wrk's errors and non-2xx, and the size of every answer counted by the script:
    a body of any other size is a problem, and so is a mix off by more than the requests
    that can be in flight at the end (one per connection)."""
    run = _timed_wrk(session, server, mix_command(session, str(server.port)))
    done, w, problems, cpu = run.done, run.w, run.problems, run.cpu
    requests = int(w.get("requests", 0))
    got: dict[int, int] = {}
    wrong = not200 = 0
    if m := re.search(r"sniport-bench-mix: sizes((?: \d+:\d+)+) wrong (\d+) not200 (\d+)",
                      done.stdout):
        got = {int(a): int(b) for a, b in (x.split(":") for x in m.group(1).split())}
        wrong, not200 = int(m.group(2)), int(m.group(3))
    elif requests:
        problems.append("wrk: no sizes line from mix.lua (is the script's done() run?)")
    counted = sum(got.values()) + wrong
    if got and counted != requests:
        problems.append(f"mix.lua counted {counted} answers, wrk {requests} requests")
    if wrong:
        problems.append(f"mix.lua: {wrong} answers of a size not in the mix: wrong content?")
    if not200:
        problems.append(f"mix.lua: {not200} answers not 200")
    if got and requests:
        share = requests / len(MIX)
        off = {n: c for n, c in got.items() if abs(c - share) > session.args.wrk_connections + 3}
        if off:
            problems.append(f"mix.lua: the sizes are not one in {len(MIX)} each ({got} for "
                            f"{requests} requests)")
    body_bytes = sum(n * c for n, c in got.items())
    seconds = w.get("seconds", 0.0)
    errors = sum(int(v) for k, v in w.items() if k.startswith("err_"))
    metrics = {"req/s": w.get("rps", 0.0),
               "CPU-us/req": cpu * 1e6 / requests if requests else 0.0,
               "MB/s": body_bytes / seconds / 1e6 if seconds else 0.0,
               "CPU-ms/MB": cpu * 1e3 / (body_bytes / 1e6) if body_bytes else 0.0,
               "errors": errors, "non-2xx": int(w.get("non_2xx_3xx", 0))}
    return Sample(metrics, {"wrk": w, "sizes": {str(k): v for k, v in got.items()},
                            "wrong_size": wrong, "body_bytes": body_bytes,
                            "utime_s": round(run.utime, 2), "stime_s": round(run.stime, 2),
                            "wrk_stdout": done.stdout}, problems)


def _wrk_problems(done: subprocess.CompletedProcess[str], w: dict[str, float]) -> list[str]:
    """wrk's exit, socket errors and non-2xx answers, as problems."""
    problems = []
    if done.returncode != 0 or "requests" not in w:
        problems.append(f"wrk exit {done.returncode}: {done.stdout.strip()} "
                        f"{done.stderr.strip()}")
    if any(v for k, v in w.items() if k.startswith("err_")):
        problems.append("wrk socket errors: " + ", ".join(
            f"{k[4:]} {int(v)}" for k, v in w.items() if k.startswith("err_") and v))
    if w.get("non_2xx_3xx"):
        problems.append(f"wrk: {int(w['non_2xx_3xx'])} responses neither 2xx nor 3xx")
    return problems


def idle_command(session: Session, port: str, sni: str, count: int | None = None) -> list[str]:
    return [str(VENV_PY), str(BENCH / "idle_clients.py"), "--port", port, "--sni", sni,
            "--cafile", str(session.lab.ca_file), "--count",
            str(count or session.args.idle_count)]


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"no answer from the idle client in {timeout:.0f}s")
    return proc.stdout.readline()


def _ask(proc: subprocess.Popen[str], line: str, timeout: float) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    got: dict[str, Any] = json.loads(_readline(proc, timeout) or "{}")
    return got


def idle_steps(session: Session, server: Server, sni: str,
               counts: Sequence[int]) -> list[Sample]:
    """Hold idle TLS connections to ``sni`` (handshake done, no request), growing to each of
    ``counts`` in turn on the same server; at each, RSS of the server's processes minus RSS
    before the first, per connection held."""
    pids = server.pids()
    fds0 = fd_count(pids)
    rss0 = rss_kib(pids)
    proc = subprocess.Popen(idle_command(session, str(server.port), sni, counts[0]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples: list[Sample] = []
    try:
        for i, count in enumerate(counts):
            if i == 0:
                line = _readline(proc, 180)
                batch = json.loads(line) if line else {}
            else:
                batch = _ask(proc, f"open {count - counts[i - 1]}", 180)
            if not batch:
                samples.append(Sample({}, {"wanted": count}, [
                    f"the idle client died before holding {count}: "
                    f"{(proc.stderr.read() if proc.stderr else '')[-500:]}"]))
                break
            time.sleep(1.0)  # let the server finish what the last handshakes started
            rss1 = rss_kib(pids)
            fds1 = fd_count(pids)
            status = _ask(proc, "status", 30)
            held = int(batch.get("held", batch.get("ok", 0)))
            problems = []
            if batch.get("failed"):
                problems.append(f"{batch['failed']} of {count - (counts[i - 1] if i else 0)} "
                                f"new connections failed: {batch.get('errors')}")
            still = int(status.get("open", -1))
            if still != held:
                problems.append(f"only {still} of {held} connections still open when RSS "
                                "was read")
            # per connection the server still holds: one it closed has freed its memory
            n = min(held, still) if still >= 0 else held
            samples.append(Sample(
                {"KiB/conn": (rss1 - rss0) / n if n else 0.0},
                {"wanted": count, "connections": held, "still_open": still,
                 "rss_before_kib": rss0, "rss_after_kib": rss1, "fds_before": fds0,
                 "fds_after": fds1, "handshake_seconds": batch.get("seconds")}, problems))
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    settle(server, fds0)
    return samples


def h2load_command(session: Session, port: str, host: str = STATIC_HOST,
                   path: str = STATIC_PATH) -> list[str]:
    """M7: h2load over h2 only (ALPN offers h2 alone: a server that does not select it is
    not measured over HTTP/1.1 by mistake), the bench's TLS 1.3 suite, SNI = ``host``."""
    a = session.args
    return ["h2load", f"--connect-to=127.0.0.1:{port}", "--npn-list=h2",
            "--tls13-ciphers=TLS_AES_256_GCM_SHA384", f"-t{a.wrk_threads}",
            f"-c{a.h2load_clients}", f"-m{a.h2load_streams}", f"-D{a.wrk_duration}",
            f"https://{host}:{port}{path}"]


def parse_h2load(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m := re.search(r"Application protocol: (\S+)", text):
        out["protocol"] = m.group(1)
    if m := re.search(r"Cipher: (\S+)", text):
        out["cipher"] = m.group(1)
    if m := re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", text):
        out["seconds"] = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
        out["rps"] = float(m.group(3))
    if m := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", text):
        for k, v in zip(("total", "started", "done", "succeeded", "failed", "errored",
                         "timeout"), m.groups(), strict=True):
            out[k] = int(v)
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        for k, v in zip(("2xx", "3xx", "4xx", "5xx"), m.groups(), strict=True):
            out[k] = int(v)
    if m := re.search(r"traffic: .*?, [\d.]+\w*B \((\d+)\) data", text):
        out["data_bytes"] = int(m.group(1))
    out["not_negotiated"] = "No protocol negotiated" in text
    return out


H2_NOT_NEGOTIATED = "h2 not negotiated"


def _not_h2(server: Server, sample: Sample, names: Sequence[str], seen: str) -> Sample:
    """``sample`` with ``names`` missing for want of h2: a problem for nginx (its http
    servers have http2 on), a note for sniport (HTTP/2 may not be built yet)."""
    sample.missing |= dict.fromkeys(names, H2_NOT_NEGOTIATED)
    sample.raw["h2"] = f"not negotiated ({seen})"
    if isinstance(server, Nginx):
        sample.problems.append(f"{H2_NOT_NEGOTIATED} with nginx ({seen}): its config is wrong")
    return sample


def m7_h2load(session: Session, server: Server) -> Sample:
    """h2load against static.test/1k.bin over HTTP/2 for --wrk-duration seconds (as wrk's
    -d: a fixed -n took 50 s on sniport's first HTTP/2 and 2 s on nginx): req/s, server
    CPU-us per request done, failed requests and non-2xx answers, and exactly 1,024 data
    bytes per response. The requests still in flight when the time is up (at most -c x -m,
    h2load's "started" minus "done") cost CPU and are not counted, as with wrk."""
    pids = server.pids()
    cmd = h2load_command(session, str(server.port))
    u0, s0 = cpu_split(pids)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    time.sleep(0.2)
    u1, s1 = cpu_split(pids)
    cpu = (u1 - u0) + (s1 - s0)
    h = parse_h2load(done.stdout)
    raw = {"h2load": h, "utime_s": round(u1 - u0, 2), "stime_s": round(s1 - s0, 2)}
    if h.get("protocol") != "h2":
        seen = "h2load: " + ("no protocol negotiated" if h["not_negotiated"] else
                             f"application protocol {h.get('protocol')!r}")
        return _not_h2(server, Sample({}, raw), ("req/s", "CPU-us/req"),
                       seen)
    problems = []
    if done.returncode != 0 or "succeeded" not in h:
        problems.append(f"h2load exit {done.returncode}: {done.stdout.strip()[-800:]} "
                        f"{done.stderr.strip()[-800:]}")
    if h.get("cipher") != "TLS_AES_256_GCM_SHA384":
        problems.append(f"h2load negotiated {h.get('cipher')}, not TLS_AES_256_GCM_SHA384")
    requests = int(h.get("succeeded", 0))
    errors = int(h.get("failed", 0)) + int(h.get("timeout", 0))
    non2xx = sum(int(h.get(k, 0)) for k in ("3xx", "4xx", "5xx"))
    if errors:
        problems.append(f"h2load: {h.get('failed')} failed ({h.get('errored')} errored), "
                        f"{h.get('timeout')} timed out")
    if non2xx:
        problems.append(f"h2load: {non2xx} responses not 2xx")
    per = h.get("data_bytes", 0) / requests if requests else 0.0
    if requests and per != len(STATIC_BODY):
        problems.append(f"h2load read {per:.1f} data bytes per response, not "
                        f"{len(STATIC_BODY)}: wrong content?")
    metrics = {"req/s": h.get("rps", 0.0),
               "CPU-us/req": cpu * 1e6 / requests if requests else 0.0,
               "errors": errors, "non-2xx": non2xx}
    return Sample(metrics, raw | {"h2load_stdout": done.stdout}, problems)


def pageload_command(session: Session, port: str, proto: str) -> list[str]:
    a = session.args
    return [str(VENV_PY), str(BENCH / "pageload.py"), "--port", port, "--host", STATIC_HOST,
            "--cafile", str(session.lab.ca_file), "--root", str(session.lab.dir / "www"),
            "--page", PAGE_PATH, "--proto", proto,
            *(["--connections", "6"] if proto == "h1" else []),
            "--browsers", str(a.page_browsers), "--duration", str(a.page_duration)]


def m8_pages(session: Session, server: Server) -> Sample:
    """bench/pageload.py over HTTP/1.1 (6 connections) then HTTP/2 (1 connection), new
    connections for every page load: pages/s and server CPU-ms per page, for each."""
    metrics: dict[str, float] = {"errors": 0}
    raw: dict[str, Any] = {}
    problems: list[str] = []
    missing: dict[str, str] = {}
    for proto in ("h1", "h2"):
        pids = server.pids()
        fds0 = fd_count(pids)
        u0, s0 = cpu_split(pids)
        done = subprocess.run(pageload_command(session, str(server.port), proto),
                              capture_output=True, text=True,
                              timeout=session.args.page_duration + 120, check=False)
        time.sleep(0.3)  # the close_notify and FINs of the last page loads
        u1, s1 = cpu_split(pids)
        cpu = (u1 - u0) + (s1 - s0)
        try:
            got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            got = {}
        raw[proto] = got | {"utime_s": round(u1 - u0, 2), "stime_s": round(s1 - s0, 2)}
        if got.get("h2") == "not negotiated":
            sub = _not_h2(server, Sample({}), (f"CPU-ms/page {proto}", f"pages/s {proto}"),
                          f"pageload.py: ALPN selected {got.get('alpn_selected')!r}")
            missing |= sub.missing
            problems += sub.problems
            raw[proto]["h2"] = sub.raw["h2"]
            continue
        if not got or done.returncode not in (0, 1):
            problems.append(f"pageload.py --proto {proto} exit {done.returncode}: "
                            f"{done.stdout.strip()[-500:]} {done.stderr.strip()[-1500:]}")
            continue
        pages = int(got.get("pages", 0))
        metrics[f"pages/s {proto}"] = pages / got["seconds"] if got.get("seconds") else 0.0
        metrics[f"CPU-ms/page {proto}"] = cpu * 1e3 / pages if pages else 0.0
        metrics["errors"] += int(got.get("failures", 0))
        if got.get("failures"):
            problems.append(f"pageload.py --proto {proto}: {got['failures']} page loads "
                            f"failed: {got.get('reasons')}")
        want = 1 + PAGE_ASSETS
        if pages and got.get("requests", 0) != pages * want and not got.get("failures"):
            problems.append(f"pageload.py --proto {proto}: {got.get('requests')} requests "
                            f"for {pages} pages, not {want} each")
        settle(server, fds0)
    return Sample(metrics, raw, problems, missing)


def _cmd(build: Callable[[Session, str], list[str]]) -> Callable[[Session, str], str]:
    return lambda s, port: shlex.join(build(s, port))


def _wrk_measure(host: str, path: str, body: bytes, *, close: bool
                 ) -> tuple[Callable[[Session, str], str], Callable[[Session, Server], Sample]]:
    def command(s: Session, port: str) -> str:
        return shlex.join(wrk_command(s, port, host, path, close=close))

    def run(s: Session, server: Server) -> Sample:
        return run_wrk(s, server, host, path, len(body), close=close)

    return command, run


def _idle_measure(sni: str) -> tuple[Callable[[Session, str], str],
                                     Callable[[Session, Server], Sample]]:
    def command(s: Session, port: str) -> str:
        return shlex.join(idle_command(s, port, sni))

    def run(s: Session, server: Server) -> Sample:
        return idle_steps(s, server, sni, [s.args.idle_count])[0]

    return command, run


RATE_REQ = (Metric("req/s", "req/s", False, "{:.0f}"), Metric("CPU-us/req", "us", True, "{:.1f}"),
            Metric("errors", "", True, "{:.0f}"), Metric("non-2xx", "", True, "{:.0f}"))
RATE_CONN = (Metric("conn/s", "conn/s", False, "{:.0f}"), Metric("CPU-ms/conn", "ms", True),
             Metric("errors", "", True, "{:.0f}"), Metric("non-2xx", "", True, "{:.0f}"))
KIB = (Metric("KiB/conn", "KiB", True, "{:.1f}"),)
PAGES = (Metric("pages/s h1", "pages/s", False, "{:.0f}"),
         Metric("pages/s h2", "pages/s", False, "{:.0f}"),
         Metric("CPU-ms/page h1", "ms", True, "{:.2f}"),
         Metric("CPU-ms/page h2", "ms", True, "{:.2f}"),
         Metric("errors", "", True, "{:.0f}"))

MEASURES: tuple[Measure, ...] = (
    Measure("M1", "M1 bulk passthrough (1 GiB)",
            (Metric("MB/s", "MB/s", False, "{:.0f}"), Metric("CPU-s/GiB", "s", True)),
            _cmd(curl_command), m1_bulk),
    Measure("M2", "M2 new passthrough connections", RATE_CONN,
            *_wrk_measure(PASS_HOST, "/small", SMALL_BODY, close=True)),
    Measure("M3", "M3 static 1 KiB, keep-alive", RATE_REQ,
            *_wrk_measure(STATIC_HOST, STATIC_PATH, STATIC_BODY, close=False), direct=True),
    Measure("M3i", "M3i static 1 KiB index.html as /, keep-alive", RATE_REQ,
            *_wrk_measure(STATIC_HOST, INDEX_PATH, INDEX_BODY, close=False), direct=True,
            note="As M3, on `/`: the static root holds a 1 KiB index.html (1,024 bytes) that "
            "both servers find by index resolution (nginx: `index` default index.html; "
            "sniport: the static route's index = [\"index.html\"]); the checks fetch it "
            "exactly and the bytes wrk read per answer must fit 1,024 + a head."),
    Measure("M3s", "M3s static mix 1 KiB / 100 KiB / 1 MiB (wrk + mix.lua), keep-alive",
            (*RATE_REQ[:2], Metric("MB/s", "MB/s", False, "{:.0f}"),
             Metric("CPU-ms/MB", "ms", True, "{:.3f}"), *RATE_REQ[2:]),
            _cmd(mix_command), run_wrk_mix, direct=True,
            note="How the sizes are mixed: $OUT/mix.lua (bench/suite.py MIX_SCRIPT) makes "
            "each wrk thread ask for " + ", ".join(f"{p} ({n:,} B)" for p, n in MIX)
            + " in turn, so one of each per three requests, over wrk's keep-alive "
            "connections; its response() counts every answer by body size and its done() "
            "prints the counts. A body of another size, an answer not 200, counts that do not "
            "add up to wrk's requests, or a size off its third by more than the connections "
            "(the requests in flight at the end) is a problem. CPU-us/req is over all "
            "answers; CPU-ms/MB is per 10^6 bytes of body; MB/s is body bytes per second."),
    Measure("M4", "M4 reverse proxy to a 100-byte upstream, keep-alive", RATE_REQ,
            *_wrk_measure(APP_HOST, APP_PATH, APP_BODY, close=False), settle_slack=64,
            direct=True),
    Measure("M5", "M5 terminated new connections (TLS handshake + 1 request)", RATE_CONN,
            *_wrk_measure(STATIC_HOST, STATIC_PATH, STATIC_BODY, close=True), direct=True),
    Measure("M6p", "M6 memory per idle passthrough connection", KIB, *_idle_measure(PASS_HOST),
            fresh=True),
    Measure("M6t", "M6 memory per idle terminated connection", KIB,
            *_idle_measure(STATIC_HOST), fresh=True, direct=True),
    Measure("M7", "M7 static 1 KiB over HTTP/2 (h2load -c64 -m10)", RATE_REQ,
            _cmd(h2load_command), m7_h2load, direct=True),
    Measure("M8", "M8 page load: HTML + 30 assets, new connections each (h1: 6 "
            "connections; h2: 1)", PAGES,
            lambda s, port: "\n".join(shlex.join(pageload_command(s, port, p))
                                      for p in ("h1", "h2")), m8_pages, direct=True),
)
DIRECT_KEYS = frozenset(m.key for m in MEASURES if m.direct)
SERVERS = ("nginx", "nginx-direct", "sniport")  # record names; labels "nginx seed", ...
# Run order on the shared server: M4 last, its upstream keep-alive connections stay open.
RUN_ORDER = ("M6p", "M6t", "M1", "M2", "M3", "M3i", "M3s", "M5", "M7", "M8", "M4")


@dataclass(frozen=True)
class Target:
    text: str
    bound: float
    upper: bool  # the ratio must be <= bound (else >=)
    workers: int | None = None  # only with this many workers
    base: str = "nginx"  # the ratio sniport / this server: "nginx" (seed) or "nginx-direct"


def _cpu(bound: float, note: str = "", base: str = "nginx") -> Target:
    return Target(f"<= {bound:.2f}{note}", bound, True, base=base)


_RATE = Target(">= 1.00 with 2 workers", 1.0, False, 2)
# Issue 13 (item 1 and the targets table): sniport / nginx seed unless the target says
# "vs direct" (sniport / nginx without the hop, nginx-direct.conf). A measure may have several.
TARGETS: dict[tuple[str, str], tuple[Target, ...]] = {
    ("M1", "CPU-s/GiB"): (_cpu(0.50),),
    ("M2", "CPU-ms/conn"): (_cpu(1.00),),
    ("M3", "CPU-us/req"): (_cpu(0.80), _cpu(1.00, " vs direct", "nginx-direct")),
    ("M3i", "CPU-us/req"): (_cpu(0.80), _cpu(1.00, " vs direct", "nginx-direct")),
    ("M4", "CPU-us/req"): (_cpu(0.90),),
    ("M5", "CPU-ms/conn"): (_cpu(1.00),),
    ("M6p", "KiB/conn"): (_cpu(0.25),),
    ("M6t", "KiB/conn"): (_cpu(0.60),),
    # "no throughput below nginx's with 2 workers"
    ("M1", "MB/s"): (_RATE,),
    ("M2", "conn/s"): (_RATE,),
    ("M3", "req/s"): (_RATE,),
    ("M3i", "req/s"): (_RATE,),
    ("M3s", "MB/s"): (_RATE,),
    ("M4", "req/s"): (_RATE,),
    ("M5", "conn/s"): (_RATE,),
    # issue 9 item 4
    ("M7", "CPU-us/req"): (_cpu(1.50, " (issue 9)"),),
    ("M8", "CPU-ms/page h2"): (Target("<= 1.00 (issue 9; and sniport h2 < its h1)", 1.00,
                                      True),),
}


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Record:
    measure: str
    server: str  # "nginx" or "sniport"
    workers: int
    round: int
    sample: Sample
    scale: int = 0  # scaling pass: wrk connections or idle connections held


@dataclass
class Outcome:
    records: list[Record] = field(default_factory=list)
    scaling: list[Record] = field(default_factory=list)
    config: list[Record] = field(default_factory=list)  # config-size rows: scale = hosts
    problems: list[str] = field(default_factory=list)
    checks: list[tuple[str, str]] = field(default_factory=list)  # (server, result)
    log_lines: list[tuple[str, str]] = field(default_factory=list)  # (server, line)
    loads: list[float] = field(default_factory=list)  # 1-min loadavg before each measure


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def make_server(name: str, session: Session, workers: int, rnd: int, tag: str,
                extra: Extra = NO_EXTRA) -> Server:
    run = session.out / "run" / f"{name}-w{workers}-r{rnd + 1}-{tag}"
    if name == "nginx":
        conf = session.lab.render("nginx-seed.conf", run, workers,
                                  listen=f"unix:{run}/https.sock", extra=extra)
        return Nginx("nginx seed", PORTS.seed, run, conf, workers)
    if name == "nginx-direct":
        conf = session.lab.render("nginx-direct.conf", run, workers,
                                  listen=f"127.0.0.1:{PORTS.direct}")
        return Nginx("nginx direct", PORTS.direct, run, conf, workers)
    return Sniport("sniport", PORTS.sniport, run, workers, session.lab.dir,
                   metrics=session.args.sniport_metrics, extra=extra,
                   ip_limits=session.args.sniport_ip_limits)


# A job: (measure key, what it runs on a started server -> [(scale, sample)], settle slack)
Job = tuple[str, Callable[[Server], list[tuple[int, Sample]]], int]


def server_instance(session: Session, name: str, workers: int, rnd: int, tag: str,
                    jobs: Sequence[Job], outcome: Outcome, into: list[Record],
                    extra: Extra = NO_EXTRA) -> None:
    """Start one server, check every route, run ``jobs`` on it, stop it; record everything."""
    server = make_server(name, session, workers, rnd, tag, extra)
    where = f"round {rnd + 1}, {workers} worker(s), {server.label}"
    log(f"{where} [{tag}]: starting: {tidy(shlex.join(server.command), session)}")
    server.start()
    try:
        bad = ([] if name == "nginx-direct" else check_passthrough(session.lab, server.port)
               ) + check_terminated(session.lab, server.port)
        outcome.checks.append((server.label, "; ".join(bad) if bad else "ok"))
        if bad:
            outcome.problems += [f"{where}, check: {b}" for b in bad]
            log(f"  check FAILED: {bad}; skipping its measures")
            return
        pids0 = set(server.pids())
        for key, job, slack in jobs:
            fds0 = fd_count(server.pids())
            load = float(loadavg().split()[0])
            outcome.loads.append(load)
            for scale, sample in job(server):
                sample.raw["loadavg_1m"] = load
                into.append(Record(key, name, workers, rnd, sample, scale))
                shown = ", ".join([f"{k} {v:.4g}" for k, v in sample.metrics.items()]
                                  + [f"{k}: {v}" for k, v in sample.missing.items()])
                at = f" @{scale}" if scale else ""
                log(f"  {key}{at} {server.label}: {shown}"
                    + (f"  PROBLEMS: {sample.problems}" if sample.problems else ""))
                outcome.problems += [f"{where}, {key}{at}: {p}" for p in sample.problems]
            if not server.alive():
                outcome.problems.append(
                    f"{where} DIED during {key} (exit "
                    f"{server.proc.returncode if server.proc else '?'}); log tail:\n"
                    f"{server.log_tail()}")
                return
            gone = pids0 - set(server.pids())
            if gone and key == "C":  # the config-size rows reload: new workers, by design
                pids0 = set(server.pids())
            elif gone:  # a worker died (and may have been replaced): its CPU time is lost too
                outcome.problems.append(f"{where}: process(es) {sorted(gone)} exited during "
                                        f"{key}; log tail:\n{server.log_tail()}")
                pids0 = set(server.pids())
            settle(server, fds0, slack * workers)
    finally:
        server.stop()
        code = server.proc.returncode if server.proc else None
        if name == "sniport" and code not in (0, -signal.SIGTERM):
            outcome.problems.append(f"{where}: sniport exit status {code} on SIGTERM")
        lines = server.problems()
        outcome.log_lines += [(server.label, line) for line in lines]
        if name == "sniport":  # an error line from sniport is sniport misbehaving
            outcome.problems += log_problems(where, lines)


def log_problems(where: str, lines: Sequence[str], shown: int = 8) -> list[str]:
    """sniport's error lines as problems: each distinct line (digits aside) once, with its
    count, the first ``shown`` of them (a traceback repeated for every stream of a run
    would otherwise be thousands of lines)."""
    counts: dict[str, list[str]] = {}
    for line in lines:
        counts.setdefault(re.sub(r"\d+", "N", line), []).append(line)
    out = [f"{where}, sniport log: {found[0]}" + (f" (x{len(found)})" if len(found) > 1 else "")
           for found in list(counts.values())[:shown]]
    if len(counts) > shown:
        out.append(f"{where}, sniport log: {len(counts) - shown} more distinct line(s), "
                   f"{sum(len(f) for f in list(counts.values())[shown:])} in all; see the log")
    return out


# ---------------------------------------------------------------------------------------------
# Config size (issue 13 item 1): routing cost and reload time with many names

RELOAD_MARKER = "reload-marker.hosts.test"
RELOADS = 3  # per server start: the marker in, out, in again
RELOAD_STREAK = 5  # handshakes in a row routed the new way before the new config counts


def extra_names(hosts: int) -> Extra:
    """``hosts`` names, half in the passthrough block (pass.test and h00001.hosts.test ...),
    half in the extra site (s00001.sites.test ...)."""
    half = hosts // 2
    return Extra(tuple(f"h{i:05d}.hosts.test" for i in range(1, half)),
                 tuple(f"s{i:05d}.sites.test" for i in range(1, hosts - half + 1)))


def peer_cert(port: int, sni: str) -> bytes | None:
    """The certificate (DER) a TLS 1.3 handshake with ``sni`` gets through ``port``, not
    verified (which site or backend answered is the question), or None if it failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              ctx.wrap_socket(raw, server_hostname=sni) as tls):
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def reload_command(session: Session, server: Server) -> list[str]:
    if isinstance(server, Sniport):
        return [str(VENV_PY), "-m", "sniport", "reload", "-c", str(server.config)]
    return ["nginx", "-p", str(server.run), "-c", str(server.run / "nginx.conf"), "-e",
            str(server.run / "error.log"), "-s", "reload"]


def reload_once(session: Session, server: Server, workers: int, names: Extra,
                marker: bool) -> tuple[dict[str, float], list[str]]:
    """Write the config with ``names`` (and RELOAD_MARKER if ``marker``), then time from
    the reload command's start until RELOAD_STREAK handshakes in a row with SNI
    RELOAD_MARKER reach where the new config sends it: the passthrough backend (pass.test's
    certificate) with the marker, else the default (static.test's)."""
    lab = session.lab
    want = lab.certs_der[PASS_HOST if marker else STATIC_HOST]
    new = Extra((*names.passthrough, RELOAD_MARKER), names.site) if marker else names
    if isinstance(server, Sniport):
        server.write_config(new)
    else:
        lab.render("nginx-seed.conf", server.run, workers,
                   listen=f"unix:{server.run}/https.sock", extra=new)
    problems = []
    t0 = time.monotonic()
    done = subprocess.run(reload_command(session, server), capture_output=True, text=True,
                          timeout=120, check=False, env=server.env)
    t_cmd = time.monotonic() - t0
    if done.returncode != 0:
        problems.append(f"reload exit {done.returncode}: {done.stdout.strip()} "
                        f"{done.stderr.strip()}")
    streak, first, probes = 0, 0.0, 0
    deadline = t0 + 60
    while streak < RELOAD_STREAK:
        if time.monotonic() > deadline:
            problems.append(f"{RELOAD_MARKER} not routed the new way 60 s after the reload")
            break
        got = peer_cert(server.port, RELOAD_MARKER)
        probes += 1
        if got == want:
            if streak == 0:
                first = time.monotonic() - t0
            streak += 1
        else:
            streak = 0
    return {"command_s": round(t_cmd, 4), "serving_s": round(first, 4), "probes": probes,
            "marker": marker}, problems


def config_job(session: Session, workers: int,
               hosts: int) -> Callable[[Server], list[tuple[int, Sample]]]:
    """With ``hosts`` names (extra_names): the server's RSS, M2 (new passthrough connections
    to pass.test) and M5 (new terminated connections to static.test), CPU-ms per connection
    each, then RELOADS reloads, each timed until the new config routes a marker name
    (reload_once)."""
    def run(server: Server) -> list[tuple[int, Sample]]:
        names = extra_names(hosts)
        problems = []
        procs = len(server.pids())
        rss = rss_kib(server.pids()) / 1024
        last = names.passthrough[-1:]
        if last and peer_cert(server.port, last[0]) != session.lab.certs_der[PASS_HOST]:
            problems.append(f"{last[0]} (the last passthrough name) is not passed through")
        if names.site:  # the last site name: the wildcard certificate, verified, and content
            try:
                a = _https(session.lab, server.port, names.site[-1], "GET", STATIC_PATH)
                if a.cert_der != session.lab.certs_der[SITES_CERT] or a.body != STATIC_BODY:
                    problems.append(f"{names.site[-1]}: not the {SITES_CERT} certificate or "
                                    f"not {STATIC_PATH} (status {a.status})")
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                problems.append(f"{names.site[-1]}: {type(exc).__name__}: {exc}")
        if peer_cert(server.port, RELOAD_MARKER) != session.lab.certs_der[STATIC_HOST]:
            problems.append(f"{RELOAD_MARKER} does not reach the default before the reloads")
        m2 = run_wrk(session, server, PASS_HOST, "/small", len(SMALL_BODY), close=True)
        m5 = run_wrk(session, server, STATIC_HOST, STATIC_PATH, len(STATIC_BODY), close=True)
        reloads = []
        for i in range(RELOADS):
            got, bad = reload_once(session, server, workers, names, marker=i % 2 == 0)
            reloads.append(got)
            problems += [f"reload {i + 1}: {b}" for b in bad]
            # the previous generation's workers finish draining before the next reload
            try:
                wait_for(lambda: len(server.pids()) <= procs, 30,
                         f"{server.label}'s old workers to exit")
            except BenchError as exc:
                problems.append(f"reload {i + 1}: {exc}")
        metrics = {"pass conn/s": m2.metrics["conn/s"],
                   "pass CPU-ms/conn": m2.metrics["CPU-ms/conn"],
                   "term conn/s": m5.metrics["conn/s"],
                   "term CPU-ms/conn": m5.metrics["CPU-ms/conn"],
                   "errors": m2.metrics["errors"] + m5.metrics["errors"],
                   "non-2xx": m2.metrics["non-2xx"] + m5.metrics["non-2xx"]}
        ok = [r["serving_s"] for r in reloads if r["serving_s"]]
        if ok:
            metrics["reload s"] = statistics.median(ok)
            metrics["reload command s"] = statistics.median(r["command_s"] for r in reloads)
        metrics["RSS MiB"] = rss
        raw = {"M2": {k: v for k, v in m2.raw.items() if k != "wrk_stdout"},
               "M5": {k: v for k, v in m5.raw.items() if k != "wrk_stdout"},
               "reloads": reloads, "hosts": hosts}
        return [(hosts, Sample(metrics, raw, [f"M2: {p}" for p in m2.problems]
                               + [f"M5: {p}" for p in m5.problems] + problems))]
    return run


def run_config_pass(session: Session, servers: Sequence[str], workers_list: Sequence[int],
                    runs: int, outcome: Outcome) -> None:
    """The config-size rows: for each count of --config-hosts a fresh server of its own
    (nginx seed and sniport; nginx direct has no passthrough), alternating as the main pass."""
    counts = _int_list(session.args.config_hosts)
    names = [s for s in servers if s != "nginx-direct"]
    for rnd in range(runs):
        for wi, workers in enumerate(workers_list):
            order = names if (rnd + wi) % 2 == 0 else list(reversed(names))
            for name in order:
                for n in counts:
                    server_instance(session, name, workers, rnd, f"hosts{n}",
                                    [("C", config_job(session, workers, n), 0)], outcome,
                                    outcome.config, extra=extra_names(n))


def main_jobs(session: Session, measures: Sequence[Measure]) -> list[tuple[str, list[Job]]]:
    """(tag, jobs) per server start: each fresh measure alone, the others together."""
    def job(m: Measure) -> Job:
        return (m.key, lambda server: [(0, m.run(session, server))], m.settle_slack)

    by_key = {m.key: m for m in measures}
    ordered = [by_key[k] for k in RUN_ORDER if k in by_key]
    groups = [(m.key, [job(m)]) for m in ordered if m.fresh]
    shared = [job(m) for m in ordered if not m.fresh]
    if shared:
        groups.append(("shared", shared))
    return groups


def scaling_jobs(session: Session, measures: Sequence[Measure]) -> list[tuple[str, list[Job]]]:
    a = session.args
    conns = [int(x) for x in a.scaling_connections.split(",")]
    idle = [int(x) for x in a.scaling_idle.split(",")]
    keys = {m.key for m in measures}
    groups: list[tuple[str, list[Job]]] = []

    def idle_job(sni: str) -> Callable[[Server], list[tuple[int, Sample]]]:
        def run(server: Server) -> list[tuple[int, Sample]]:
            return list(zip(idle, idle_steps(session, server, sni, idle), strict=False))
        return run

    def wrk_job(host: str, path: str, body: bytes,
                c: int) -> Callable[[Server], list[tuple[int, Sample]]]:
        def run(server: Server) -> list[tuple[int, Sample]]:
            return [(c, run_wrk(session, server, host, path, len(body), close=False,
                                connections=c, peak_rss=True))]
        return run

    for key, sni in (("M6p", PASS_HOST), ("M6t", STATIC_HOST)):
        if key in keys:
            groups.append((f"scaling-{key}", [(key, idle_job(sni), 0)]))
    wrk_jobs: list[Job] = []
    for key, host, path, body, slack in (("M3", STATIC_HOST, STATIC_PATH, STATIC_BODY, 0),
                                         ("M4", APP_HOST, APP_PATH, APP_BODY, 64)):
        if key in keys:
            wrk_jobs += [(key, wrk_job(host, path, body, c), slack) for c in conns]
    if wrk_jobs:
        groups.append(("scaling-wrk", wrk_jobs))
    return groups


def run_pass(session: Session, servers: Sequence[str], workers_list: Sequence[int], runs: int,
             groups: Sequence[tuple[str, list[Job]]], outcome: Outcome,
             into: list[Record]) -> None:
    for rnd in range(runs):
        for wi, workers in enumerate(workers_list):
            order = list(servers) if (rnd + wi) % 2 == 0 else list(reversed(servers))
            for name in order:
                for tag, jobs in groups:
                    if name == "nginx-direct":  # no passthrough: the terminated measures only
                        jobs = [j for j in jobs if j[0] in DIRECT_KEYS]
                    if jobs:
                        server_instance(session, name, workers, rnd, tag, jobs, outcome, into)


# ---------------------------------------------------------------------------------------------
# Machine and report


def sh(cmd: str) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def sniport_digest(package: Path = SNIPORT_SRC) -> str:
    """A digest of sniport's source files (the package directory ``package``)."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".html", ".typed"):
            h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def snapshot_dir(lab: Path) -> Path:
    return lab / "src"


def snapshot_env(lab: Path) -> dict[str, str]:
    """The environment that makes ``python -m sniport`` import the snapshot (PYTHONPATH comes
    before the venv's editable-install finder)."""
    return {**os.environ, "PYTHONPATH": str(snapshot_dir(lab))}


def snapshot(lab: Path, pure_python: bool = False) -> str:
    """Copy sniport's source as it is now into the lab, with its compiled modules (mypyc's
    shims in the package and their shared library beside it) unless ``pure_python``;
    returns the source's digest."""
    dest = snapshot_dir(lab) / "sniport"
    skip = ["__pycache__", "*.pyc"] + (["*.so"] if pure_python else [])
    shutil.copytree(SNIPORT_SRC, dest, ignore=shutil.ignore_patterns(*skip))
    if not pure_python:
        for shared in ROOT.glob("*__mypyc.*.so"):
            shutil.copy2(shared, snapshot_dir(lab))
    return sniport_digest(dest)


def machine(lab: Path) -> dict[str, str]:
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
        "h2load": sh("h2load --version"),
        "h2 (python)": importlib.metadata.version("h2"),
        "curl": sh("curl -V | head -1"),
        "openssl": sh("openssl version").split(" (")[0],
        "python": sys.version.split()[0],
        "uvloop": importlib.metadata.version("uvloop"),
        "openssl (python)": ssl.OPENSSL_VERSION,
        "sniport": (sh(f"PYTHONPATH={snapshot_dir(lab)} {VENV_PY} -m sniport --version")
                    + " @ " + sh(f"git -C {ROOT} rev-parse --short HEAD")
                    + (" + uncommitted changes" if sh(f"git -C {ROOT} status --porcelain -- "
                                                      "sniport") else "")),
        "sniport digest": sniport_digest(snapshot_dir(lab) / "sniport"),
        "RLIMIT_NOFILE hard": sh("ulimit -Hn"),
        "loadavg": loadavg(),
    }


def _stats(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _values(records: Sequence[Record], key: str, server: str, workers: int, metric: str,
            scale: int = 0) -> list[float]:
    return [r.sample.metrics[metric] for r in records
            if r.measure == key and r.server == server and r.workers == workers
            and r.scale == scale and metric in r.sample.metrics]


def ratio(records: Sequence[Record], key: str, workers: int, metric: str,
          scale: int = 0, base: str = "nginx") -> float | None:
    """sniport's median / ``base``'s (the nginx seed setup unless said), or None."""
    n = _values(records, key, base, workers, metric, scale)
    s = _values(records, key, "sniport", workers, metric, scale)
    if not n or not s or statistics.median(n) == 0:
        return None
    return statistics.median(s) / statistics.median(n)


def verdict(target: Target, r: float | None) -> str:
    if r is None:
        return "-"
    met = r <= target.bound if target.upper else r >= target.bound
    return f"{'met' if met else '**NOT met**'} ({r:.2f})"


def tidy(text: str, session: Session | None = None) -> str:
    """Commands as a reader can rerun them: paths relative to the repository, the scratch
    directory as $SCRATCH and the run's output directory as $OUT."""
    if session is not None:
        text = text.replace(str(session.lab.dir), "$SCRATCH").replace(str(session.out), "$OUT")
    return text.replace(str(ROOT) + "/", "")


def _raw_json(sample: Sample) -> str:
    raw = {k: v for k, v in sample.raw.items() if k not in ("wrk_stdout", "h2load_stdout")}
    return json.dumps(raw, separators=(",", ":"))


def _missing(records: Sequence[Record], key: str, server: str, workers: int,
             metric: str, scale: int = 0) -> str:
    """Why ``metric`` has no value in these records ("h2 not negotiated"), or ''."""
    why = sorted({r.sample.missing[metric] for r in records
                  if r.measure == key and r.server == server and r.workers == workers
                  and r.scale == scale and metric in r.sample.missing})
    return "; ".join(why)


def _cell(records: Sequence[Record], key: str, server: str, workers: int, metric: str,
          fmt: str) -> str:
    values = _values(records, key, server, workers, metric)
    if values:
        return _stats(values, fmt)
    return _missing(records, key, server, workers, metric) or "-"


LABELS = {"nginx": "nginx seed", "nginx-direct": "nginx direct", "sniport": "sniport"}


def bases(servers: Sequence[str]) -> list[str]:
    """The nginx setups measured in this run, each a denominator of sniport's ratios."""
    return [b for b in ("nginx", "nginx-direct") if b in servers]


def _ratio_name(base: str) -> str:
    return "sniport / " + ("seed" if base == "nginx" else "direct")


def _verdicts(recs: Sequence[Record], key: str, metric: str, targets: Sequence[Target],
              workers_list: Sequence[int]) -> str:
    out = []
    for w in workers_list:
        out.append(", ".join(
            (verdict(t, ratio(recs, key, w, metric, base=t.base))
             if t.workers in (None, w) else "n/a") for t in targets))
    return " / ".join(out)


def summary_table(outcome: Outcome, measures: Sequence[Measure],
                  workers_list: Sequence[int], servers: Sequence[str]) -> list[str]:
    """One row per metric: each server's median (min-max) and sniport's ratio to each nginx
    setup, per worker count; then the issue 13 targets and whether they are met."""
    shown = [s for s in SERVERS if s in servers]
    head = "| measure |"
    rule = "|---|"
    for w in workers_list:
        for srv in shown:
            head += f" {LABELS[srv]}, {w}w |"
            rule += "---|"
        if "sniport" in shown:
            for b in bases(shown):
                head += f" {_ratio_name(b)}, {w}w |"
                rule += "---|"
    head += (" target: sniport / nginx (issue 13 unless said; seed unless \"vs direct\") | "
             + " / ".join(f"{w}w" for w in workers_list) + " |")
    rule += "---|---|"
    lines = [head, rule]
    recs = outcome.records
    for m in measures:
        for metric in m.metrics:
            if metric.name in COUNTS:
                continue
            better = "lower is better" if metric.lower_is_better else "higher is better"
            row = f"| {m.title}: {metric.name} ({better}) |"
            for w in workers_list:
                for srv in shown:
                    if srv == "nginx-direct" and not m.direct:
                        row += " n/a (no passthrough) |"
                    else:
                        row += f" {_cell(recs, m.key, srv, w, metric.name, metric.fmt)} |"
                if "sniport" in shown:
                    for b in bases(shown):
                        r = ratio(recs, m.key, w, metric.name, base=b)
                        row += f" {'-' if r is None else f'{r:.2f}'} |"
            targets = [t for t in TARGETS.get((m.key, metric.name), ()) if t.base in shown]
            if not targets:
                row += " | |"
            else:
                row += (" " + "; ".join(t.text for t in targets) + " | "
                        + _verdicts(recs, m.key, metric.name, targets, workers_list) + " |")
            lines.append(row)
        if any(x.name in COUNTS for x in m.metrics):
            row = f"| {m.title}: load generator errors / non-2xx, sum of rounds |"
            for w in workers_list:
                for srv in shown:
                    e = sum(_values(recs, m.key, srv, w, "errors"))
                    n = sum(_values(recs, m.key, srv, w, "non-2xx"))
                    row += (" n/a |" if srv == "nginx-direct" and not m.direct
                            else f" {e:.0f} / {n:.0f} |")
                if "sniport" in shown:
                    row += " |" * len(bases(shown))
            lines.append(row + " 0 / 0 | |")
    return lines


def m8_table(recs: Sequence[Record], workers_list: Sequence[int]) -> list[str]:
    """M8's four columns (server CPU-ms per page, medians) and the issue 9 targets: sniport
    h2 <= nginx h2, and sniport h2 < sniport h1."""
    lines = ["Server CPU-ms per page load (medians, (min-max) over rounds; \"nginx\" is the "
             "seed setup; nginx direct's columns at the end):", "",
             "| workers | sniport h1 | sniport h2 | nginx h1 | nginx h2 | sniport h2 / nginx h2 "
             "(target <= 1.00) | sniport h2 / sniport h1 (target < 1.00) | nginx h2 / nginx "
             "h1 | sniport h1 / nginx h1 | nginx direct h1 | nginx direct h2 | sniport h2 / "
             "nginx direct h2 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in workers_list:
        cells = [_cell(recs, "M8", s, w, f"CPU-ms/page {p}", "{:.2f}")
                 for s in ("sniport", "nginx") for p in ("h1", "h2")]
        direct = [_cell(recs, "M8", "nginx-direct", w, f"CPU-ms/page {p}", "{:.2f}")
                  for p in ("h1", "h2")]
        med = {(s, p): statistics.median(v) if (v := _values(recs, "M8", s, w,
                                                              f"CPU-ms/page {p}")) else None
               for s in ("sniport", "nginx", "nginx-direct") for p in ("h1", "h2")}

        def rel(a: tuple[str, str], b: tuple[str, str], bound: float | None,
                med: dict[tuple[str, str], float | None] = med) -> str:
            x, y = med[a], med[b]
            if x is None or y is None or y == 0:
                return "-"
            r = x / y
            if bound is None:
                return f"{r:.2f}"
            met = r <= bound if a[0] != b[0] else r < bound
            return f"{'met' if met else '**NOT met**'} ({r:.2f})"

        lines.append(f"| {w} | {' | '.join(cells)} | "
                     f"{rel(('sniport', 'h2'), ('nginx', 'h2'), 1.0)} | "
                     f"{rel(('sniport', 'h2'), ('sniport', 'h1'), 1.0)} | "
                     f"{rel(('nginx', 'h2'), ('nginx', 'h1'), None)} | "
                     f"{rel(('sniport', 'h1'), ('nginx', 'h1'), None)} | "
                     f"{' | '.join(direct)} | "
                     f"{rel(('sniport', 'h2'), ('nginx-direct', 'h2'), None)} |")
    return [*lines, ""]


def net_of_handshakes(outcome: Outcome, key: str, server: str, workers: int,
                      conns: int) -> list[float]:
    """CPU-us per request of the scaling runs minus ``conns`` handshakes at the median M5
    cost of the same server and worker count (an estimate; empty without M5 figures)."""
    m5 = _values(outcome.records, "M5", server, workers, "CPU-ms/conn")
    if not m5:
        return []
    per_conn_s = statistics.median(m5) / 1e3
    out = []
    for x in outcome.scaling:
        if (x.measure, x.server, x.workers, x.scale) != (key, server, workers, conns):
            continue
        requests = x.sample.raw.get("wrk", {}).get("requests", 0)
        cpu = x.sample.raw.get("utime_s", 0.0) + x.sample.raw.get("stime_s", 0.0)
        if requests:
            out.append(max(cpu - conns * per_conn_s, 0.0) * 1e6 / requests)
    return out


def scaling_section(session: Session, outcome: Outcome, measures: Sequence[Measure],
                    workers_list: Sequence[int]) -> list[str]:
    a = session.args
    recs = outcome.scaling
    keys = [m.key for m in measures]
    conns = [int(x) for x in a.scaling_connections.split(",")]
    idle = [int(x) for x in a.scaling_idle.split(",")]
    lines = ["## Scaling (issue 6 item 4, issue 13 item 4)", "",
             f"{a.scaling_runs} round(s), medians with the (min-max) spread; same servers, "
             "checks and order rules as above. M3/M4: wrk with -c1, -c64, -c1000 for "
             f"{a.wrk_duration}s (-t = min(2, connections)); the server's CPU includes the TLS "
             "handshakes of wrk's connections at the start (1,000 of them at -c1000): the "
             "\"without handshakes\" columns subtract connections x the same server's median "
             "M5 CPU-ms per connection (1 and 2 workers alike), an estimate. M6: one "
             "fresh server per kind; the idle connections are added to the ones already held "
             f"({' -> '.join(f'{n:,}' for n in idle)}) and RSS is read at each count, minus "
             "RSS before the first; KiB/conn = that delta / connections the server still "
             "held then (at 1 connection this is mostly noise: an allocation or a freed page "
             "moves it by more than a connection costs). M3/M4 also give the peak RSS during "
             "the run per busy connection. nginx direct (no passthrough) is in the M3, M4 and "
             "M6t rows. nginx seed holds "
             "3 descriptors per terminated connection (client, stream -> unix socket, the http "
             "side) and 2 per passthrough one, against worker_rlimit_nofile 20000 per worker; "
             f"the hard RLIMIT_NOFILE here is {sh('ulimit -Hn')}.", ""]
    shown = [x for x in SERVERS if x in a.servers_list]
    names = "; ".join(LABELS[x] for x in shown)
    bs = bases(shown) if "sniport" in shown else []
    for key, host in (("M3", STATIC_HOST), ("M4", APP_HOST)):
        if key not in keys:
            continue
        title = next(m.title for m in measures if m.key == key)
        lines += [f"### {title}, by concurrent connections", "",
                  "```", tidy(shlex.join(wrk_command(session, "PORT", host, STATIC_PATH
                                                     if key == "M3" else APP_PATH,
                                                     close=False, connections=9999)),
                              session).replace("9999", "C"), "```", "",
                  f"Each cell: {names}. Peak KiB/conn: the servers' highest RSS during the "
                  "run (read every 0.1 s) minus RSS before it, per wrk connection: memory per "
                  "busy connection.", "",
                  "| workers | connections | req/s | CPU-us/req | "
                  + " | ".join(f"CPU {_ratio_name(b)}" for b in bs)
                  + " | without handshakes (est.): CPU-us/req; "
                  + ", ".join(_ratio_name(b) for b in bs)
                  + " | peak KiB/conn | wrk errors / non-2xx |",
                  "|---|---|---|---|" + "---|" * len(bs) + "---|---|---|"]
        for w in workers_list:
            for c in conns:
                cells = ["; ".join(_stats(_values(recs, key, s, w, metric, c), fmt)
                                   for s in shown)
                         for metric, fmt in (("req/s", "{:.0f}"), ("CPU-us/req", "{:.1f}"))]
                rs = [ratio(recs, key, w, "CPU-us/req", c, base=b) for b in bs]
                net = {s: net_of_handshakes(outcome, key, s, w, c) for s in shown}
                net_text = "; ".join(_stats(v, "{:.1f}") for v in net.values())
                if net.get("sniport"):
                    net_text += ", " + ", ".join(
                        f"{statistics.median(net['sniport']) / statistics.median(net[b]):.2f}"
                        if net.get(b) else "-" for b in bs)
                peak = "; ".join(_stats(_values(recs, key, s, w, "KiB/conn peak", c),
                                        "{:.1f}") for s in shown)
                errs = "; ".join(
                    f"{sum(_values(recs, key, s, w, 'errors', c)):.0f} / "
                    f"{sum(_values(recs, key, s, w, 'non-2xx', c)):.0f}" for s in shown)
                lines.append(f"| {w} | {c:,} | {' | '.join(cells)} | "
                             + " | ".join('-' if r is None else f'{r:.2f}' for r in rs)
                             + f" | {net_text} | {peak} | {errs} |")
        lines.append("")
    for key, sni in (("M6p", PASS_HOST), ("M6t", STATIC_HOST)):
        if key not in keys:
            continue
        title = next(m.title for m in measures if m.key == key)
        here = [x for x in shown if x != "nginx-direct" or key in DIRECT_KEYS]
        hb = [b for b in bs if b in here]
        lines += [f"### {title}, by connections held", "",
                  "```", tidy(shlex.join(idle_command(session, "PORT", sni, idle[0])), session)
                  + "   # then on stdin: " + ", ".join(
                      f"'open {n - p}'" for p, n in itertools.pairwise(idle)),
                  "```", "",
                  f"Each cell: {'; '.join(LABELS[x] for x in here)}.", "",
                  "| workers | connections | KiB/conn | "
                  + " | ".join(_ratio_name(b) for b in hb)
                  + " | RSS delta MiB | connections opened / still open when RSS was read |",
                  "|---|---|---|" + "---|" * len(hb) + "---|---|"]
        for w in workers_list:
            for n in idle:
                rs = [ratio(recs, key, w, "KiB/conn", n, base=b) for b in hb]
                mine = {s: [x for x in recs if x.measure == key and x.server == s
                            and x.workers == w and x.scale == n] for s in here}
                delta = "; ".join(_stats([(x.sample.raw["rss_after_kib"]
                                           - x.sample.raw["rss_before_kib"]) / 1024 for x in xs
                                          if "rss_after_kib" in x.sample.raw], "{:.1f}")
                                  for xs in mine.values())
                held = "; ".join(
                    _stats([float(x.sample.raw.get("connections", 0)) for x in xs], "{:.0f}")
                    + " / " + _stats([float(x.sample.raw.get("still_open", 0)) for x in xs],
                                     "{:.0f}") for xs in mine.values())
                kib = "; ".join(_stats(_values(recs, key, s, w, "KiB/conn", n), "{:.1f}")
                                for s in here)
                lines.append(f"| {w} | {n:,} | {kib} | "
                             + " | ".join('-' if r is None else f'{r:.2f}' for r in rs)
                             + f" | {delta} | {held} |")
        lines.append("")
    lines += ["### Scaling runs, raw", "",
              "| measure | workers | server | round | scale | metrics | raw |",
              "|---|---|---|---|---|---|---|"]
    for x in sorted(recs, key=lambda x: (x.measure, x.workers, x.server, x.scale, x.round)):
        got = ", ".join(f"{k} {v:.4g}" for k, v in x.sample.metrics.items())
        lines.append(f"| {x.measure} | {x.workers} | {x.server} | {x.round + 1} | {x.scale:,} | "
                     f"{got} | {_raw_json(x.sample)} |")
    return [*lines, ""]


def config_section(session: Session, outcome: Outcome,
                   workers_list: Sequence[int]) -> list[str]:
    a = session.args
    recs = outcome.config
    counts = _int_list(a.config_hosts)
    lines = ["## Config size: routing cost and reload time by number of names (issue 13)", "",
             f"{a.scaling_runs} round(s), medians with the (min-max) spread; each cell: nginx "
             "seed; sniport. For each count N, a fresh server with N names: half in the "
             "passthrough (pass.test and h00001.hosts.test ...; sniport: [[passthrough]] hosts, "
             "nginx seed: the stream `map $ssl_preread_server_name`, map_hash_max_size raised "
             "to fit), half in one more terminated site (s00001.sites.test ..., a "
             f"{SITES_CERT} certificate, static.test's root; sniport: [[site]] \"bulk\", nginx: "
             "one more `server` after static.test's with those server_names, "
             "server_names_hash_max_size raised); static.test and app.test besides. nginx "
             "direct has no passthrough and is not in these rows. Each start is checked like "
             "every start, and the last passthrough name and the last site name too. Then: "
             "RSS of the server's processes; M2 on pass.test and M5 on static.test (their "
             "commands, CPU per new connection: each hello is routed among all the names); "
             f"then {RELOADS} reloads, each after writing the config with {RELOAD_MARKER} "
             "added to (then removed from, then added to) the passthrough names: \"reload s\" "
             "is the wall time from the reload command's start until "
             f"{RELOAD_STREAK} handshakes in a row with that SNI reach where the new config "
             "sends it (pass.test's certificate, else static.test's, the default), \"reload "
             "command s\" the command's own wall time (`sniport reload` waits for the "
             "master's verdict on the new generation; `nginx -s reload` only signals the "
             "master). A worker replaced by a reload is not reported as a death in these "
             "rows. Reload commands:", "",
             "```", tidy(shlex.join([str(VENV_PY), "-m", "sniport", "reload", "-c",
                                     "$OUT/run/sniport-wW-rN-hostsH/sniport.toml"])),
             "nginx -p $OUT/run/nginx-wW-rN-hostsH -c $OUT/run/nginx-wW-rN-hostsH/nginx.conf "
             "-e $OUT/run/nginx-wW-rN-hostsH/error.log -s reload", "```", "",
             "| workers | names | M2 CPU-ms/conn | ratio | M5 CPU-ms/conn | ratio | M2 conn/s | "
             "M5 conn/s | reload s | reload command s | RSS MiB | wrk errors / non-2xx |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in workers_list:
        for n in counts:
            def cell(metric: str, fmt: str, w: int = w, n: int = n) -> str:
                return "; ".join(_stats(_values(recs, "C", s, w, metric, n), fmt)
                                 for s in ("nginx", "sniport"))

            def rel(metric: str, w: int = w, n: int = n) -> str:
                r = ratio(recs, "C", w, metric, n)
                return "-" if r is None else f"{r:.2f}"

            errs = "; ".join(f"{sum(_values(recs, 'C', s, w, 'errors', n)):.0f} / "
                             f"{sum(_values(recs, 'C', s, w, 'non-2xx', n)):.0f}"
                             for s in ("nginx", "sniport"))
            lines.append(f"| {w} | {n:,} | {cell('pass CPU-ms/conn', '{:.3f}')} | "
                         f"{rel('pass CPU-ms/conn')} | {cell('term CPU-ms/conn', '{:.3f}')} | "
                         f"{rel('term CPU-ms/conn')} | {cell('pass conn/s', '{:.0f}')} | "
                         f"{cell('term conn/s', '{:.0f}')} | {cell('reload s', '{:.3f}')} | "
                         f"{cell('reload command s', '{:.3f}')} | {cell('RSS MiB', '{:.1f}')} | "
                         f"{errs} |")
    lines += ["", "Each reload, raw (seconds until served; the command's own):", "",
              "| workers | server | round | names | reloads: serving_s / command_s |",
              "|---|---|---|---|---|"]
    for x in sorted(recs, key=lambda x: (x.workers, x.server, x.scale, x.round)):
        shown = ", ".join(f"{r['serving_s']:.3f} / {r['command_s']:.3f}"
                          for r in x.sample.raw.get("reloads", []))
        lines.append(f"| {x.workers} | {x.server} | {x.round + 1} | {x.scale:,} | {shown} |")
    return [*lines, ""]


def report(session: Session, outcome: Outcome, info: dict[str, str], measures: list[Measure],
           relay_md: str, argv: list[str], elapsed: float, end_info: dict[str, str]) -> str:
    a = session.args
    workers_list = a.workers_list
    loads = outcome.loads
    load_text = (f"1-min load average before each measure: min {min(loads):.2f}, median "
                 f"{statistics.median(loads):.2f}, max {max(loads):.2f} over {len(loads)} "
                 "measures" if loads else "no measure ran")
    changed = (f" (its working tree at the start, copied to $SCRATCH/src and run from there "
               f"for the whole run: source digest {info['sniport digest']}; "
               + ("the working tree changed during the run, to digest "
                  f"{end_info['sniport digest']}, not measured here)" if
                  info["sniport digest"] != end_info["sniport digest"] else
                  "the working tree was unchanged at the end)"))
    wtext = " and ".join(str(w) for w in workers_list)
    lines = [
        "# sniport vs the blog post's nginx setup",
        "",
        "Generated by `bench/run` (bench/suite.py); every number below was measured in the run "
        "described here. Rerun to refresh; absolute numbers drift on this shared 2-core box, "
        "the ratios and CPU per unit much less.",
        "",
        f"- command: `{shlex.join(['bench/run', *argv])}` ({elapsed:.0f} s wall)",
        f"- date: {info['date']} (end: {end_info['date']})",
        f"- machine: {info['nproc']} cores ({info['cpu']}), kernel {info['kernel']}, "
        f"{info['memory']} RAM, RLIMIT_NOFILE hard {info['RLIMIT_NOFILE hard']}",
        f"- load: /proc/loadavg at the start `{info['loadavg']}`, at the end "
        f"`{end_info['loadavg']}`; {load_text} (the box is shared: other work shows here, and "
        "moves rates much more than CPU per unit)",
        f"- software: nginx {info['nginx']}, {info['wrk']}, {info['h2load']}, "
        f"{info['curl'].split(' (')[0]}, python h2 {info['h2 (python)']} (bench/pageload.py), "
        f"{info['openssl']}, Python {info['python']}, uvloop {info['uvloop']}, "
        f"{info['openssl (python)']}, {info['sniport']}{changed}",
        f"- servers, with {wtext} worker(s) each (nginx worker_processes = sniport "
        "[server].workers): the nginx seed setup (bench/nginx/nginx-seed.conf + "
        "http-servers.inc: stream + ssl_preread on 127.0.0.1:"
        f"{PORTS.seed}, pass.test relayed to the backend, everything else over a unix socket to "
        "`http` servers with `ssl`: static.test a static root, app.test `proxy_pass` with "
        "upstream keepalive 64), "
        + ("nginx without the hop, \"nginx direct\" (bench/nginx/nginx-direct.conf: the same "
           f"`http` servers listening on 127.0.0.1:{PORTS.direct} themselves; no passthrough, so "
           "measured on the terminated measures only: "
           + ", ".join(m.key for m in MEASURES if m.direct) + "), "
           if "nginx-direct" in a.servers_list else "")
        + "and sniport (config below) on 127.0.0.1:"
        f"{PORTS.sniport}; measured: {', '.join(LABELS[x] for x in a.servers_list)}. "
        "Shared backends, each a separate nginx with 1 worker: the TLS "
        f"passthrough target (bench/nginx/backend-pass.conf) on 127.0.0.1:{PORTS.pass_backend}"
        ", the 100-byte app (bench/nginx/backend-app.conf) on 127.0.0.1:"
        f"{PORTS.app_backend}",
        ("- sniport metrics: ON (--sniport-metrics): [server] metrics_listen = 127.0.0.1:"
         f"{PORTS.sniport_metrics}, workers count into the master's shared mapping"
         if a.sniport_metrics else "- sniport metrics: off (no metrics_listen: workers count "
         "into a private buffer; --sniport-metrics turns them on)"),
        ("- sniport per-address limits: ON (--sniport-ip-limits): max_connections_per_ip and "
         "max_connection_rate_per_ip set, never reached" if a.sniport_ip_limits else
         "- sniport per-address limits: off (the default)"),
        "- TLS, identical for both (and the passthrough backend): TLS 1.3, "
        "TLS_AES_256_GCM_SHA384, X25519, ECDSA P-256 certificates, session tickets and caches "
        "off (nginx: ssl_session_tickets off, ssl_session_cache off, NumTickets 0; sniport: "
        "tls_session_tickets = false); access logs off on both",
        f"- method: {a.runs} round(s); in each, for each worker count, every server is "
        "started fresh, checked, and measured one after the other, the order reversing every "
        "round and between worker counts; the memory measures (M6) each on a server started "
        "just for them, M1-M5, M7 and M8 on one more start. Figures are medians with the "
        "(min-max) "
        "spread. Server CPU = utime+stime of the server's own processes from /proc/PID/stat "
        "(master + workers, for both), before and after each run; memory = VmRSS sum of the "
        "same processes. wrk: -t2 -c64 -d3s unless said otherwise; its socket errors and "
        "non-2xx responses are listed, and the bytes it read per response are checked against "
        "the right answer's size.",
        "",
        "- server commands ($OUT = bench/out/<stamp>, where the logs and rendered configs "
        "stay; $SCRATCH = the scratch directory with the certificates and files, removed at "
        "the end): `nginx -p $OUT/run/nginx-wW-rN-TAG -c $OUT/run/nginx-wW-rN-TAG/nginx.conf "
        "-e $OUT/run/nginx-wW-rN-TAG/error.log -g 'daemon off;'` (W = workers, N = round, "
        "TAG = M6p, M6t, shared or scaling-*), `PYTHONPATH=$SCRATCH/src .venv/bin/python -m "
        "sniport run -c $OUT/run/sniport-wW-rN-TAG/sniport.toml`; the backends: `nginx -p "
        "$OUT/run/backend-pass ...`, `nginx -p $OUT/run/backend-app ...`",
        "",
        "## Summary: sniport / nginx seed and sniport / nginx direct (medians; ratios of "
        "medians)",
        "",
        *summary_table(outcome, measures, workers_list, a.servers_list),
        "",
        "Reference figures (../shared/bench-reference/README.md, 2026-11-26, 1 worker, nginx "
        "seed): M1 0.73 CPU-s/GiB, M2 0.205 CPU-ms/conn, M3 33 CPU-us/req, M4 35 CPU-us/req, "
        "M5 0.535 CPU-ms/conn, M6 15.7 KiB per idle passthrough and 39.0 KiB per idle "
        "terminated connection.",
        "",
        "Where sniport's time goes, for the targets not met, and what would close the gap: "
        "[bench/PROFILES.md](PROFILES.md) (py-spy and strace profiles, written by hand).",
        "",
    ]
    for m in measures:
        lines += [f"## {m.title}", "",
                  f"Command (PORT = {PORTS.seed} for the nginx seed setup, "
                  + (f"{PORTS.direct} for nginx direct, " if m.direct else "")
                  + f"{PORTS.sniport} for sniport):",
                  "", "```", tidy(m.command(session, "PORT"), session), "```", ""]
        if m.note:
            lines += [m.note, ""]
        header = ("| workers | server | round | " + " | ".join(x.name for x in m.metrics)
                  + " | raw |")
        lines += [header, "|" + "---|" * (len(m.metrics) + 4)]
        for r in sorted((r for r in outcome.records if r.measure == m.key),
                        key=lambda r: (r.workers, r.server, r.round)):
            vals = " | ".join(x.fmt.format(r.sample.metrics[x.name]) if x.name in
                              r.sample.metrics else r.sample.missing.get(x.name, "-")
                              for x in m.metrics)
            lines.append(f"| {r.workers} | {r.server} | {r.round + 1} | {vals} | "
                         f"{_raw_json(r.sample)} |")
        lines.append("")
        for w in workers_list:
            for metric in m.metrics:
                for b in bases(a.servers_list):
                    rr = ratio(outcome.records, m.key, w, metric.name, base=b)
                    if rr is not None and metric.name not in COUNTS:
                        lines.append(f"- {w} worker(s), ratio {_ratio_name(b)}, "
                                     f"{metric.name}: **{rr:.2f}**")
        lines.append("")
        if m.key == "M8":
            lines += m8_table(outcome.records, workers_list)

    if a.scaling:
        lines += scaling_section(session, outcome, measures, workers_list)
    if a.config_scaling:
        lines += config_section(session, outcome, workers_list)

    lines += ["## Checks before measuring", "",
              f"At every server start, before its measures: {CHECKED}.", ""]
    tally: dict[tuple[str, str], int] = {}
    for label, result in outcome.checks:
        tally[(label, result)] = tally.get((label, result), 0) + 1
    lines += [f"- {label}: {n} start(s): {result}" for (label, result), n in sorted(tally.items())]
    lines += ["", "## Problems seen", ""]
    if outcome.problems:
        mine = [p for p in outcome.problems if ", sniport" in p or "sniport log" in p]
        theirs = [p for p in outcome.problems if p not in mine]
        lines += ["sniport:", ""] + ([f"- {p}" for p in mine] or ["- none"]) + [""]
        lines += ["nginx, the backends and the bench:", ""]
        lines += [f"- {p}" for p in theirs] or ["- none"]
    else:
        lines.append("- none: every check passed, no wrk socket errors, no non-2xx responses, "
                     "no wrong-sized responses, no failed idle connections, no sniport error "
                     "line (nginx's error-level log lines, if any, are in the next section)")
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
              sniport_config(workers_list[0], "$OUT/run/sniport-wW-rN-TAG/state",
                             "$SCRATCH", metrics=a.sniport_metrics,
                             ip_limits=a.sniport_ip_limits).rstrip().replace(
                  f"workers = {workers_list[0]}                   # nginx: worker_processes "
                  f"{workers_list[0]}", "workers = W                   # nginx: "
                  "worker_processes W"),
              "```", ""]
    if relay_md:
        lines += [relay_md.rstrip(), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers >= 1")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    import textwrap

    epilog = "measures:\n" + "\n".join(
        f"  {m.key:<4} {m.title}" + ("" if m.direct else " (not on nginx direct)")
        + ("\n" + textwrap.fill(m.note, 92, initial_indent=" " * 7, subsequent_indent=" " * 7)
           if m.note else "") for m in MEASURES)
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0],
                                epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="rounds (medians over them); default 3")
    p.add_argument("--quick", action="store_true", help="1 round (and 1 scaling round)")
    p.add_argument("--measures", default=",".join(m.key for m in MEASURES),
                   help="comma-separated, of " + ", ".join(m.key for m in MEASURES)
                   + " (default all)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="of nginx (the seed setup), nginx-direct (nginx without the hop: "
                   "nginx-direct.conf, the terminated measures only: "
                   + ", ".join(m.key for m in MEASURES if m.direct)
                   + ") and sniport; default all three")
    p.add_argument("--workers", default="1,2", type=_int_list,
                   help="worker counts, each measured (nginx worker_processes = sniport "
                   "[server].workers); default 1,2")
    p.add_argument("--scaling", action="store_true",
                   help="also the scaling pass: M3, M4 at --scaling-connections; M6p, M6t at "
                   "--scaling-idle")
    p.add_argument("--scaling-runs", type=int, default=0, help="default: --runs")
    p.add_argument("--scaling-connections", default="1,64,1000")
    p.add_argument("--scaling-idle", default="1,64,1000,4000,8000",
                   help="idle connections held at once for the scaling M6 rows (added in "
                   "turn on one server); default 1,64,1000,4000,8000")
    p.add_argument("--config-scaling", action="store_true",
                   help="also the config-size rows (issue 13): with each count of "
                   "--config-hosts names, half in the passthrough block (sniport) / the stream "
                   "map (nginx seed), half in one more site / server, on a fresh server each: "
                   "M2's and M5's CPU per new connection, the server's RSS, and the wall time "
                   "of a reload until the new config serves")
    p.add_argument("--config-hosts", default="10,1000,10000",
                   help="names for --config-scaling (half passthrough, half one more site); "
                   "default 10,1000,10000")
    p.add_argument("--bulk-size", type=int, default=GIB, help="M1 bytes; default 1 GiB")
    p.add_argument("--idle-count", type=int, default=5000, help="M6 connections; default 5000")
    p.add_argument("--wrk-duration", type=int, default=3, help="wrk seconds; default 3")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-connections", type=int, default=64)
    p.add_argument("--h2load-clients", type=int, default=64, help="M7 h2load -c; default 64")
    p.add_argument("--h2load-streams", type=int, default=10,
                   help="M7 h2load -m (concurrent streams per connection); default 10")
    p.add_argument("--page-duration", type=float, default=4.0,
                   help="M8 seconds of page loads per protocol; default 4")
    p.add_argument("--page-browsers", type=int, default=8,
                   help="M8 page loads at once (bench/pageload.py --browsers); default 8")
    p.add_argument("--pure-python", action="store_true",
                   help="run sniport's modules as Python even where they are compiled")
    p.add_argument("--no-relay", action="store_true", help="skip bench/relay_compare.py")
    p.add_argument("--sniport-metrics", action="store_true",
                   help=f"sniport with [server] metrics_listen = 127.0.0.1:{PORTS.sniport_metrics}"
                   " (Prometheus counters in shared memory); default off (a private buffer)")
    p.add_argument("--sniport-ip-limits", action="store_true",
                   help="sniport with max_connections_per_ip and max_connection_rate_per_ip "
                   "set (far above what the bench opens): their cost, with nothing refused")
    p.add_argument("--relay-bytes", type=int, default=GIB, help="relay_compare bytes per run")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"),
                   help="markdown report; '-' for stdout only; default bench/RESULTS.md")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.scaling_runs = args.scaling_runs or 1
    args.scaling_runs = args.scaling_runs or args.runs
    args.workers_list = sorted(set(args.workers))
    idle = _int_list(args.scaling_idle)
    if idle != sorted(idle):
        p.error("--scaling-idle: increasing counts (connections are added)")
    _int_list(args.scaling_connections)
    _int_list(args.config_hosts)
    return args


def start_backend(lab: Lab, out: Path, template: str, label: str, port: int) -> Nginx:
    run = out / "run" / template.removesuffix(".conf")
    conf = lab.render(template, run, 1)
    backend = Nginx(label, port, run, conf, 1)
    backend.start()
    return backend


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
    measures = [m for m in MEASURES if m.key in keys]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not set(servers) <= set(SERVERS):
        print(f"--servers: of {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    args.servers_list = servers

    try:
        ensure_free(PORTS.all())
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = BENCH / "out" / stamp
    out.mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="sniport-bench-"))
    backends: list[Server] = []
    try:
        digest = snapshot(scratch, args.pure_python)
        info = machine(scratch)
        log(f"scratch {scratch}; logs and raw data in {out}; load {info['loadavg']}; sniport "
            f"{info['sniport']}, source digest {digest}, run from {snapshot_dir(scratch)}")
        lab = Lab(scratch, args.bulk_size)
        lab.build([PASS_HOST, STATIC_HOST, APP_HOST, SITES_CERT])
        session = Session(lab, args, out)
        log(f"lab ready: certificates, /small, /big = {args.bulk_size} bytes, {STATIC_PATH}")

        backends.append(start_backend(lab, out, "backend-pass.conf", "passthrough backend",
                                      PORTS.pass_backend))
        direct = check_passthrough(lab, PORTS.pass_backend)
        if direct:
            raise BenchError(f"the passthrough backend itself fails its check: {direct}")
        backends.append(start_backend(lab, out, "backend-app.conf", "app backend",
                                      PORTS.app_backend))
        direct = check_app_backend(PORTS.app_backend)
        if direct:
            raise BenchError(f"the app backend itself fails its check: {direct}")

        outcome = Outcome()
        run_pass(session, servers, args.workers_list, args.runs, main_jobs(session, measures),
                 outcome, outcome.records)
        if args.scaling:
            run_pass(session, servers, args.workers_list, args.scaling_runs,
                     scaling_jobs(session, measures), outcome, outcome.scaling)
        if args.config_scaling:
            run_config_pass(session, servers, args.workers_list, args.scaling_runs, outcome)
        for backend in backends:
            if not backend.alive():
                outcome.problems.append(f"the {backend.label} died during the bench")
            outcome.log_lines += [(backend.label, x) for x in backend.problems()]
            backend.stop()
        backends = []

        relay_md = ""
        if not args.no_relay:
            log("relay comparison: bench/relay_compare.py")
            done = subprocess.run([str(VENV_PY), str(BENCH / "relay_compare.py"),
                                   "--runs", str(args.runs), "--bytes", str(args.relay_bytes),
                                   "--ports", f"{PORTS.relay_a},{PORTS.relay_b}",
                                   "--markdown"], capture_output=True, text=True, check=False,
                                  env=snapshot_env(scratch))
            (out / "relay_compare.stderr").write_text(done.stderr)
            if done.returncode != 0:
                outcome.problems.append(f"relay_compare.py exit {done.returncode}: "
                                        f"{done.stderr.strip()[-2000:]}")
            relay_md = done.stdout

        end_info = {"date": sh("date -u"), "loadavg": loadavg(),
                    "sniport digest": sniport_digest()}

        def dump(records: list[Record]) -> list[dict[str, Any]]:
            return [{"measure": r.measure, "server": r.server, "workers": r.workers,
                     "round": r.round, "scale": r.scale, "metrics": r.sample.metrics,
                     "raw": r.sample.raw, "problems": r.sample.problems} for r in records]

        (out / "raw.json").write_text(json.dumps(
            {"machine": info, "end": end_info, "records": dump(outcome.records),
             "scaling": dump(outcome.scaling), "config": dump(outcome.config),
             "problems": outcome.problems,
             "checks": outcome.checks, "loads": outcome.loads}, indent=1))
        text = report(session, outcome, info, measures, relay_md, argv,
                      time.monotonic() - t_start, end_info)
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
        for backend in backends:
            backend.stop()
        if args.keep:
            log(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
