"""Logs: the connection/access log, and the diagnostic log on stderr.

Job: one line per connection at its close (and, for terminated sites, one per request), as
text or one JSON object per line; diagnostics through the stdlib ``logging`` module.

Rules: nothing is formatted when the log is off; a line is written whole, with one write;
``reopen()`` (SIGUSR1, for logrotate) swaps the file without losing a line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

diag = logging.getLogger("sniport")


def setup_diagnostics(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s sniport[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("sniport")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _text_value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    if " " in text or '"' in text or "=" in text:
        return json.dumps(text)
    return text


class AccessLog:
    """Where connection and request lines go: ``stderr``, a file path, or ``off``."""

    def __init__(self, target: str, fmt: str) -> None:
        self.target = target
        self.json = fmt == "json"
        self.enabled = target != "off"
        self._file: IO[str] | None = None
        self.reopen()

    def reopen(self) -> None:
        if not self.enabled:
            return
        if self.target == "stderr":
            self._file = sys.stderr
            return
        try:
            new = open(self.target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            if self._file is None:
                raise
            diag.error("access log %s: cannot reopen: %s; still writing to the old file",
                       self.target, exc.strerror)
            return
        old, self._file = self._file, new
        if old is not None and old is not sys.stderr:
            old.close()

    def give_to(self, user: str, group: str) -> None:
        """Make the log file owned by the workers' user, so that they can reopen it."""
        if not (user or group) or self.target in ("stderr", "off") or os.geteuid() != 0:
            return
        import grp
        import pwd

        try:
            uid = pwd.getpwnam(user).pw_uid if user else -1
            gid = grp.getgrnam(group).gr_gid if group else (
                pwd.getpwnam(user).pw_gid if user else -1)
            os.chown(self.target, uid, gid)
        except (KeyError, OSError) as exc:
            diag.warning("access log %s: cannot give it to %s: %s", self.target, user, exc)

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None

    def write_line(self, line: str) -> None:
        """A line already formatted (the combined format of request lines)."""
        if self._file is None:
            return
        try:
            self._file.write(line + "\n")
        except OSError as exc:  # a full disk must not take a worker down
            diag.error("access log %s: %s", self.target, exc)

    def write(self, kind: str, fields: dict[str, Any]) -> None:
        """One line: ``kind`` is ``conn`` or ``req``; callers check ``enabled`` first."""
        if self._file is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        if self.json:
            line = json.dumps({"time": stamp, "kind": kind, **fields}, separators=(",", ":"))
        else:
            line = f"{stamp} {kind} " + " ".join(
                f"{k}={_text_value(v)}" for k, v in fields.items()
            )
        self.write_line(line)
