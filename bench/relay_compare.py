"""Passthrough relay cost: sniport's splice relay against a transport relay, CPU-s per GiB.

Usage (from the repository, with the project's venv):

    .venv/bin/python bench/relay_compare.py [--runs 3] [--bytes 1073741824]
        [--variants transport,splice-64K,splice-256K,splice-1M] [--ports 20901,20902]
        [--markdown | --json]

DESIGN.md ("Performance notes") asks for this measurement. One process (this one) is the
relay, on uvloop; a *source* process connects to it over TCP loopback, sends --bytes and
shuts down its write side; the relay connects to a *sink* process that reads and discards
until EOF, then closes, which travels back to the source. Same harness for every variant:

- ``transport``: asyncio Protocols (written here): ``data_received`` -> the peer transport's
  ``write``; ``pause_writing``/``resume_writing`` -> the peer's ``pause_reading``/
  ``resume_reading``; ``eof_received`` -> the peer's ``write_eof`` and ``return True``;
- ``splice-64K`` / ``splice-256K`` / ``splice-1M``: ``sniport.net.relay.SpliceRelay`` with a
  ``PipePool(size=...)`` of that pipe size (256K is sniport's default).

Cost = this process's own utime+stime (``getrusage(RUSAGE_SELF)``) from the moment both
sockets are connected to the moment the relay has ended, divided by the GiB moved; the source
and the sink are other processes and are not counted. The byte counts at both ends are
checked. Variants alternate, the order rotating every round; medians of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

GIB = 1 << 30
CHUNK = 1 << 20
VARIANTS: dict[str, int] = {"transport": 0, "splice-64K": 1 << 16, "splice-256K": 1 << 18,
                            "splice-1M": 1 << 20}


# ---------------------------------------------------------------------------------------------
# The two helper roles: source and sink, each in its own process


def run_source(port: int, nbytes: int) -> int:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    block = memoryview(os.urandom(CHUNK))
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    received = 0
    while chunk := sock.recv(65536):  # the sink's close, passed back by the relay
        received += len(chunk)
    sock.close()
    print(json.dumps({"sent": nbytes, "received_back": received}), flush=True)
    return 0


def run_sink(port: int) -> int:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1)
    print("ready", flush=True)
    lsock.settimeout(120)
    sock, _ = lsock.accept()
    lsock.close()
    buf = bytearray(CHUNK)
    received = 0
    while n := sock.recv_into(buf):
        received += n
    sock.close()
    print(json.dumps({"received": received}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The transport relay


class _Half(asyncio.Protocol):
    """One socket's side of a transport relay; ``peer`` is the other socket's side."""

    def __init__(self, relay: TransportRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False
        self.count = 0  # bytes read from this socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.count += len(data)
        self.peer.transport.write(data)

    def pause_writing(self) -> None:  # our socket is full: stop reading the one that feeds it
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        assert self.peer is not None and self.peer.transport is not None
        self.eof = True
        self.peer.transport.write_eof()  # sent once the peer's buffer has drained
        self.relay.maybe_close()
        return True  # keep the transport open: the other direction may still run

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(exc)


class TransportRelay:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.client = _Half(self)
        self.upstream = _Half(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.done: asyncio.Future[tuple[str, int, int]] = loop.create_future()
        self._lost = 0
        self._reason = "eof"

    async def start(self, client: socket.socket, upstream: socket.socket) -> None:
        # The upstream (the sink) never speaks first, so it can be wired before the client.
        await self.loop.create_connection(lambda: self.upstream, sock=upstream)
        await self.loop.connect_accepted_socket(lambda: self.client, sock=client)

    def maybe_close(self) -> None:
        if self.client.eof and self.upstream.eof:
            for half in (self.client, self.upstream):
                assert half.transport is not None
                half.transport.close()  # after its buffer is written

    def lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._reason = f"error: {exc}"
            for half in (self.client, self.upstream):
                if half.transport is not None:
                    half.transport.abort()
        self._lost += 1
        if self._lost == 2 and not self.done.done():
            self.done.set_result((self._reason, self.client.count, self.upstream.count))


async def relay_transport(client: socket.socket, upstream: socket.socket) -> tuple[str, int, int]:
    relay = TransportRelay(asyncio.get_running_loop())
    try:
        await relay.start(client, upstream)
        return await relay.done
    finally:
        for half in (relay.client, relay.upstream):
            if half.transport is not None:
                half.transport.abort()  # a no-op once closed


async def bounded(coro: Awaitable[tuple[str, int, int]], timeout: float) -> tuple[str, int, int]:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        return (f"timed out after {timeout:.0f}s", -1, -1)


async def relay_splice(client: socket.socket, upstream: socket.socket,
                       pipe_size: int) -> tuple[str, int, int]:
    from sniport.net.relay import PipePool, SpliceRelay

    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[str, int, int]] = loop.create_future()
    pool = PipePool(size=pipe_size)

    def on_done(reason: str, up: int, down: int) -> None:
        done.set_result((reason, up, down))

    actual = PipePool(size=pipe_size)  # what F_SETPIPE_SZ really gave, for the report
    probe = actual.get()
    actual.put(probe)
    actual.close()
    # sniport's relay watches its sockets either through the loop's add_reader or (newer)
    # through the worker's own epoll set, a Poller passed in: build what it asks for. (Told
    # by the module's presence: a compiled SpliceRelay has no signature to inspect.)
    poller: Any = None
    if importlib.util.find_spec("sniport.net.poller") is not None:
        from sniport.net.poller import Poller  # type: ignore[import-not-found,unused-ignore]

        poller = Poller(loop)
        relay = cast(Any, SpliceRelay)(loop, poller, pool, client, upstream, 3600.0, on_done)
    else:
        relay = cast(Any, SpliceRelay)(loop, pool, client, upstream, 3600.0, on_done)
    relay.start()
    try:
        reason, up, down = await done
        if actual.size != pipe_size:  # not the variant it claims to be: not a valid run
            reason = f"{reason}; pipe size {actual.size} instead of {pipe_size}"
        return reason, up, down
    finally:
        relay.close("cancelled")  # a no-op once it has ended by itself
        pool.close()
        if poller is not None:
            poller.close()


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass
class Trial:
    variant: str
    cpu_s: float
    seconds: float
    bytes: int
    ok: bool
    note: str


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _helper(role: str, port: int, nbytes: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--port", str(port),
                             "--bytes", str(nbytes)], stdout=subprocess.PIPE, text=True)


def trial(loop: asyncio.AbstractEventLoop, listener: socket.socket, ports: tuple[int, int],
          variant: str, nbytes: int) -> Trial:
    sink = _helper("sink", ports[1])
    source: subprocess.Popen[str] | None = None
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the sink did not start")
        upstream = socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
        source = _helper("source", ports[0], nbytes)
        client, _ = listener.accept()
        client.setblocking(False)
        upstream.setblocking(False)
        cpu0, t0 = _cpu(), time.perf_counter()
        timeout = 60 + nbytes / 20e6  # far beyond any healthy run (20 MB/s)
        if variant == "transport":
            coro = relay_transport(client, upstream)
        else:
            coro = relay_splice(client, upstream, VARIANTS[variant])
        reason, up, down = loop.run_until_complete(bounded(coro, timeout))
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()
        try:
            src_out, _ = source.communicate(timeout=30)
            sink_out, _ = sink.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            src_out, sink_out = "", ""
        got = json.loads(sink_out or "{}").get("received", -1)
        ok = reason == "eof" and up == nbytes and got == nbytes and down == 0 and bool(src_out)
        note = "" if ok else (f"reason {reason}, relayed {up}/{down}, sink got {got}, "
                              f"source {src_out.strip()!r}")
        return Trial(variant, cpu, seconds, max(up, 0), ok, note)
    finally:
        for p in (source, sink):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    ports = tuple(int(p) for p in args.ports.split(","))
    assert len(ports) == 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", ports[0]))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", ports[1]))
        probe.close()
    except OSError as exc:
        raise SystemExit(f"port taken ({ports}): {exc.strerror}") from None
    listener.listen(8)
    listener.settimeout(30)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    trials: list[Trial] = []
    try:
        for rnd in range(args.runs):
            shift = rnd % len(variants)
            for v in variants[shift:] + variants[:shift]:
                t = trial(loop, listener, (ports[0], ports[1]), v, args.bytes)
                trials.append(t)
                print(f"round {rnd + 1} {v}: {t.cpu_s / (t.bytes / GIB or 1):.3f} CPU-s/GiB, "
                      f"{t.bytes / t.seconds / 1e6:.0f} MB/s, {t.cpu_s:.3f} CPU-s"
                      + ("" if t.ok else f"  PROBLEM: {t.note}"), file=sys.stderr, flush=True)
    finally:
        loop.close()
        listener.close()
    return {"bytes": args.bytes, "runs": args.runs, "variants": variants,
            "uvloop": importlib.metadata.version("uvloop"), "python": sys.version.split()[0],
            "trials": [t.__dict__ for t in trials]}


def render_markdown(result: dict[str, Any], command: str) -> str:
    trials = [Trial(**t) for t in result["trials"]]
    per: dict[str, list[Trial]] = {}
    for t in trials:
        if t.ok:  # a failed run has no meaningful cost; it is listed below the table
            per.setdefault(t.variant, []).append(t)

    def cost(t: Trial) -> float:
        return t.cpu_s / (t.bytes / GIB) if t.bytes else float("nan")

    def spread(values: list[float], fmt: str) -> str:
        med = statistics.median(values)
        if len(values) == 1:
            return fmt.format(med)
        return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    base = statistics.median(cost(t) for t in per["transport"]) if "transport" in per else None
    lines = [
        "## Relay: splice against a transport relay (bench/relay_compare.py)",
        "",
        f"One relay process on uvloop {result['uvloop']} (Python {result['python']}) between "
        f"a source process sending {result['bytes']} bytes and a sink process, over TCP "
        "loopback; cost = the relay process's own utime+stime (getrusage RUSAGE_SELF) per GiB. "
        f"Medians of {result['runs']} with the (min-max) spread; variants alternate.",
        "",
        "```",
        command,
        "```",
        "",
        "| relay | CPU-s per GiB | MB/s | CPU / transport's | runs ok |",
        "|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        ts = per.get(v, [])
        if not ts:
            continue
        c = [cost(t) for t in ts]
        r = f"{statistics.median(c) / base:.2f}" if base else "-"
        lines.append(f"| {v} | {spread(c, '{:.3f}')} | "
                     f"{spread([t.bytes / t.seconds / 1e6 for t in ts], '{:.0f}')} | {r} | "
                     f"{len(ts)}/{sum(t.variant == v for t in trials)} |")
    bad = [t for t in trials if not t.ok]
    lines.append("")
    lines += [f"- problem: {t.variant}: {t.note}" for t in bad]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["relay", "source", "sink"], default="relay",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=GIB)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ports", default="20901,20902", help="relay listen port, sink port")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true", help="print a markdown section")
    out.add_argument("--json", action="store_true", help="print the raw trials as JSON")
    args = parser.parse_args()
    if args.role == "source":
        return run_source(args.port, args.bytes)
    if args.role == "sink":
        return run_sink(args.port)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        command = "bench/relay_compare.py " + " ".join(sys.argv[1:])
        print(render_markdown(result, command.strip()))
    return 0 if all(t["ok"] for t in result["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
