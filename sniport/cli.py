"""The ``sniport`` command: run | check | routes.

Job: find and load the config, report problems, start serving. This is the only module that
prints errors and exits (DESIGN.md house rule 5); everything else raises typed errors.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from sniport import __version__
from sniport.config import ConfigError, LoadedConfig, load
from sniport.defaults import embedded_config
from sniport.logs import AccessLog, diag, setup_diagnostics
from sniport.net.binding import BindError, bind_all
from sniport.routing import explain
from sniport.runtime import Runtime, build_runtime

SEARCH_PATH = (Path("sniport.toml"), Path("/etc/sniport/sniport.toml"))


class CliError(Exception):
    """A reason to exit 1, already worded for the user."""


def find_config(explicit: str | None) -> Path | None:
    """-c FILE, else ./sniport.toml, else /etc/sniport/sniport.toml, else None (embedded)."""
    if explicit:
        return Path(explicit)
    for candidate in SEARCH_PATH:
        if candidate.exists():
            return candidate
    return None


def load_runtime(explicit: str | None) -> Runtime:
    path = find_config(explicit)
    loaded: LoadedConfig = embedded_config() if path is None else load(path)
    return build_runtime(loaded)


def cmd_check(args: argparse.Namespace) -> int:
    runtime = load_runtime(args.config)
    for warning in runtime.warnings:
        print(f"warning: {warning}")
    config = runtime.loaded.config
    print(f"{runtime.loaded.source}: ok")
    print("listeners:")
    for entry in config.server.listen:
        print(f"  {entry.address}")
    print("routes:")
    for name, route in runtime.table.entries():
        print(f"  {name:<40} -> {route.label}")
    print(f"  {'(no server name)':<40} -> {runtime.table.decide(None).label}")
    print(f"  {'(any other name)':<40} -> {config.default.to}")
    print(f"  {'(not TLS)':<40} -> {runtime.table.non_tls().label}")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    runtime = load_runtime(args.config)
    table = runtime.table
    if args.host is None:
        for name, route in table.entries():
            print(f"{name:<40} {explain(route, name)}")
        print(f"{'(no server name)':<40} {explain(table.decide(None), None)}")
        print(f"{'(not TLS)':<40} {explain(table.non_tls(), None)}")
        return 0
    host = args.host or None
    print(f"{args.host or '(no server name)'} -> {explain(table.decide(host), host)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    runtime = load_runtime(args.config)
    server = runtime.loaded.config.server
    setup_diagnostics(server.log_level)
    for warning in runtime.warnings:
        diag.warning("%s", warning)
    try:
        bound = bind_all(list(server.listen))
        http_bound = bind_all(list(server.http_listen))
    except BindError as exc:
        raise CliError(str(exc)) from None
    access_log = AccessLog(server.access_log, server.log_format)
    import uvloop

    from sniport.worker import Worker

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(runtime, bound, access_log, loop, http_bound)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)
        await worker.start()
        diag.info("sniport %s serving %s on %s", __version__, runtime.loaded.source,
                  ", ".join(str(b.address) for b in bound + http_bound))
        await stop.wait()
        diag.info("stopping")
        worker.close()

    try:
        uvloop.run(serve())
    finally:
        for b in bound + http_bound:
            b.close()
        access_log.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sniport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sniport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("run", cmd_run, "serve in the foreground"),
        ("check", cmd_check, "validate the config; list every problem"),
        ("routes", cmd_routes, "show which block a server name reaches, and why"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", help="config file (default ./sniport.toml, then "
                       "/etc/sniport/sniport.toml)")
        p.set_defaults(func=func)
        if name == "routes":
            p.add_argument("host", nargs="?", help="a server name ('' for none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was started", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
