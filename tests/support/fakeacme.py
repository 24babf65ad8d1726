"""A small fake ACME server for failure tests: a real asyncio HTTPS server on 127.0.0.1
(trustme certificate), in the test's own event loop, whose answers each test chooses per path.

``routes[path]`` is a function of the request returning a ``Reply``: a status, headers and
body; ``raw`` bytes sent as they are, then the connection closed; or ``hang`` (never answer).
By default ``/dir`` is a directory pointing at ``/nonce``, ``/account``, ``/order`` (and
``/ari`` when ``ari`` is set) and ``/nonce`` hands out nonces; everything else is a 404
problem. Every request is recorded in ``hits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes | None = None
    hang: bool = False


def problem(status: int, kind: str, detail: str, *headers: tuple[str, str]) -> Reply:
    body = json.dumps({"type": f"urn:ietf:params:acme:error:{kind}", "detail": detail,
                       "status": status}).encode()
    return Reply(status, [("Content-Type", "application/problem+json"), *headers], body)


class FakeAcme:
    def __init__(self, tmp_path: Path, *, ari: bool = False) -> None:
        self.ca = trustme.CA()
        self.ca_file = str(tmp_path / "fake-acme-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.ari = ari
        self.hits: list[Hit] = []
        self.routes: dict[str, Callable[[Hit], Reply]] = {
            "/dir": lambda hit: Reply(200, [("Content-Type", "application/json")],
                                      json.dumps(self.directory()).encode()),
            "/nonce": lambda hit: Reply(200, [("Replay-Nonce", f"n{next(self._nonces)}")]),
        }
        self._nonces = itertools.count()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def directory(self) -> dict[str, object]:
        d: dict[str, object] = {"newNonce": self.url("/nonce"),
                                "newAccount": self.url("/account"),
                                "newOrder": self.url("/order")}
        if self.ari:
            d["renewalInfo"] = self.url("/ari")
        return d

    def paths(self) -> list[str]:
        return [h.path for h in self.hits]

    async def __aenter__(self) -> FakeAcme:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            hit = Hit(method, target, headers, body)
            self.hits.append(hit)
            route = self.routes.get(target.split("?")[0]) or self.routes.get(
                "/" + target.split("/")[1])
            reply = route(hit) if route else problem(404, "malformed", f"no {target} here")
            if reply.hang:
                await reader.read()  # never answer; done when the client gives up
            if reply.raw is not None:
                writer.write(reply.raw)
            else:
                out = [f"HTTP/1.1 {reply.status} X"]
                out += [f"{k}: {v}" for k, v in reply.headers]
                out.append(f"Content-Length: {len(reply.body)}")
                out.append("Connection: close")
                data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                writer.write(data + (b"" if method == "HEAD" else reply.body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
