"""Issue 11 item 2, bad input: a Redis that is down. Instances keep serving what they have,
say so, and retry; nothing waits on it for long.

One sniport whose ACME storage is a Redis that is not running at first (its CA unreachable
too: nothing is ordered here). It starts anyway, with the temporary certificate and a
warning; a challenge hello meanwhile is refused quickly; once Redis is up with a
certificate in it (as another instance would have put it), the certificate is served
without a reload; Redis down again, a reload keeps serving it.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import time
from pathlib import Path

from support.backends import free_port
from support.configs import route, site_block, toml_lines
from support.pki import Pki, insecure_client_context, pem_fingerprint
from support.process import run_cli, start_sniport
from support.redis import start_redis
from support.waiting import wait_until

from sniport.certs.redis_store import RedisStorage
from sniport.wire import acme

HOST = "down.redis.test"


def served(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            insecure_client_context().wrap_socket(raw, server_hostname=HOST) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def test_redis_down_then_up_then_down(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    config = ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=2,
                                        state_dir=tmp_path / "state")
              + "\n[acme]\n" + toml_lines(directory="https://127.0.0.1:1/dir", storage=url)
              + "\n" + site_block("s", [HOST], "acme", route("/", respond={"body": "x"})))
    (tmp_path / "check.toml").write_text(config)
    out = run_cli("check", "-c", str(tmp_path / "check.toml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"warning: {tmp_path / 'check.toml'}: acme.storage: redis 127.0.0.1:{port}: " \
           "connection refused" in out.stdout, out.stdout
    s = start_sniport(config, tmp_path)
    redis = None
    try:
        s.wait_log(r"acme\.storage: redis .*connection refused; certificates are served from "
                   r"what this instance has")
        temporary = served(s.port)
        # A challenge hello while Redis is down: refused, and quickly (no hang).
        ctx = insecure_client_context()
        ctx.set_alpn_protocols([acme.ACME_TLS_ALPN])
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            try:
                ctx.wrap_socket(raw, server_hostname=HOST).close()
                raise AssertionError("a challenge answered with no storage")
            except ssl.SSLError:
                pass
        assert time.monotonic() - start < 5
        # Redis comes up, with a certificate another instance stored: served within seconds.
        redis = start_redis(tmp_path, port=port)
        chain, key = pki.cert(HOST, directory=tmp_path / "obtained")
        RedisStorage(url).save_certificate([HOST], chain.read_bytes(), key.read_bytes())
        want = pem_fingerprint(chain.read_bytes())
        wait_until(lambda: all(served(s.port) == want for _ in range(4)), 15,
                   "the stored certificate served")
        assert want != temporary
        # Down again; a reload keeps serving it (not the temporary one).
        redis.stop()
        redis = None
        mark = s.mark()
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
        time.sleep(0.5)
        assert all(served(s.port) == want for _ in range(4))
    finally:
        s.stop()
        if redis is not None:
            redis.stop()
