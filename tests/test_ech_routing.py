"""Issue 12 item 4, the router's part of Encrypted ClientHello (RFC 9849), end to end.

Real ClientHellos captured from Chromium 150 (which always offers ECH, GREASE when the
server publishes no ECH config) and from curl (which does not), replayed byte for byte to a
passthrough block: the connection is routed by the outer (public) name, relayed untouched,
and its log line says ``ech=offered`` only for the hello that carried the extension.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support.backends import recorder_handler, start_tcp_server
from support.configs import toml_lines
from support.logs import conn_lines, wait_conn
from support.process import start_sniport
from support.waiting import wait_until

from sniport.wire.clienthello import ClientHelloParser, Hello

CAPTURES = Path(__file__).parent / "data" / "clienthellos"


@pytest.mark.parametrize(("capture", "ech"), [
    ("chromium-150-ech-grease.bin", "offered"),
    ("curl-7.88.1.bin", None),
])
def test_an_ech_hello_is_routed_by_its_outer_name_and_logged(tmp_path: Path, capture: str,
                                                             ech: str | None) -> None:
    hello = (CAPTURES / capture).read_bytes()
    backend = start_tcp_server(recorder_handler)
    # The block claims the (outer) name the captured hello carries.
    parsed = ClientHelloParser().feed(hello)
    assert isinstance(parsed, Hello) and parsed.sni
    config = ("[server]\n" + toml_lines(listen=["127.0.0.1:0"], workers=1,
                                        state_dir=tmp_path / "state")
              + "\n[[passthrough]]\n" + toml_lines(name="public", hosts=[parsed.sni],
                                                   upstreams=[backend.address]))
    s = start_sniport(config, tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(hello)
            sock.shutdown(socket.SHUT_WR)
            wait_until(lambda: bool(backend.received), 10, "the relayed hello")
        assert backend.received[0] == hello  # untouched
        line = wait_conn(s, route="passthrough:public")
        assert line.get("ech") == ech, line
        assert line["sni"] == parsed.sni
        assert len(conn_lines(s)) == 1
    finally:
        s.stop()
        backend.close()
