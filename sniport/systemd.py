"""systemd integration without libsystemd: readiness notification and socket activation.

Rules (sd_notify(3), sd_listen_fds(3)):
- Notifications are datagrams to $NOTIFY_SOCKET (a path, or @name in the abstract
  namespace); with no such variable they are silently not sent.
- Activated sockets start at fd 3; they are ours only if $LISTEN_PID is our pid; names
  come from $LISTEN_FDNAMES. The variables are removed once read, so children do not
  take the sockets for their own.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send ``message`` (e.g. "READY=1") to the service manager; False if there is none."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address: str | bytes = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def activated_sockets() -> list[tuple[socket.socket, str]]:
    """The sockets systemd passed us, with their names ("" if unnamed)."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        out.append((sock, names[i] if i < len(names) else ""))
    return out
