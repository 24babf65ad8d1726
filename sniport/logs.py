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
import re
import sys
import time
from pathlib import Path
from typing import IO, Any

diag = logging.getLogger("sniport")


class Throttle:
    """At most one diagnostic line a second per key: an event that repeats (EMFILE, a bug
    hit by every connection) is logged, with how often it happened, without flooding."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> str | None:
        """None to stay quiet; else a suffix for the line ("" or " (and N more)")."""
        now = time.monotonic()
        if now - self._last.get(key, -2.0) < 1.0:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        return f" (and {more} more in the last second)" if more else ""


throttle = Throttle()


def setup_diagnostics(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s sniport[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("sniport")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# A value is written bare only when it is made of these (addresses, names, numbers, reason
# codes); anything else, above all what came from the network (SNI, ALPN, Host), is quoted
# and escaped as a JSON string, so no byte of a client's can forge a field or a line.
_BARE = re.compile(r"[A-Za-z0-9._:/@,\[\]+*-]+\Z")


def text_field(value: Any) -> str:
    """A ``key=value`` field of a text log line (see ``_BARE``)."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if _BARE.match(text):
        return text
    return json.dumps(text)


_CLF_ESCAPES = {c: f"\\x{c:02X}" for c in [*range(0x20), *range(0x7F, 0x100)]}
_CLF_ESCAPES[ord('"')] = '\\"'
_CLF_ESCAPES[ord("\\")] = "\\\\"


def clf_quoted(value: str | None) -> str:
    """A field of the combined log format, quoted as nginx does: ``"`` and ``\\`` escaped with
    a backslash, control characters and bytes above 0x7E as ``\\xHH``; ``"-"`` when empty."""
    if not value:
        return '"-"'
    return '"' + value.translate(_CLF_ESCAPES) + '"'


class LogFileError(Exception):
    """The access log file cannot be opened: the message says why, for a problem line."""


def _missing_dirs(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist yet, outermost first."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing[::-1]


def check_access_log(target: str) -> str | None:
    """What ``open_access_log`` would do with ``target``, without changing anything:
    None if it would work, a note (starting "will create") if it creates a directory,
    raises LogFileError if it would fail. ``check`` calls this; run and reload open."""
    if target in ("stderr", "off"):
        return None
    path = Path(target)
    if path.is_dir():
        raise LogFileError(f"{target} is a directory; access_log names a file")
    if path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise LogFileError(f"cannot open {target}: {exc.strerror}") from None
        return None
    missing = _missing_dirs(path)
    existing = missing[0].parent if missing else path.parent
    if not existing.is_dir():
        raise LogFileError(f"cannot create {target}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LogFileError(f"cannot create {missing[0] if missing else target}: "
                           f"{existing} is not writable")
    if missing:
        return f"will create the directory {missing[-1]}"
    return None


def open_access_log(target: str, fmt: str) -> AccessLog:
    """The access log, opened: a missing directory above a log file is created (0755, as
    Caddy does; the systemd unit's LogsDirectory= makes /var/log/sniport for the README's
    example). Raises LogFileError with the reason, in the words of ``check_access_log``."""
    if target not in ("stderr", "off"):
        path = Path(target)
        check_access_log(target)
        for directory in _missing_dirs(path):
            try:
                directory.mkdir(mode=0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                raise LogFileError(f"cannot create {directory}: {exc.strerror}") from None
    try:
        return AccessLog(target, fmt)
    except OSError as exc:
        raise LogFileError(f"cannot open {target}: {exc.strerror}") from None


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
                f"{k}={text_field(v)}" for k, v in fields.items()
            )
        self.write_line(line)
