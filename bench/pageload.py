"""Page loads as a browser makes them, for the bench's M8 (issue 9 item 4).

One page load = NEW connections (full TLS handshakes, the server's certificate verified
against --cafile, SNI = --host), then:

- ``--proto h1``: ALPN offers ``http/1.1`` only. One connection GETs the HTML; the asset
  URLs are read out of it (``href=``/``src=``), then up to ``--connections`` connections in
  all (the first one and the rest opened at once, as a browser's 6-per-host pool) take the
  assets from one queue, one request at a time per connection (browsers do not pipeline);
- ``--proto h2``: ALPN offers ``h2, http/1.1`` (as a browser); if the server does not select
  ``h2`` the run stops at once and says ``"h2": "not negotiated"`` (exit status 3). One
  connection: the HTML on stream 1, then every asset at once, all HEADERS frames in one
  write; SETTINGS and window as Chrome sends them (6 MiB stream window, 15 MiB more for the
  connection), so flow control never waits.

Every request carries a browser's headers (user-agent, accept, accept-language,
accept-encoding); every answer must be 200 with exactly the bytes of the file under --root.
When a page is done its connections are closed (close_notify), and the next page load
starts from nothing. ``--browsers`` page loads run at once, for ``--duration`` seconds or
``--pages`` page loads. The result is one JSON line on stdout: pages, requests, bytes,
seconds, the ALPN protocols seen, failures (with up to 5 reasons).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import uvloop

UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/120.0.0.0 Safari/537.36")
ACCEPT_HTML = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
               "*/*;q=0.8")
ACCEPT_ASSET = {".css": "text/css,*/*;q=0.1", ".js": "*/*",
                ".png": "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"}
COMMON = [("accept-language", "en-US,en;q=0.9"), ("accept-encoding", "gzip, deflate, br"),
          ("user-agent", UA)]
ASSET_RE = re.compile(r'(?:href|src)="(/[^"]+)"')
# Chrome's SETTINGS and connection window
H2_SETTINGS: dict[h2.settings.SettingCodes | int, int] = {
    h2.settings.SettingCodes.HEADER_TABLE_SIZE: 65536,
    h2.settings.SettingCodes.ENABLE_PUSH: 0,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 6291456,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 262144}
H2_CONN_WINDOW_EXTRA = 15663105


class NotH2(Exception):
    """The server did not select h2."""


class Bad(Exception):
    """A wrong answer."""


@dataclass
class Tally:
    pages: int = 0
    requests: int = 0
    bytes: int = 0
    handshakes: int = 0
    failures: int = 0
    reasons: list[str] = field(default_factory=list)
    alpn: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failures += 1
        if len(self.reasons) < 5:
            self.reasons.append(why)


@dataclass
class Site:
    port: int
    host: str
    page: str
    root: Path
    ctx: ssl.SSLContext
    files: dict[str, bytes] = field(default_factory=dict)

    def expect(self, path: str) -> bytes:
        body = self.files.get(path)
        if body is None:
            body = self.files[path] = (self.root / path.lstrip("/")).read_bytes()
        return body

    def assets(self, html: bytes) -> list[str]:
        return ASSET_RE.findall(html.decode("utf-8", "replace"))


def context(cafile: str, protocols: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(protocols)
    return ctx


async def connect(site: Site, tally: Tally
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=site.ctx,
                                                   server_hostname=site.host)
    tally.handshakes += 1
    obj = writer.get_extra_info("ssl_object")
    proto = (obj.selected_alpn_protocol() if obj is not None else None) or "none"
    tally.alpn[proto] = tally.alpn.get(proto, 0) + 1
    return reader, writer, proto


def close(writer: asyncio.StreamWriter) -> None:
    writer.close()  # close_notify, then the socket; the page load does not wait for it


def _check(site: Site, path: str, status: int, body: bytes) -> None:
    if status != 200:
        raise Bad(f"{path}: status {status}")
    if body != site.expect(path):
        raise Bad(f"{path}: {len(body)} bytes, not the file's {len(site.expect(path))}")


# ---------------------------------------------------------------------------------------------
# HTTP/1.1


async def h1_get(site: Site, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 path: str, tally: Tally) -> bytes:
    ext = path[path.rfind("."):]
    accept = ACCEPT_HTML if path == site.page else ACCEPT_ASSET.get(ext, "*/*")
    head = f"GET {path} HTTP/1.1\r\nHost: {site.host}\r\nConnection: keep-alive\r\n" \
           f"Accept: {accept}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in COMMON) + "\r\n"
    writer.write(head.encode())
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
        elif k.strip().lower() == "transfer-encoding":
            raise Bad(f"{path}: Transfer-Encoding {v.strip()} (a static file has a length)")
    if length is None:
        raise Bad(f"{path}: no Content-Length")
    body = await reader.readexactly(length)
    _check(site, path, status, body)
    tally.requests += 1
    tally.bytes += len(body)
    return body


async def page_h1(site: Site, tally: Tally, connections: int) -> None:
    first = await connect(site, tally)
    opened = [first[1]]
    try:
        if first[2] not in ("http/1.1", "none"):
            raise Bad(f"ALPN {first[2]!r} on an http/1.1-only offer")
        html = await h1_get(site, first[0], first[1], site.page, tally)
        queue = site.assets(html)
        queue.reverse()

        async def worker(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None
                         ) -> None:
            if conn is None:
                if not queue:  # nothing left by the time it would be opened: a browser
                    return    # would not open it either
                conn = await connect(site, tally)
                opened.append(conn[1])
            while queue:
                await h1_get(site, conn[0], conn[1], queue.pop(), tally)

        n_new = min(connections, len(queue)) - 1
        results = await asyncio.gather(worker(first),
                                       *(worker(None) for _ in range(max(n_new, 0))),
                                       return_exceptions=True)  # all done before closing
        for r in results:
            if isinstance(r, BaseException):
                raise r
    finally:
        for w in opened:
            close(w)


# ---------------------------------------------------------------------------------------------
# HTTP/2


class H2Client:
    def __init__(self, site: Site, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tally: Tally) -> None:
        self.site, self.reader, self.writer, self.tally = site, reader, writer, tally
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.update_settings(H2_SETTINGS)
        self.conn.increment_flow_control_window(H2_CONN_WINDOW_EXTRA)
        self.streams: dict[int, tuple[str, list[bytes], list[int]]] = {}

    def request(self, path: str) -> None:
        ext = path[path.rfind("."):]
        accept = ACCEPT_HTML if path == self.site.page else ACCEPT_ASSET.get(ext, "*/*")
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "GET"), (":authority", self.site.host),
                                     (":scheme", "https"), (":path", path),
                                     ("accept", accept), *COMMON], end_stream=True)
        self.streams[sid] = (path, [], [0])

    async def run(self) -> dict[str, bytes]:
        """Send what is pending and read until every open stream has ended."""
        done: dict[str, bytes] = {}
        self.writer.write(self.conn.data_to_send())
        while self.streams:
            data = await self.reader.read(1 << 16)
            if not data:
                raise Bad(f"connection closed with {len(self.streams)} stream(s) open")
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    for k, v in ev.headers:
                        if k == b":status":
                            self.streams[ev.stream_id][2][0] = int(v)
                elif isinstance(ev, h2.events.DataReceived):
                    self.streams[ev.stream_id][1].append(ev.data)
                    self.conn.acknowledge_received_data(ev.flow_controlled_length,
                                                        ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    path, parts, status = self.streams.pop(ev.stream_id)
                    body = b"".join(parts)
                    _check(self.site, path, status[0], body)
                    self.tally.requests += 1
                    self.tally.bytes += len(body)
                    done[path] = body
                elif isinstance(ev, h2.events.StreamReset):
                    raise Bad(f"stream {ev.stream_id} reset: {ev.error_code!r}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise Bad(f"GOAWAY {ev.error_code!r}")
            out = self.conn.data_to_send()
            if out:
                self.writer.write(out)
        return done


async def page_h2(site: Site, tally: Tally) -> None:
    reader, writer, proto = await connect(site, tally)
    try:
        if proto != "h2":
            raise NotH2(proto)
        client = H2Client(site, reader, writer, tally)
        client.request(site.page)
        html = (await client.run())[site.page]
        for path in site.assets(html):
            client.request(path)
        await client.run()
        client.conn.close_connection()  # GOAWAY, as a browser closing the tab's connection
        writer.write(client.conn.data_to_send())
    finally:
        close(writer)


# ---------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    protocols = ["http/1.1"] if args.proto == "h1" else ["h2", "http/1.1"]
    site = Site(args.port, args.host, args.page, Path(args.root),
                context(args.cafile, protocols))
    tally = Tally()
    load: Callable[[], Awaitable[None]] = (
        (lambda: page_h1(site, tally, args.connections)) if args.proto == "h1"
        else (lambda: page_h2(site, tally)))
    not_h2: list[str] = []
    started = 0
    t0 = time.monotonic()
    deadline = t0 + args.duration if args.duration else None

    async def browser() -> None:
        nonlocal started
        while not not_h2:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if args.pages and started >= args.pages:
                return
            started += 1
            try:
                await asyncio.wait_for(load(), args.timeout)
                tally.pages += 1
            except NotH2 as exc:
                not_h2.append(str(exc))
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, TimeoutError, ValueError, Bad,
                    h2.exceptions.ProtocolError) as exc:
                tally.fail(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(browser() for _ in range(args.browsers)))
    seconds = time.monotonic() - t0
    await asyncio.sleep(0.1)  # let the close_notify writes go out
    out: dict[str, object] = {
        "proto": args.proto, "pages": tally.pages, "requests": tally.requests,
        "bytes": tally.bytes, "handshakes": tally.handshakes, "seconds": round(seconds, 3),
        "failures": tally.failures, "reasons": tally.reasons, "alpn": tally.alpn,
        "assets_per_page": len(site.assets(site.expect(site.page)))}
    if not_h2:
        out["h2"] = "not negotiated"
        out["alpn_selected"] = not_h2[0]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True, help="SNI, Host / :authority")
    p.add_argument("--cafile", required=True)
    p.add_argument("--root", required=True, help="the site's root: the expected bytes")
    p.add_argument("--page", default="/page/index.html")
    p.add_argument("--proto", choices=("h1", "h2"), required=True)
    p.add_argument("--connections", type=int, default=6, help="h1: per page load; default 6")
    p.add_argument("--browsers", type=int, default=8, help="page loads at once; default 8")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (or --pages)")
    p.add_argument("--pages", type=int, default=0, help="page loads in all (or --duration)")
    p.add_argument("--timeout", type=float, default=30.0, help="per page load")
    args = p.parse_args(argv)
    if not args.duration and not args.pages:
        p.error("--duration or --pages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(main_async(args))
    print(json.dumps(result), flush=True)
    if result.get("h2") == "not negotiated":
        return 3
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
