"""The embedded default config: what ``sniport run`` serves when there is no config file.

https://localhost:8443/ with a self-signed certificate, answering the built-in welcome page
(DESIGN.md "Config file").
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from sniport.config import LoadedConfig, from_dict

SOURCE = "<embedded default>"


def welcome_page() -> str:
    return resources.files("sniport").joinpath("welcome.html").read_text(encoding="utf-8")


def embedded_config() -> LoadedConfig:
    raw: dict[str, Any] = {
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
        "default": {"to": "site:welcome"},
    }
    return from_dict(raw, SOURCE)
