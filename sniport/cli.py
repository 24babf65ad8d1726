"""The ``sniport`` command line: run, check, routes, reload, stop, status, upgrade.

Job: find and load the config, report problems, start serving, and talk to a running master
(through its pid and status files). This is the only module that prints errors and exits
(DESIGN.md house rule 5); everything else raises typed errors. No traceback reaches a user:
an unexpected error is one line naming it (``SNIPORT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from sniport import __version__, compiled
from sniport.config import ConfigError, parse_file
from sniport.defaults import parse_embedded
from sniport.net.passthrough import PassthroughRuntime
from sniport.routing import FIRST_BYTES, FirstBytes, Route, RouteTable, explain
from sniport.runtime import Runtime, build_runtime
from sniport.upstream_template import TemplateError, is_template

SEARCH_PATH = (Path("sniport.toml"), Path("/etc/sniport/sniport.toml"))
RELOAD_WAIT = 60.0  # seconds `sniport reload` waits for the outcome by default

DESCRIPTION = """\
sniport: many sites on one port. It reads the TLS ClientHello of each new connection and,
by its server name, passes the connection through untouched or terminates TLS and serves
the site (static files, reverse proxy, redirects)."""

EPILOG = """\
Without -c, the config is ./sniport.toml, then /etc/sniport/sniport.toml; with neither,
`sniport run` serves the embedded default (https://localhost:8443/, self-signed).
Signals to the master: HUP reload, TERM/QUIT graceful stop, INT fast stop,
USR1 reopen log files, USR2 upgrade."""


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


def _existing_config(explicit: str | None) -> Path | None:
    """Like ``find_config``, but a file named with -c must exist: say so plainly."""
    path = find_config(explicit)
    if path is not None and explicit and not path.exists():
        raise CliError(f"config file {path} does not exist")
    return path


def prepare(path: Path | None, listen: list[str], *, check_only: bool) -> Runtime:
    """The runtime of the config at ``path`` (None: the embedded default): the one code
    path of ``check``, ``run`` and every reload. Raises ConfigError with every problem."""
    if path is None:
        loaded, problems = parse_embedded(listen)
    else:
        loaded, problems = parse_file(path, listen)
    return build_runtime(loaded, problems, check_only=check_only)


def cmd_check(args: argparse.Namespace) -> int:
    runtime = prepare(_existing_config(args.config), args.listen, check_only=True)
    for warning in runtime.warnings:
        print(f"warning: {warning}")
    config = runtime.loaded.config
    print(f"{runtime.loaded.source}: ok")
    for note in runtime.notes:
        print(f"note: {note}")
    print("listeners:")
    for entry in config.server.listen:
        print(f"  {entry.address}")
    if config.server.http_listen:
        acme = " (ACME HTTP-01 answered first)" if runtime.acme is not None else ""
        print(f"http listeners (308 to https:// for site hosts{acme}, a passthrough "
              "block's http_upstream for its hosts, 404 otherwise):")
        for entry in config.server.http_listen:
            print(f"  {entry.address}")
    print("routes:")
    for name, route in runtime.table.entries():
        block = route.block
        plain = getattr(block, "http_upstream", None)
        also = f"  (plain HTTP -> {plain})" if plain is not None else ""
        if block is not None and getattr(block, "tls", None) == "acme":
            also = "  (certificate by ACME)"
        templates = [str(u) for u in getattr(block, "upstreams", []) if is_template(str(u))]
        if templates:
            also += f"  (upstream {', '.join(templates)}: filled per name)"
        print(f"  {_name_and_alpn(name, route):<40} -> {route.label}{also}")
    print(f"  {'(no server name)':<40} -> {runtime.table.decide(None).label}")
    print(f"  {'(any other name)':<40} -> {config.default.to}")
    for label, route in _first_bytes_rows(runtime.table):
        # Bytes that are not TLS get no alert: "close" says what happens to them.
        print(f"  {label:<40} -> {'close' if route.kind == 'reject' else route.label}")
    return 0


_FIRST_BYTES_LABELS: dict[FirstBytes, str] = {
    "ssh": "(not TLS: SSH)", "http": "(not TLS: HTTP/1.x)", "other": "(not TLS: other bytes)",
    "silent": "(silent client)"}


def _first_bytes_rows(table: RouteTable) -> list[tuple[str, Route]]:
    """Where bytes that are not TLS go: by what they are when the config tells them apart,
    else all to [default].non_tls; and silent clients when [default].silent is set."""
    if not table.detects:
        rows = [("(not TLS)", table.non_tls())]
        if table.silent_after:
            rows.append(("(silent client)", table.by_first_bytes("silent")))
        return rows
    return [(_FIRST_BYTES_LABELS[first], table.by_first_bytes(first)) for first in FIRST_BYTES
            if first != "silent" or table.silent_after]


def cmd_routes(args: argparse.Namespace) -> int:
    runtime = prepare(_existing_config(args.config), [], check_only=True)
    table = runtime.table
    if args.protocol is not None:
        first: FirstBytes = args.protocol
        print(f"{_FIRST_BYTES_LABELS[first]} -> {explain(table.by_first_bytes(first), None)}")
        return 0
    if args.host is None:
        for name, route in table.entries():
            print(f"{_name_and_alpn(name, route):<40} {explain(route, name)}")
        print(f"{'(no server name)':<40} {explain(table.decide(None), None)}")
        for label, route in _first_bytes_rows(table):
            print(f"{label:<40} {explain(route, None)}")
        return 0
    host = args.host or None
    offered = [p for p in (args.alpn or "").split(",") if p]
    shown = args.host or "(no server name)"
    if offered:
        shown += f" (ALPN {','.join(offered)})"
    route = table.decide(host, offered)
    print(f"{shown} -> {explain(route, host)}")
    if route.block is not None and route.block.name in runtime.passthrough \
            and route.kind == "passthrough":
        _print_filled(runtime.passthrough[route.block.name], host)
    return 0


def _name_and_alpn(name: str, route: Route) -> str:
    """A name of the table, with the ALPN its block requires, if any."""
    if route.alpn:
        return f"{name} [alpn {','.join(route.alpn)}]"
    if route.rule == "alpn":
        return f"{name} [other alpn]"
    return name


def _print_filled(rt: PassthroughRuntime, host: str | None) -> None:
    """A block with upstream templates: the upstreams this name reaches (not resolved)."""
    if rt.entries is None:
        return
    try:
        plan = rt.plan(host)
    except TemplateError as exc:
        print(f"  upstreams: none, the connection is closed (upstream_template: {exc})")
        return
    labels: list[str] = []
    for target in plan:
        if target.label not in labels:
            labels.append(target.label)
    print(f"  upstreams: {', '.join(labels)}  (in order; names resolved per connection)")


def cmd_run(args: argparse.Namespace) -> int:
    from sniport.supervisor import Master, StartError

    path = _existing_config(args.config)
    resolved = path.resolve() if path is not None else None
    listen = list(args.listen)

    def runtime() -> Runtime:
        return prepare(resolved, listen, check_only=False)

    argv = ["run"] + (["-c", str(resolved)] if resolved is not None else [])
    for address in listen:
        argv += ["--listen", address]
    master = Master(runtime, str(path) if path else "<embedded default>", argv)
    try:
        return master.run()
    except StartError as exc:
        raise CliError(str(exc)) from None


def _pid_file(explicit: str | None) -> Path:
    """Where the running master's pid file is, from the config as far as it can be read:
    a config too broken to run still names its pid file, so that reload and stop work."""
    from sniport.net.tls import default_state_dir

    path = _existing_config(explicit)
    server: dict[str, object] = {}
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        try:
            server = tomllib.loads(text).get("server", {})
        except tomllib.TOMLDecodeError:
            # Not TOML any more (an edit in progress): the two keys, line by line.
            server = dict(re.findall(r'(?m)^\s*(state_dir|pid_file)\s*=\s*"([^"]*)"', text))
        if not isinstance(server, dict):
            server = {}
    state = str(server.get("state_dir") or default_state_dir())
    pid_file = str(server.get("pid_file", "{state_dir}/sniport.pid"))
    if not pid_file:
        raise CliError("pid_file is empty in the config: the master cannot be found")
    return Path(pid_file.replace("{state_dir}", state))


def _master(args: argparse.Namespace) -> tuple[int, Path]:
    from sniport.supervisor import StartError, read_pid

    pid_file = _pid_file(args.config)
    try:
        return read_pid(pid_file), pid_file
    except StartError as exc:
        raise CliError(str(exc)) from None


def _status(pid_file: Path) -> dict[str, Any]:
    try:
        status = json.loads(pid_file.with_suffix(".status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP, then wait for the master's verdict on *this* reload: the first outcome that
    began after the signal was sent (the master stamps it with the system-wide monotonic
    clock), so a reload already under way, or one asked for by someone else before us, is
    never mistaken for ours."""
    pid, pid_file = _master(args)
    sent = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    if args.no_wait:
        print(f"reload signalled to master {pid}")
        return 0
    deadline = sent + args.timeout
    while time.monotonic() < deadline:
        status = _status(pid_file)
        outcome = status.get("last_reload") or {}
        if isinstance(outcome, dict) and float(outcome.get("started", 0)) >= sent:
            if outcome.get("ok"):
                print(f"reloaded: {outcome.get('result')}")
                return 0
            for problem in outcome.get("problems") or []:
                print(f"error: {problem}", file=sys.stderr)
            raise CliError(f"reload failed: {outcome.get('result')}")
        if status.get("stopping"):
            raise CliError(f"master {pid} is stopping; the reload was not done")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise CliError(f"master {pid} exited before the reload finished") from None
        time.sleep(0.05)
    raise CliError(f"no outcome from master {pid} within {args.timeout:g}s; "
                   "its log says how the reload went")


def cmd_upgrade(args: argparse.Namespace) -> int:
    pid, _ = _master(args)
    os.kill(pid, signal.SIGUSR2)
    print(f"upgrade signalled to master {pid}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from sniport.supervisor import wait_gone

    pid, _ = _master(args)
    os.kill(pid, signal.SIGTERM)
    if args.no_wait:
        return 0
    if wait_gone(pid, args.timeout):
        print(f"master {pid} stopped")
        return 0
    raise CliError(f"master {pid} is still running after {args.timeout:g}s")


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))


