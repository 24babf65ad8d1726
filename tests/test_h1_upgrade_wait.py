"""The bytes a client sends after an Upgrade request's head wait in sniport until the
upstream answers 101 (then the tunnel takes them, test_proxy_websocket.py). Meanwhile sniport
stops reading: what it holds is one read's worth, not whatever the client sends. Here the
upstream never answers and the client sends 8 MiB: sniport reads a small part of it."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

from support.backends import App, stopping
from support.clients import request_bytes, tls_conn
from support.configs import PROXY_HOST as HOST
from support.configs import proxy_route, proxy_site_config
from support.pki import Pki
from support.process import start_sniport
from support.waiting import wait_until


def test_reading_waits_while_an_upgrade_waits_for_its_upstream(pki: Pki,
                                                                tmp_path: Path) -> None:
    app = App("hang")
    with stopping([app]):
        config = proxy_site_config(pki, tmp_path, proxy_route("/", [app.url], timeout="2s"))
        with start_sniport(config, tmp_path) as s:
            key = base64.b64encode(os.urandom(16)).decode()
            with tls_conn(s.port, HOST, pki.client_context()) as c:
                c.send(request_bytes("/_/hang", HOST, headers=[
                    ("Connection", "Upgrade"), ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]))
                c.sock.settimeout(3)
                sent = 0
                chunk = b"\x82" * 65536
                try:
                    while sent < 8 << 20:
                        c.sock.sendall(chunk)
                        sent += len(chunk)
                except TimeoutError:
                    pass  # (the kernel's buffers may hold all of it, or not: up= says)
            log = tmp_path / "access.log"
            # The upstream's answer never comes: 504 at the proxy's timeout (2 s), the close.
            wait_until(lambda: " conn " in log.read_text(), what="the connection's log line")
            line = next(x for x in log.read_text().splitlines() if " conn " in x)
            up = int(re.search(r" up=(\d+)", line).group(1))  # type: ignore[union-attr]
            assert up < 2 << 20, f"sniport read {up} bytes while the upgrade waited"
