"""Binding the listening sockets the config names.

Job: turn ``[server].listen`` entries into listening, non-blocking sockets, or explain in one
line per entry why one cannot be bound.

Rules (DESIGN.md "Operations contract"):
- ``[::]`` is IPv6-only (IPV6_V6ONLY), so ``0.0.0.0`` and ``[::]`` can both be listed.
- A unix socket path that exists is probed: a socket nobody accepts on is stale and removed;
  a live one is an error naming the path; anything that is not a socket is never deleted.
- sniport removes its own socket file on exit only if the inode is still the one it bound.
- ``unix:@name`` is the Linux abstract namespace: no file at all.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass

from sniport.addresses import Address, TcpAddress, UnixAddress
from sniport.config import Listen

BACKLOG = 4096


class BindError(Exception):
    pass


@dataclass
class BoundListener:
    address: Address
    sock: socket.socket
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of a unix socket file we created

    @property
    def is_unix(self) -> bool:
        return isinstance(self.address, UnixAddress)

    def close(self) -> None:
        """Close the socket; remove its file only if it is still the one we bound."""
        self.sock.close()
        if isinstance(self.address, UnixAddress) and self.inode is not None:
            try:
                st = os.lstat(self.address.path)
            except OSError:
                return
            if (st.st_dev, st.st_ino) == self.inode:
                with contextlib.suppress(OSError):
                    os.unlink(self.address.path)


# Seconds the kernel holds a connection that sent nothing before accept() returns it anyway
# (TCP_DEFER_ACCEPT; Linux rounds it to SYN-ACK retransmissions, the first after 1 s). Kept
# short and known, because that wait is the client's too: the listener counts it into the
# client's client_hello_timeout (net/listener.py, arrival_time).
DEFER_ACCEPT = 1


def defers_accept(hello_timeout: float, silent_after: float) -> bool:
    """Whether TCP listeners defer accept: not when ``client_hello_timeout``, or the wait
    before a silent client goes to [default].silent (``silent_after``, 0: none), is shorter
    than twice the deferral, which would eat most of it."""
    return hello_timeout >= 2 * DEFER_ACCEPT and not 0 < silent_after < 2 * DEFER_ACCEPT


def tune_listener(sock: socket.socket, defer: bool) -> None:
    """Options set on a TCP listener (at bind, and again at each reload) and inherited by
    every accepted connection: TCP_NODELAY (relayed and TLS records are already whole: no
    Nagle delay), and, if ``defer`` (``defers_accept``), TCP_DEFER_ACCEPT, so that accept()
    returns when the client's first bytes (the ClientHello, or a request head) have arrived,
    not one poll cycle before them."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT if defer else 0)


def bind_one(entry: Listen) -> BoundListener:
    addr = entry.address
    if isinstance(addr, TcpAddress):
        return _bind_tcp(addr)
    return _bind_unix(addr, entry.mode, entry.owner)


def _bind_tcp(addr: TcpAddress) -> BoundListener:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = " (another process holds it)" if exc.errno == errno.EADDRINUSE else ""
        raise BindError(f"listen {addr}: {exc.strerror}{hint}") from None
    if addr.port == 0:  # the kernel chose: record the real port for logs and status
        addr = TcpAddress(addr.host, sock.getsockname()[1])
    return BoundListener(addr, sock)


def _bind_unix(addr: UnixAddress, mode: str | None, owner: str | None) -> BoundListener:
    if not addr.abstract:
        _clear_stale(addr.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode = None
    try:
        sock.bind(addr.sockaddr)
        if not addr.abstract:
            st = os.lstat(addr.path)
            inode = (st.st_dev, st.st_ino)
            if mode is not None:
                os.chmod(addr.path, int(mode, 8))
            if owner is not None:
                _chown(addr.path, owner)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except (OSError, KeyError) as exc:
        sock.close()
        if inode is not None:
            os.unlink(addr.path)
        reason = exc.strerror if isinstance(exc, OSError) else f"unknown user or group {exc}"
        raise BindError(f"listen {addr}: {reason}") from None
    return BoundListener(addr, sock, inode)


def _chown(path: str, owner: str) -> None:
    user, _, group = owner.partition(":")
    uid = pwd.getpwnam(user).pw_uid if user else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    os.chown(path, uid, gid)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"listen unix:{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"listen unix:{path}: the path exists and is not a socket; not deleting it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody accepts on it: a leftover of a process that is gone (crash, kill -9).
        os.unlink(path)
        return
    except OSError as exc:
        raise BindError(f"listen unix:{path}: cannot probe the existing socket: {exc}") from None
    finally:
        probe.close()
    raise BindError(f"listen unix:{path}: another process is serving here")