def cmd_status(args: argparse.Namespace) -> int:
    from sniport.supervisor import StartError, read_pid

    pid_file = _pid_file(args.config)
    try:
        pid = read_pid(pid_file)
    except StartError as exc:
        print(str(exc))
        return 3  # LSB: not running
    status = _status(pid_file)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    loaded = status.get("loaded_at")
    print(f"master:     {pid}")
    print(f"workers:    {' '.join(map(str, status.get('workers', []))) or '?'}")
    if status.get("draining_workers"):
        print(f"draining:   {' '.join(map(str, status['draining_workers']))}")
    print(f"config:     {status.get('config', '?')}")
    if loaded:
        print(f"loaded:     {_when(loaded)} (generation {status.get('generation', '?')})")
    print(f"listeners:  {', '.join(status.get('listeners', [])) or '?'}")
    outcome = status.get("last_reload")
    if isinstance(outcome, dict):
        verdict = "ok" if outcome.get("ok") else "FAILED"
        print(f"last reload: {_when(float(outcome.get('at', 0)))} {verdict}: "
              f"{outcome.get('result')}")
        for problem in outcome.get("problems") or []:
            print(f"  {problem}")
    else:
        print("last reload: none since start")
    if status.get("stopping"):
        print(f"stopping:   {status['stopping']}")
    for cert in status.get("certificates") or []:
        _print_certificate(cert)
    return 0


