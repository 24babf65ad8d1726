"""M6 load generator: hold COUNT idle TLS connections open (handshake done, no request).

Usage: idle_clients.py --port P --sni NAME --cafile CA [--count 5000] [--concurrency 100]

Opens the connections (at most ``--concurrency`` handshakes in flight), verifies each peer's
certificate against CA and NAME, then prints one JSON line ``{"ok": n, "failed": m, "errors":
{...}, "seconds": s}``. After that it reads commands on stdin, one a line:

- ``status``: answers ``{"open": n}`` (connections the peer has not closed);
- ``open N``: opens N more the same way and answers like the first batch, plus ``"held"`` (all
  connections held now), so that one server can be measured at growing counts (--scaling).

It closes everything when stdin ends.

Runs on uvloop: plain asyncio's SSL transport costs the *client* far more memory per connection.
The soft open-file limit is raised to the hard one (20,000 on the bench machines).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import ssl
import sys
import time

import uvloop


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def hold(args: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sem = asyncio.Semaphore(args.concurrency)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        async with sem:
            try:
                pair = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port, ssl=ctx,
                                            server_hostname=args.sni),
                    args.timeout)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                return
            held.append(pair)

    async def batch(count: int) -> None:
        errors.clear()
        before = len(held)
        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        print(json.dumps({"ok": len(held) - before, "failed": sum(errors.values()),
                          "errors": dict(errors), "seconds": round(time.monotonic() - start, 3),
                          "held": len(held)}), flush=True)

    await batch(args.count)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        words = line.split()
        if words == ["status"]:
            still = sum(1 for r, w in held if not r.at_eof() and not w.is_closing())
            print(json.dumps({"open": still}), flush=True)
        elif len(words) == 2 and words[0] == "open" and words[1].isdigit():
            await batch(int(words[1]))
        else:
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
    for _, w in held:
        w.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sni", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    limit = raise_nofile()
    if limit < args.count + 64:
        print(json.dumps({"ok": 0, "failed": args.count,
                          "errors": {f"RLIMIT_NOFILE {limit} too low": args.count},
                          "seconds": 0}), flush=True)
        return 1
    return uvloop.run(hold(args))


if __name__ == "__main__":
    sys.exit(main())
