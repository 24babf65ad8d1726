"""The embedded default config: what ``sniport run`` serves when there is no config file.

https://localhost:8443/ with a self-signed certificate, answering the built-in welcome page
(DESIGN.md "Config file"); plaintext HTTP on the port is redirected there.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from sniport.config import LoadedConfig, Problem, from_dict, parse, with_listen

SOURCE = "<embedded default>"


def welcome_page() -> str:
    return resources.files("sniport").joinpath("welcome.html").read_text(encoding="utf-8")


def embedded_config() -> LoadedConfig:
    return from_dict(_raw(), SOURCE)


def parse_embedded(listen: Sequence[str] = ()) -> tuple[LoadedConfig, list[Problem]]:
    """The embedded default, with ``[server] listen`` replaced by ``listen`` if given
    (``sniport run --listen``), and the problems of that replacement."""
    return parse(with_listen(_raw(), listen), SOURCE)


def _raw() -> dict[str, Any]:
    return {
        "server": {"listen": ["127.0.0.1:8443"]},
        "site": [{
            "name": "welcome",
            "hosts": ["localhost"],
            "tls": "self-signed",
            "route": [{
                "path": "/",
                "respond": {"status": 200, "body": welcome_page(),
                            "content_type": "text/html; charset=utf-8"},
            }],
        }],
        # http://localhost:8443/ typed by mistake gets its 308 to https://, not a close.
        "default": {"to": "site:welcome", "non_tls": "http"},
    }