def _print_certificate(cert: dict[str, Any]) -> None:
    """One certificate of ``status``: what it names, who issued it, until when, where it
    comes from, and (ACME) when it is renewed next and what went wrong last."""
    def when(key: str) -> str:
        value = cert.get(key)
        return _when(float(value)) if isinstance(value, (int, float)) else "-"

    print(f"certificate: site {cert.get('site')} ({cert.get('source')})")
    print(f"  names:        {', '.join(cert.get('names') or []) or '-'}")
    print(f"  issuer:       {cert.get('issuer') or '-'}")
    print(f"  not after:    {when('not_after')}")
    if cert.get("source") != "file" and cert.get("source") != "self-signed":
        print(f"  next renewal: {when('next_renewal')}")
    if cert.get("last_error"):
        print(f"  last error:   {cert['last_error']}")


COMMANDS = (
    ("run", cmd_run, "serve in the foreground"),
    ("check", cmd_check, "validate the config and the files it names; list every problem"),
    ("routes", cmd_routes, "show which block a server name reaches, and why"),
    ("reload", cmd_reload, "reload the running master's config (SIGHUP) and wait for the "
                           "outcome"),
    ("stop", cmd_stop, "stop the running master gracefully (SIGTERM) and wait"),
    ("status", cmd_status, "show the running master, its workers, config and last reload"),
    ("upgrade", cmd_upgrade, "start a new master on the same sockets (SIGUSR2)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sniport", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"sniport {__version__} ({compiled.describe()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("-c", "--config", help="config file (default ./sniport.toml, then "
                       "/etc/sniport/sniport.toml)")
        p.set_defaults(func=func)
        if name in ("run", "check"):
            p.add_argument("--listen", action="append", default=[], metavar="ADDRESS",
                           help="listen here instead of [server] listen (repeatable), "
                                "e.g. 127.0.0.1:9443")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=60.0,
                           help="seconds to wait for the master to exit")
            p.add_argument("--no-wait", action="store_true", help="do not wait")
        if name == "reload":
            p.add_argument("--timeout", type=float, default=RELOAD_WAIT,
                           help="seconds to wait for the outcome")
            p.add_argument("--no-wait", action="store_true",
                           help="signal the master and return at once")
        if name == "routes":
            p.add_argument("host", nargs="?", help="a server name ('' for none)")
            p.add_argument("--alpn", metavar="P1,P2",
                           help="the ALPN protocols the hello offers, e.g. xmpp-client")
            p.add_argument("--protocol", choices=FIRST_BYTES,
                           help="where a connection goes whose first bytes are not TLS but "
                                "this (silent: a client that sends nothing)")
        if name == "status":
            p.add_argument("--json", action="store_true",
                           help="the master's status file as it is (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
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
    except BrokenPipeError:
        # The reader went away (`sniport check | head -1`): nothing more to say to it.
        # Python would report the failed flush of stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("SNIPORT_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (a bug in sniport; "
              "SNIPORT_DEBUG=1 shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
