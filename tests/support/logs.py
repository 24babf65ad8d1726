"""sniport's log lines, parsed once: connection lines (``... conn k=v ...``), request lines
in the combined format, and JSON lines (stderr or a log file); waits over them.

A text line's fields become a dict of strings (quoted values are JSON strings); a JSON line
is the object as sniport wrote it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from support.process import Sniport
from support.waiting import TIMEOUT, wait_until

CONN_FIELDS = ["client", "listener", "sni", "alpn", "hello", "route", "upstream", "up", "down",
               "duration", "end"]
_CONN = re.compile(r"\S+Z conn (.*)")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
ACCESS = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" '
    r'sni=(?P<sni>\S+) host=(?P<host>\S+) ttfb=(?P<ttfb>\S+) total=(?P<total>\S+)'
    r'(?: stream=(?P<stream>\d+))?(?: upstream=(?P<upstream>\S+))?'
    r'(?: note=(?P<note>"(?:[^"\\]|\\.)*"))?$'
)


_REQUEST_START = re.compile(
    r'^\S+ - - \[[^\]]+\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) ')


def access_fields(lines: Iterable[str]) -> list[dict[str, str]]:
    """The access lines among ``lines``: their request, status and ``k=v`` fields (sni,
    host, stream, upstream...)."""
    out = []
    for line in lines:
        m = _REQUEST_START.match(line)
        if m:
            out.append({**parse_kv(line[m.end():]), "request": m.group("request"),
                        "status": m.group("status")})
    return out


def parse_kv(text: str) -> dict[str, str]:
    """``k=v k="quoted v"`` -> {k: v} (quoted values are JSON strings)."""
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(text)}


def conn_lines(s: Sniport) -> list[dict[str, str]]:
    """sniport's text connection lines so far (``TIME conn k=v ...``), parsed."""
    return [parse_kv(m.group(1)) for line in s.log().splitlines() if (m := _CONN.match(line))]


def json_records(lines: Iterable[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Each line a JSON object; those of ``kind`` ("conn", "req"...), or all."""
    out = []
    for line in lines:
        entry = json.loads(line)
        if kind is None or entry.get("kind") == kind:
            out.append(entry)
    return out


def json_log(s: Sniport, kind: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines among sniport's stderr so far (log_format = "json")."""
    return json_records((line for line in s.log().splitlines() if line.startswith("{")), kind)


def json_log_file(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """A JSON log file (access_log with log_format = "json"): every non-blank line must be
    one object. Nothing yet if the file does not exist."""
    if not path.exists():
        return []
    return json_records((line for line in path.read_text().splitlines() if line.strip()), kind)


def conn_mark(s: Sniport) -> int:
    """How many connection lines are logged so far: pass as ``after`` to see only newer."""
    return len(conn_lines(s))


def wait_conn_count(s: Sniport, n: int, timeout: float = TIMEOUT, after: int = 0,
                    **match: str) -> list[dict[str, str]]:
    """At least ``n`` connection lines (from the ``after``-th on) whose fields equal
    ``match``, e.g. ``client="127.0.0.1:5"``; all of those."""
    found: list[dict[str, str]] = []

    def enough() -> bool:
        found[:] = [r for r in conn_lines(s)[after:]
                    if all(r.get(k) == v for k, v in match.items())]
        return len(found) >= n

    def what() -> str:
        return (f"{n} conn lines with {match} (found {len(found)}); log tail:\n"
                f"{s.log()[-4000:]}")

    wait_until(enough, timeout, what)
    return found


def wait_conn(s: Sniport, timeout: float = TIMEOUT, after: int = 0,
              **match: str) -> dict[str, str]:
    """The first connection line (from the ``after``-th on) whose fields equal ``match``."""
    return wait_conn_count(s, 1, timeout, after, **match)[0]


def access_lines(s: Sniport) -> list[re.Match[str]]:
    """sniport's request lines in the combined format so far."""
    return [m for line in s.log().splitlines() if (m := ACCESS.match(line))]


def wait_access(s: Sniport, request: str, timeout: float = TIMEOUT) -> re.Match[str]:
    """The first combined-format line whose request line is ``request``."""
    found: list[re.Match[str]] = []

    def seen() -> bool:
        found[:] = [m for m in access_lines(s) if m.group("request") == request]
        return bool(found)

    def what() -> str:
        return f"an access line for {request!r}; log tail:\n{s.log()[-4000:]}"

    wait_until(seen, timeout, what)
    return found[0]
