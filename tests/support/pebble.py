"""Debian's ``pebble`` (Let's Encrypt's test ACME server) on loopback, for the ACME tests.

``start_pebble`` writes a config in ``tmp_path``, starts pebble and returns once it accepts
connections; ``PebbleInfo.stop()`` ends it. Its own HTTPS uses a trustme CA written to
``ca_file`` (give that to ``AcmeHttp(ca=...)``). ``always_valid`` skips challenge validation
(PEBBLE_VA_ALWAYS_VALID); without it pass ``dns_port`` (a pebble-challtestsrv that answers
127.0.0.1) and the ``http_port``/``tls_port`` where sniport answers HTTP-01 / TLS-ALPN-01.
``validity`` sets certificateValidityPeriod (seconds) for short-lived certificates.
``nonce_reject`` sets PEBBLE_WFE_NONCEREJECT (None: pebble's default 5% of nonces refused as
badNonce, which a client must survive). See /work/shared/pebble.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

from support.backends import free_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class PebbleInfo:
    directory_url: str
    ca_file: str  # the trustme CA of pebble's own HTTPS (directory, orders)
    mgmt_url: str  # /roots/0, /intermediates/0: the issuing chain of this run
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        _terminate(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_pebble(tmp_path: Path, *, always_valid: bool, validity: int | None = None,
                 dns_port: int | None = None, http_port: int | None = None,
                 tls_port: int | None = None, nonce_reject: int | None = None) -> PebbleInfo:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "pebble-cert.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "pebble-key.pem"))
    ca_file = tmp_path / "pebble-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port, mgmt = free_port(), free_port()
    config: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(tmp_path / "pebble-cert.pem"),
        "privateKey": str(tmp_path / "pebble-key.pem"),
        "httpPort": http_port if http_port is not None else free_port(),
        "tlsPort": tls_port if tls_port is not None else free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
    }
    if validity is not None:
        config["certificateValidityPeriod"] = validity
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": config}))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1"}
    if always_valid:
        env["PEBBLE_VA_ALWAYS_VALID"] = "1"
    if nonce_reject is not None:
        env["PEBBLE_WFE_NONCEREJECT"] = str(nonce_reject)
    args = [PEBBLE, "-config", str(tmp_path / "pebble.json")]
    if dns_port is not None:
        args += ["-dnsserver", f"127.0.0.1:{dns_port}"]
    log_path = tmp_path / "pebble.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    info = PebbleInfo(f"https://127.0.0.1:{port}/dir", str(ca_file),
                      f"https://127.0.0.1:{mgmt}", proc, log_path)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return info
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                info.stop()
                raise RuntimeError(f"pebble did not start:\n{info.log()}") from None
            time.sleep(0.05)


CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


@dataclass
class ChallTestSrv:
    """pebble-challtestsrv as pebble's DNS: every name resolves to 127.0.0.1 (IPv4 only, or
    pebble would dial ::1 first; /work/shared/pebble.md)."""

    dns_port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _terminate(self.proc)


def start_challtestsrv(tmp_path: Path) -> ChallTestSrv:
    dns_port, mgmt = free_port(), free_port()
    log = tmp_path / "challtestsrv.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{mgmt}",
             "-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT)
    srv = ChallTestSrv(dns_port, proc)
    deadline = time.monotonic() + 20
    while True:  # its management port opens once the DNS server is up
        try:
            socket.create_connection(("127.0.0.1", mgmt), timeout=1).close()
            return srv
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                srv.stop()
                raise RuntimeError(f"pebble-challtestsrv did not start:\n"
                                   f"{log.read_text(errors='replace')}") from None
            time.sleep(0.05)
