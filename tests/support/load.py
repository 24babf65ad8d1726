"""A steady client load from a thread, to prove that something happened without a failed
request: new TLS connections (one request each, so that every handshake meets whatever
certificate is served at that moment), all of which must succeed."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from support.pki import insecure_client_context


class Load:
    """Requests on new connections, all the time, from a thread: none may fail."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx = insecure_client_context()
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname=self.name) as tls:
                    tls.sendall(f"GET / HTTP/1.1\r\nHost: {self.name}\r\n"
                                "Connection: close\r\n\r\n".encode())
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
                    assert data.startswith(b"HTTP/1.1 200"), data[:100]
                self.ok += 1
            except (OSError, ssl.SSLError, AssertionError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
