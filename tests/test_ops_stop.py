"""Stopping and starting again, with real processes: graceful stop then an immediate start
works every time (TCP and unix listeners), so does a start after ``kill -9`` of the master;
unix socket files: stale ones are removed, live ones and anything that is not a socket are
left alone and named in the error, and sniport removes only its own file at exit.

Each test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest
from support.backends import echo_backend, free_port
from support.clients import HttpsClient, Stream, get_body
from support.configs import SITE_HOST, ops_config, short_unix_path
from support.logs import json_log_file
from support.pki import Pki
from support.proc import alive, children, wait_gone
from support.process import Ops, report
from support.waiting import TIMEOUT


def inode(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


CYCLES = 20


def test_graceful_stop_then_start_twenty_times(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    sock = short_unix_path(tmp_path / "s.sock")
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"127.0.0.1:{port}", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST), workers=1, drain_timeout="5s"))
    ctx = pki.client_context()
    sent = 0
    pids = set()
    for cycle in range(CYCLES):
        master = ops.start(path)
        assert master.addresses == [f"127.0.0.1:{port}", f"unix:{sock}"]
        assert master.pid_file.read_text() == f"{master.pid}\n"
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        pids.add(master.pid)
        workers = ops.track_workers(master)
        assert get_body(ctx, port=port) == b"v1"
        assert get_body(ctx, unix=sock) == b"v1"
        client = HttpsClient(ctx, port=port)  # keep-alive, two requests, closed by the client
        assert [client.request().body, client.request().body] == [b"v1", b"v1"]
        client.close()
        sent += 4
        t0 = time.monotonic()
        if cycle % 2 == 0:
            code, cli = master.stop_cli()
            assert (cli.returncode, cli.stdout, cli.stderr) == (
                0, f"master {master.pid} stopped\n", "")
        else:
            master.signal(signal.SIGTERM)
            code = master.wait_exit()
        took = time.monotonic() - t0
        assert code == 0, master.log()
        assert took < 2.5, f"cycle {cycle}: nothing was open, yet the stop took {took:.1f}s"
        assert not os.path.lexists(sock), f"cycle {cycle}: {sock} left behind"
        assert not master.pid_file.exists()
        assert not master.status_file.exists()
        assert not any(alive(w) for w in workers)
        assert master.stderr.count(r"graceful stop: draining for up to 5s") == 1
        assert master.stderr.lines()[-1].endswith("INFO stopped"), master.log()
    assert len(pids) == CYCLES
    report("test_graceful_stop_then_start_twenty_times", sent)


@pytest.mark.parametrize("client", ["silent", "reads_eof"])
def test_graceful_stop_closes_idle_keepalive_connections_at_once(
        ops: Ops, pki: Pki, tmp_path: Path, client: str) -> None:
    """An idle keep-alive connection is closed at the start of the drain: the stop does not
    wait drain_timeout for a client that keeps its pooled connection open ("silent": never
    reads it; "reads_eof": reads the close but does not close its socket)."""
    access = tmp_path / "access.log"
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=pki.cert(SITE_HOST),
        drain_timeout="5s", access_log=access))
    master = ops.start(path)
    ctx = pki.client_context()
    idle = HttpsClient(ctx, port=master.port)
    assert idle.request().body == b"v1"
    assert idle.sock is not None
    t0 = time.monotonic()
    master.signal(signal.SIGTERM)
    if client == "reads_eof":
        idle.sock.settimeout(TIMEOUT)
        assert idle.sock.recv(1) == b""
        assert time.monotonic() - t0 < 1.0
    code = master.wait_exit(15.0)
    took = time.monotonic() - t0
    idle.close()
    report(f"test_graceful_stop_closes_idle_keepalive_connections_at_once[{client}]", 1)
    lines = json_log_file(access, "conn")
    assert code == 0
    assert [c["end"] for c in lines] == ["drain"]
    assert took < 2.0, (f"the stop took {took:.1f}s for one idle keep-alive connection "
                        f"(drain_timeout 5s); its line: {lines}")


def test_kill_9_of_the_master_then_start(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    sock = short_unix_path(tmp_path / "s.sock")
    backend = echo_backend(pki, ops)
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"127.0.0.1:{port}", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST), workers=2, drain_timeout="2s", backend_port=backend.port))
    ctx = pki.client_context()
    sent = 0
    for round_ in range(3):
        old = ops.start(path)
        workers = ops.track_workers(old)
        assert len(workers) == 2
        assert get_body(ctx, port=port) == b"v1"
        assert get_body(ctx, unix=sock) == b"v1"
        sent += 2
        # In the first round a passthrough stream is open when the master dies: its worker
        # keeps it for drain_timeout, without keeping the port or the socket file.
        stream = Stream(ctx, port) if round_ == 0 else None
        if stream is not None:
            assert stream.echo(b"before") == b"before"
            sent += 1
        # A second name for the socket file keeps its inode number from being reused.
        link = tmp_path / f"old-{round_}.sock"
        os.link(sock, link)
        old.signal(signal.SIGKILL)
        assert old.wait_exit() == -signal.SIGKILL
        assert stat.S_ISSOCK(os.lstat(sock).st_mode), "nobody removes the file after kill -9"
        new = ops.start(path)  # at once: the stale file is removed, the port binds
        assert new.pid_file.read_text() == f"{new.pid}\n"
        assert inode(sock) != inode(str(link))
        assert os.lstat(link).st_nlink == 1  # the stale name was removed
        assert get_body(ctx, port=port) == b"v1"
        assert get_body(ctx, unix=sock) == b"v1"
        sent += 2
        if stream is not None:
            assert stream.echo(b"orphaned") == b"orphaned"
            sent += 1
        # The old workers notice that their master is gone and exit on their own.
        took = wait_gone(workers, 5.0)
        assert took < 5.0
        old.wait_log(r"worker: the master is gone; draining and exiting")
        if stream is not None:
            stream.wait_closed(1.0)
            stream.close()
        assert sorted(new.workers()) == children(new.pid)
        new.signal(signal.SIGTERM)
        assert new.wait_exit() == 0
        assert not os.path.lexists(sock)
    report("test_kill_9_of_the_master_then_start", sent)


def test_live_unix_socket_makes_the_start_fail(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    sock = short_unix_path(tmp_path / "live.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sock)
    other.listen(8)
    ops.closers.append(other.close)
    before = inode(sock)
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=["127.0.0.1:0", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST)))
    master = ops.start(path, serving=False)
    assert master.wait_exit() == 1
    log = master.log()
    assert f"error: listen unix:{sock}: another process is serving here" in log.splitlines()
    assert "serving" not in log.replace("another process is serving here", "")
    assert inode(sock) == before
    # The other process still serves there.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(TIMEOUT)
        c.connect(sock)
        accepted, _ = other.accept()
        accepted.close()
    assert not master.pid_file.exists()
    report("test_live_unix_socket_makes_the_start_fail", 0)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_what_is_not_a_socket_is_never_deleted(ops: Ops, pki: Pki, tmp_path: Path,
                                               kind: str) -> None:
    sock = short_unix_path(tmp_path / "s.sock")
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    if kind == "file":
        Path(sock).write_text("precious\n")
    elif kind == "directory":
        os.mkdir(sock)
    else:
        os.symlink(target, sock)
    before = inode(sock)
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=["127.0.0.1:0", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST)))
    master = ops.start(path, serving=False)
    assert master.wait_exit() == 1
    assert (f"error: listen unix:{sock}: the path exists and is not a socket; not deleting it"
            in master.stderr.lines())
    assert inode(sock) == before
    assert target.read_text() == "precious\n"
    if kind == "file":
        assert Path(sock).read_text() == "precious\n"
    report(f"test_what_is_not_a_socket_is_never_deleted[{kind}]", 0)


def test_stale_socket_file_is_replaced_at_start(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    sock = short_unix_path(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(sock)
    leftover.close()  # the file stays, nobody accepts on it
    link = tmp_path / "old.sock"
    os.link(sock, link)  # keeps the inode number from being reused
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"unix:{sock}"], cert=pki.cert(SITE_HOST)))
    master = ops.start(path)
    assert master.addresses == [f"unix:{sock}"]
    assert inode(sock) != inode(str(link))
    assert os.lstat(link).st_nlink == 1
    assert get_body(pki.client_context(), unix=sock) == b"v1"
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert not os.path.lexists(sock)
    report("test_stale_socket_file_is_replaced_at_start", 1)


def test_a_file_that_replaced_our_socket_is_not_removed_at_exit(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    sock = short_unix_path(tmp_path / "s.sock")
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=["127.0.0.1:0", f"unix:{sock}"],
        cert=pki.cert(SITE_HOST)))
    master = ops.start(path)
    os.unlink(sock)
    Path(sock).write_text("someone else's\n")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert Path(sock).read_text() == "someone else's\n"
    report("test_a_file_that_replaced_our_socket_is_not_removed_at_exit", 0)


def test_abstract_unix_socket(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    name = f"sniport-ops-{uuid.uuid4().hex[:12]}"
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"unix:@{name}"], cert=pki.cert(SITE_HOST)))
    before = set(os.listdir(tmp_path))
    master = ops.start(path)
    assert master.addresses == [f"unix:@{name}"]
    assert get_body(pki.client_context(), unix="\0" + name) == b"v1"
    assert set(os.listdir(tmp_path)) - before == {"state"}  # no socket file anywhere
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    with pytest.raises(ConnectionRefusedError), \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect("\0" + name)
    report("test_abstract_unix_socket", 1)


def test_tcp_port_held_by_another_process_makes_the_start_fail(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    ops.closers.append(holder.close)
    port = holder.getsockname()[1]
    sock = short_unix_path(tmp_path / "s.sock")
    path = ops.write_config(ops_config(
        state_dir=tmp_path / "state", listen=[f"unix:{sock}", f"127.0.0.1:{port}"],
        cert=pki.cert(SITE_HOST)))
    master = ops.start(path, serving=False)
    assert master.wait_exit() == 1
    assert (f"error: listen 127.0.0.1:{port}: Address already in use (another process holds it)"
            in master.stderr.lines())
    assert not os.path.lexists(sock), "the unix socket bound before the failure is removed"
    report("test_tcp_port_held_by_another_process_makes_the_start_fail", 0)
