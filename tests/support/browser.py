"""Headless Chromium (Debian ``chromium``) driven over the DevTools protocol, for the
end-to-end tests that must show what a real browser does with sniport.

- ``Chromium``: one browser process with its own profile directory, resolving ``*.test``
  names to 127.0.0.1 (``--host-resolver-rules``; the port stays in the URLs) and trusting
  only the leaf certificates whose SPKI hashes it is given
  (``--ignore-certificate-errors-spki-list``, which clears the certificate's error status,
  so that HTTP/2 connection coalescing still applies, as with a trusted certificate). Nothing
  of the machine is touched: no system trust store, no /etc/hosts.
- ``Page``: one tab over a DevTools WebSocket: ``navigate`` (until the load event), the
  ``Network.responseReceived`` events of that navigation (``protocol``, ``connectionId``),
  ``evaluate`` and ``wait_for`` on the page.
- ``spki_hash``: the value Chromium's flag wants for a certificate file.

Every process of the browser (zygote, renderers, GPU, network service) carries a
``ProcessTag`` and is killed at ``close()``; every wait has a timeout.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import ClientConnection, connect

from support.process import LogReader, ProcessTag, spawn
from support.waiting import TIMEOUT, wait_until

CHROMIUM = "chromium"


def spki_hash(chain: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the first certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(chain.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Page:
    """One tab, over its DevTools WebSocket. Events are kept in ``events`` as they come."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def _recv(self, timeout: float) -> dict[str, Any]:
        message = json.loads(self.ws.recv(timeout=max(timeout, 0.001)))
        assert isinstance(message, dict)
        return message

    def call(self, method: str, timeout: float = TIMEOUT, **params: Any) -> dict[str, Any]:
        """A DevTools command and its result (events meanwhile go to ``events``)."""
        self._next_id += 1
        my_id = self._next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._recv(deadline - time.monotonic())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result = message.get("result", {})
                assert isinstance(result, dict)
                return result
            self.events.append(message)

    def _until_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self._recv(deadline - time.monotonic())
            self.events.append(message)
            if message.get("method") == name:
                return message

    def navigate(self, url: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Go to ``url`` and wait for the load event (every subresource of the document
        loaded or failed); the ``response`` objects of ``Network.responseReceived`` since."""
        self.events.clear()
        result = self.call("Page.navigate", timeout, url=url)
        assert not result.get("errorText"), f"navigation to {url} failed: {result}"
        self._until_event("Page.loadEventFired", timeout)
        return self.responses()

    def responses(self) -> list[dict[str, Any]]:
        """Every response seen since the last navigation: its url, status, protocol
        ("h2", "http/1.1"), connectionId..."""
        out = []
        for e in self.events:
            if e.get("method") == "Network.responseReceived":
                response = e["params"]["response"]
                assert isinstance(response, dict)
                out.append(response)
        return out

    def failures(self) -> list[dict[str, Any]]:
        """``Network.loadingFailed`` events since the last navigation."""
        return [e["params"] for e in self.events if e.get("method") == "Network.loadingFailed"]

    def evaluate(self, expression: str, timeout: float = TIMEOUT) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", timeout, expression=expression,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def text(self) -> str:
        """What the user sees: the page's body text."""
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for(self, expression: str, timeout: float = TIMEOUT) -> None:
        """Until the JavaScript ``expression`` is true in the page (events keep being
        collected meanwhile)."""
        def true() -> bool:
            return bool(self.evaluate(expression))
        wait_until(true, timeout, lambda: f"{expression!r} in the page (text: {self.text()!r})")


class Chromium:
    """A headless Chromium with a fresh profile in ``profile``: ``resolve`` maps names to
    127.0.0.1, ``spki`` lists the leaves it accepts (see the module docstring)."""

    def __init__(self, profile: Path, *, spki: Sequence[str],
                 resolver_rules: str = "MAP *.test 127.0.0.1") -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.tag = ProcessTag()
        argv = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={profile}", "--remote-debugging-port=0",
            f"--host-resolver-rules={resolver_rules}",
            f"--ignore-certificate-errors-spki-list={','.join(spki)}",
            # Only the test's traffic: no proxy from the environment, no update checks,
            # no field trials, nothing fetched in the background.
            "--no-proxy-server", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-default-apps",
            "--mute-audio", "about:blank",
        ]
        self.proc = spawn(argv, cwd=profile, tag=self.tag)
        assert self.proc.stderr is not None
        self.stderr = LogReader(self.proc.stderr.fileno())
        self._stack = contextlib.ExitStack()
        try:
            self.port = self._devtools_port()
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        active = self.profile / "DevToolsActivePort"  # "PORT\n/devtools/browser/ID"

        def written() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}):\n"
                                   f"{self.stderr.text()[-3000:]}")
            return active.exists() and len(active.read_text().splitlines()) >= 2

        wait_until(written, TIMEOUT, lambda: f"chromium's DevTools port; stderr:\n"
                   f"{self.stderr.text()[-3000:]}")
        return int(active.read_text().split()[0])

    def _get_json(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def page(self) -> Page:
        """The browser's first tab, with Network and Page events on."""
        pages: list[dict[str, Any]] = []

        def listed() -> bool:
            pages[:] = [t for t in self._get_json("/json/list") if t.get("type") == "page"]
            return bool(pages)

        wait_until(listed, TIMEOUT, "a page target in chromium")
        url = pages[0]["webSocketDebuggerUrl"]
        # Our own socket: no proxy from the environment can be in the way.
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        ws = self._stack.enter_context(connect(url, sock=sock, max_size=None,
                                               open_timeout=TIMEOUT))
        page = Page(ws)
        page.call("Network.enable")
        page.call("Page.enable")
        return page

    def close(self) -> None:
        """End the browser (its sockets close with it) and every process it started."""
        with contextlib.suppress(Exception):
            self._stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(Exception):
                self.proc.wait(TIMEOUT)
        self.tag.kill_all()
        with contextlib.suppress(Exception):
            self.proc.wait(TIMEOUT)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
