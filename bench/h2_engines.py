"""HTTP/2 engines side by side, in process (no sockets, no TLS): CPU per request of
``wire.h2.H2Server`` (python-hyper ``h2``) and ``wire.h2_nghttp2.NgH2Server`` (libnghttp2
through ctypes), behind the same adapter calls that ``http/h2conn.py`` makes.

Usage: .venv/bin/python bench/h2_engines.py [--requests 20000] [--runs 5] [--batch 10]

The client bytes are made once by an ``h2`` client: N requests of GET /1k with the headers a
browser sends, in batches of ``--batch`` streams (one read each, as h2load -m 10 sends them),
SETTINGS ACK and WINDOW_UPDATEs included. Each engine is fed the identical bytes; each request
is answered through the adapter (``send_headers`` then ``send_data(..., end_stream=True)``
with a 1 KiB body) and ``output()`` is taken once per batch, as h2conn flushes once per read.
Only the server side is timed (``time.process_time``); the median of ``--runs`` runs is
printed, as CPU microseconds per request. Before timing, both engines' output is read back by
an ``h2`` client, which must see the same N responses (status, headers, body).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

from sniport.wire import h2 as wire
from sniport.wire.h2_nghttp2 import AVAILABLE, VERSION, NgH2Server

BODY = bytes(range(256)) * 4  # 1 KiB
REQUEST = [
    (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost:28443"),
    (b":path", b"/1k"),
    (b"sec-ch-ua", b'"Chromium";v="124", "Not-A.Brand";v="99"'),
    (b"sec-ch-ua-mobile", b"?0"), (b"sec-ch-ua-platform", b'"Linux"'),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                    b"Chrome/124.0.0.0 Safari/537.36"),
    (b"accept", b"image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"),
    (b"sec-fetch-site", b"same-origin"), (b"sec-fetch-mode", b"no-cors"),
    (b"sec-fetch-dest", b"image"), (b"referer", b"https://localhost:28443/"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-US,en;q=0.9"),
]
RESPONSE = [(b":status", b"200"), (b"server", b"sniport"),
            (b"date", b"Mon, 01 Jun 2026 12:00:00 GMT"), (b"content-type", b"text/plain"),
            (b"last-modified", b"Mon, 01 Jun 2026 11:00:00 GMT"),
            (b"etag", b'"65f1c2a0-400"'), (b"accept-ranges", b"bytes"),
            (b"content-length", str(len(BODY)).encode())]

Engine = Callable[[wire.Limits], "wire.H2Server | NgH2Server"]
ENGINES: dict[str, Engine] = {"h2": wire.H2Server}
if AVAILABLE:
    ENGINES["nghttp2"] = NgH2Server


def client_reads(requests: int, batch: int) -> tuple[h2.connection.H2Connection, list[bytes]]:
    """The client's bytes, one element per read the server gets; made against a reference
    server (h2) so that the client's window updates and ACKs are what a real client sends."""
    limits = wire.Limits(max_requests=requests + 1)
    ref = wire.H2Server(limits)
    ref.initiate()
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    c.receive_data(ref.output())
    reads: list[bytes] = []
    sid = 1
    done = 0
    while done < requests:
        n = min(batch, requests - done)
        for _ in range(n):
            c.send_headers(sid, REQUEST, end_stream=True)
            sid += 2
        data = c.data_to_send()
        reads.append(data)
        answer(ref, ref.feed(data, 0.0))
        for ev in c.receive_data(ref.output()):
            if isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        done += n
    tail = c.data_to_send()  # the last window updates
    if tail:
        reads.append(tail)
    return c, reads


def answer(server: wire.H2Server | NgH2Server, events: list[wire.Event]) -> int:
    n = 0
    for ev in events:
        if type(ev) is wire.RequestHead:
            server.send_headers(ev.stream_id, RESPONSE, False)
            server.send_data(ev.stream_id, BODY, True)
            n += 1
    return n


def run(engine: Engine, reads: list[bytes], requests: int) -> float:
    """CPU seconds of the server side for every read."""
    server = engine(wire.Limits(max_requests=requests + 1))
    start = time.process_time()
    server.initiate()
    server.output()
    answered = 0
    for data in reads:
        answered += answer(server, server.feed(data, 0.0))
        server.output()
    took = time.process_time() - start
    assert answered == requests, (answered, requests)
    return took


def responses(engine: Engine, requests: int, batch: int) -> list[tuple[list[tuple[bytes, bytes]],
                                                                       bytes]]:
    """What an h2 client makes of the engine's answers (checked once, untimed)."""
    server = engine(wire.Limits(max_requests=requests + 1))
    server.initiate()
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    c.receive_data(server.output())
    got: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
    sid = 1
    ended = 0
    while sid < 2 * requests:
        for _ in range(min(batch, (2 * requests - sid + 1) // 2)):
            c.send_headers(sid, REQUEST, end_stream=True)
            sid += 2
        answer(server, server.feed(c.data_to_send(), 0.0))
        for ev in c.receive_data(server.output()):
            if isinstance(ev, h2.events.ResponseReceived):
                got[ev.stream_id] = (list(ev.headers), bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                got[ev.stream_id][1].extend(ev.data)
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended += 1
    assert ended == requests, (ended, requests)
    return [(h, bytes(b)) for _, (h, b) in sorted(got.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    args = ap.parse_args(argv)

    reference = responses(wire.H2Server, 200, args.batch)
    assert all(b == BODY for _, b in reference)
    for name, engine in ENGINES.items():
        if responses(engine, 200, args.batch) != reference:
            print(f"{name}: responses differ from h2's", file=sys.stderr)
            return 1

    _, reads = client_reads(args.requests, args.batch)
    result: dict[str, object] = {"requests": args.requests, "batch": args.batch,
                                 "runs": args.runs, "nghttp2": VERSION or None}
    for name, engine in ENGINES.items():
        times = [run(engine, reads, args.requests) for _ in range(args.runs)]
        per = [t / args.requests * 1e6 for t in times]
        result[f"{name}_us_per_request"] = round(statistics.median(per), 2)
        result[f"{name}_runs"] = [round(p, 2) for p in per]
        print(f"{name:8s} {statistics.median(per):7.2f} us/request  "
              f"(runs: {', '.join(f'{p:.2f}' for p in per)})")
    if "nghttp2" in ENGINES:
        ratio = float(result["h2_us_per_request"]) / float(  # type: ignore[arg-type]
            result["nghttp2_us_per_request"])  # type: ignore[arg-type]
        print(f"h2 / nghttp2: {ratio:.1f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
