"""sniport configs as TOML text, built from pieces: the ``[server]`` table, ``[[passthrough]]``
blocks, ``[[site]]`` blocks and their routes; and the whole configs several test modules
start from (one passthrough block, one site, the proxy tests' site, the operations tests'
site and passthrough).

Values go through ``toml_value`` (strings and paths quoted as JSON, which TOML reads the
same); ``extra`` arguments are TOML lines added as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.pki import Pki

SITE_HOST = "site.test"  # the operations tests' terminated site
PT_HOST = "pt.test"  # the operations tests' passthrough host
PROXY_HOST = "app.proxy.test"  # the terminated site every proxy test talks to
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL

TlsSetting = tuple[Path, Path] | str  # (chain, key), or "self-signed"


def short_unix_path(path: Path) -> str:
    """``path`` as text, asserting that it fits in a unix socket address."""
    text = str(path)
    assert len(text.encode()) <= UNIX_PATH_MAX, f"unix socket path too long: {text}"
    return text


def toml_value(v: Any) -> str:
    """A TOML value: booleans, numbers, strings and paths, arrays, inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def toml_lines(**keys: Any) -> str:
    """``key = value`` lines, e.g. for the ``server`` and ``block`` arguments below."""
    return "".join(f"{_key(k)} = {toml_value(v)}\n" for k, v in keys.items())


# --------------------------------------------------------------------------------------------
# Pieces


def server_table(listen: Sequence[str] = ("127.0.0.1:0",), extra: str = "") -> str:
    """``[server]`` listening on ``listen``, with the lines of ``extra``."""
    return f"[server]\n{toml_lines(listen=list(listen))}{extra}\n\n"


def passthrough_block(name: str, hosts: Sequence[str], upstreams: Sequence[str],
                      extra: str = "") -> str:
    """A ``[[passthrough]]`` block, with the lines of ``extra``."""
    keys = toml_lines(name=name, hosts=list(hosts), upstreams=list(upstreams))
    return f"[[passthrough]]\n{keys}{extra}\n\n"


def route(path: str = "/", **keys: Any) -> str:
    """A ``[[site.route]]`` table, e.g. ``route("/", respond={"body": "x"})``,
    ``route("/files/", static={"root": www})``."""
    return f"[[site.route]]\n{toml_lines(path=path, **keys)}"


def proxy_route(path: str, upstreams: Sequence[str], **keys: Any) -> str:
    """A ``[[site.route]]`` with ``proxy = {...}``; route-level keys (``headers``,
    ``remove_headers``) go in ``route_keys``."""
    route_keys = keys.pop("route_keys", {})
    return route(path, **route_keys, proxy={"upstreams": list(upstreams), **keys})


def site_block(name: str, hosts: Sequence[str], tls: TlsSetting, routes: str,
               extra: str = "") -> str:
    """A ``[[site]]`` block: ``tls`` is (chain, key) or "self-signed", ``extra`` site keys,
    then ``routes`` (``route`` tables)."""
    tls_value = tls if isinstance(tls, str) else {"cert": tls[0], "key": tls[1]}
    return (f"[[site]]\n{toml_lines(name=name, hosts=list(hosts), tls=tls_value)}{extra}\n"
            f"{routes}\n")


# --------------------------------------------------------------------------------------------
# Whole configs


def passthrough_config(upstreams: Sequence[str], *, server: str = "", block: str = "",
                       listen: Sequence[str] = ("127.0.0.1:0",), name: str = "lan",
                       hosts: Sequence[str] = ("vpn.example.com",), extra: str = "") -> str:
    """``[server]`` (``server``: its other lines) and one passthrough block, by default "lan"
    for vpn.example.com (``block``: its other lines); ``extra`` goes after (more blocks,
    ``[default]``)."""
    return (server_table(listen, server) + passthrough_block(name, hosts, upstreams, block)
            + extra)


def site_config(name: str, hosts: Sequence[str], tls: TlsSetting, routes: str, *,
                server: str = "", listen: Sequence[str] = ("127.0.0.1:0",),
                site: str = "") -> str:
    """``[server]`` (``server``: its other lines) and one site (``site``: its other keys)."""
    return server_table(listen, server) + site_block(name, hosts, tls, routes, site)


def proxy_site_config(pki: Pki, tmp: Path, routes: str, *, server: str = "") -> str:
    """The proxy tests' config: one terminated site, PROXY_HOST (its certificate written
    under ``tmp/certs``), with ``routes`` (see ``proxy_route``) and one worker (one pool, one
    balancer: counts at the upstream are exact). The access log goes to ``tmp/access.log``;
    stderr keeps the diagnostics."""
    server_lines = toml_lines(workers=1, state_dir=tmp / "state",
                              access_log=tmp / "access.log") + server
    cert = pki.cert(PROXY_HOST, directory=tmp / "certs")
    return site_config("app", [PROXY_HOST], cert, routes, server=server_lines)


def ops_config(*, state_dir: Path, listen: Sequence[str], cert: tuple[Path, Path],
               body: str = "v1", workers: int = 1, drain_timeout: str = "2s",
               access_log: str | Path = "off", backend_port: int | None = None,
               server_extra: str = "", extra: str = "") -> str:
    """The operations tests' config: one terminated site (SITE_HOST, ``respond`` with
    ``body``), JSON logs, and with ``backend_port`` one passthrough block (PT_HOST) to
    127.0.0.1:backend_port."""
    server = toml_lines(workers=workers, drain_timeout=drain_timeout, state_dir=state_dir,
                        access_log=str(access_log), log_format="json") + server_extra
    text = server_table(listen, server)
    if backend_port is not None:
        text += passthrough_block("pt", [PT_HOST], [f"127.0.0.1:{backend_port}"])
    return (text + site_block("site", [SITE_HOST], cert,
                              route("/", respond={"status": 200, "body": body}))
            + extra)
