"""Dropping root in a worker: ``[server] user`` and ``group``.

Rules: the master keeps its privileges (binding new listeners and reading keys on reload);
a worker drops them after loading what it needs and before it serves a connection. If the
drop fails, the worker refuses to serve rather than serve as root.
"""

from __future__ import annotations

import grp
import os
import pwd


class PrivilegeError(Exception):
    pass


def drop(user: str, group: str) -> None:
    """Become ``user`` (and ``group``, else the user's primary group); verify it took."""
    if not user and not group:
        return
    try:
        pw = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getgid())
    except KeyError as exc:
        raise PrivilegeError(f"unknown user or group: {exc}") from None
    uid = pw.pw_uid if pw else os.getuid()
    if os.geteuid() != 0:
        if os.geteuid() == uid and os.getegid() == gid:
            return  # already who we should be
        raise PrivilegeError(f"cannot become {user or uid}:{group or gid} without root")
    try:
        os.setgroups(os.getgrouplist(pw.pw_name, gid) if pw else [gid])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot drop to {user}:{group}: {exc.strerror}") from None
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise PrivilegeError("privileges were not dropped")
    try:
        os.setuid(0)
    except PermissionError:
        return  # root cannot be regained: the drop holds
    raise PrivilegeError("root could be regained after the drop")
