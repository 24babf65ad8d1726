"""The ``sniport`` command: run | check | routes.

Job: find and load the config, report problems, start serving. This is the only module that
prints errors and exits (DESIGN.md house rule 5); everything else raises typed errors.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import tomllib
from pathlib import Path

from sniport import __version__
from sniport.config import ConfigError, LoadedConfig, load
from sniport.defaults import embedded_config
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
    from sniport.supervisor import Master, StartError

    path = find_config(args.config)

    def loader() -> LoadedConfig:
        return embedded_config() if path is None else load(path)

    argv = ["run"] + (["-c", str(path.resolve())] if path is not None else [])
    master = Master(loader, str(path) if path else "<embedded default>", argv)
    try:
        return master.run()
    except StartError as exc:
        raise CliError(str(exc)) from None


def _pid_file(explicit: str | None) -> Path:
    """Where the running master's pid file is, from the config as far as it can be read:
    a config too broken to run still names its pid file, so that reload and stop work."""
    from sniport.net.tls import default_state_dir

    path = find_config(explicit)
    server: dict[str, object] = {}
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        try:
            server = tomllib.loads(text).get("server", {})
        except tomllib.TOMLDecodeError:
            # Not TOML any more (an edit in progress): the two keys, line by line.
            server = dict(re.findall(r'(?m)^\s*(state_dir|pid_file)\s*=\s*"([^"]*)"', text))
    state = str(server.get("state_dir") or default_state_dir())
    pid_file = str(server.get("pid_file", "{state_dir}/sniport.pid"))
    if not pid_file:
        raise CliError("pid_file is empty in the config: the master cannot be found")
    return Path(pid_file.replace("{state_dir}", state))


def _signal_master(args: argparse.Namespace, sig: signal.Signals) -> int:
    from sniport.supervisor import StartError, read_pid

    try:
        pid = read_pid(_pid_file(args.config))
    except StartError as exc:
        raise CliError(str(exc)) from None
    os.kill(pid, sig)
    return pid


def cmd_reload(args: argparse.Namespace) -> int:
    pid = _signal_master(args, signal.SIGHUP)
    print(f"reload signalled to master {pid}; its log says how it went")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    pid = _signal_master(args, signal.SIGUSR2)
    print(f"upgrade signalled to master {pid}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from sniport.supervisor import wait_gone

    pid = _signal_master(args, signal.SIGTERM)
    if args.no_wait:
        return 0
    if wait_gone(pid, args.timeout):
        print(f"master {pid} stopped")
        return 0
    raise CliError(f"master {pid} is still running after {args.timeout:g}s")


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from sniport.supervisor import StartError, read_pid

    pid_file = _pid_file(args.config)
    try:
        pid = read_pid(pid_file)
    except StartError as exc:
        print(str(exc))
        return 3  # LSB: not running
    status_file = pid_file.with_suffix(".status.json")
    try:
        status = json.loads(status_file.read_text())
    except (OSError, ValueError):
        status = {}
    loaded = status.get("loaded_at")
    print(f"master:     {pid}")
    print(f"workers:    {' '.join(map(str, status.get('workers', []))) or '?'}")
    if status.get("draining_workers"):
        print(f"draining:   {' '.join(map(str, status['draining_workers']))}")
    print(f"config:     {status.get('config', '?')}")
    if loaded:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(loaded))
        print(f"loaded:     {when} (generation {status.get('generation', '?')})")
    print(f"listeners:  {', '.join(status.get('listeners', [])) or '?'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sniport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sniport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("run", cmd_run, "serve in the foreground"),
        ("check", cmd_check, "validate the config; list every problem"),
        ("routes", cmd_routes, "show which block a server name reaches, and why"),
        ("reload", cmd_reload, "reload the config of the running master (SIGHUP)"),
        ("stop", cmd_stop, "stop the running master gracefully (SIGTERM) and wait"),
        ("status", cmd_status, "show the running master, its workers and config"),
        ("upgrade", cmd_upgrade, "start a new master on the same sockets (SIGUSR2)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", help="config file (default ./sniport.toml, then "
                       "/etc/sniport/sniport.toml)")
        p.set_defaults(func=func)
        if name == "stop":
            p.add_argument("--timeout", type=float, default=60.0,
                           help="seconds to wait for the master to exit")
            p.add_argument("--no-wait", action="store_true", help="do not wait")
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
