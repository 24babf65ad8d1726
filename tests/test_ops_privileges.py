"""Privileges with real processes (the tests run as root): ``user = "nobody"`` workers run as
nobody while the master stays root and re-reads root-only keys on reload; an unknown user
never leads to serving as root, and the log says why; log reopening works after the drop.

Each test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest
from support.backends import echo_backend
from support.clients import get_body, pt_who
from support.configs import PT_HOST, SITE_HOST, ops_config, route, site_block
from support.logs import json_log_file
from support.pki import Pki, pem_fingerprint
from support.proc import children, gids, status_field, uids
from support.process import Ops, report
from support.waiting import wait_until

NOBODY = pwd.getpwnam("nobody")


def root_only_cert(pki: Pki, tmp_path: Path) -> tuple[Path, Path]:
    """The site's certificate and key, readable by root only (mode 0600, owner root)."""
    chain, key = pki.cert(SITE_HOST)
    out = (tmp_path / "site.pem", tmp_path / "site.key")
    for src, dst in zip((chain, key), out, strict=True):
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
    return out


def assert_dropped(pid: int) -> None:
    assert uids(pid) == [NOBODY.pw_uid] * 4, (pid, uids(pid))
    assert gids(pid) == [NOBODY.pw_gid] * 4, (pid, gids(pid))
    assert status_field(pid, "Groups") == [str(NOBODY.pw_gid)]
    assert status_field(pid, "CapEff") == ["0000000000000000"]


def test_workers_run_as_nobody_master_stays_root(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    backend = echo_backend(pki, ops)
    cert = root_only_cert(pki, tmp_path)

    def cfg(body: str) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=body, workers=2, backend_port=backend.port,
                          server_extra='user = "nobody"')

    path = ops.write_config(cfg("v1"))
    master = ops.start(path)
    ctx = pki.client_context()
    workers = ops.track_workers(master)
    assert uids(master.pid) == [0, 0, 0, 0]
    assert len(workers) == 2
    for w in workers:
        assert_dropped(w)
    assert get_body(ctx, port=master.port) == b"v1"
    assert pt_who(ctx, master.port) == PT_HOST
    # A reload: the master (root) reads the root-only key again; new workers drop too.
    ops.write_config(cfg("v2"))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    new = master.wait_generation(2)
    ops.pids.update(new)
    assert not set(new) & set(workers)
    for w in new:
        assert_dropped(w)
    wait_until(lambda: get_body(ctx, port=master.port) == b"v2", 5.0, "v2")
    assert set(new) <= set(children(master.pid))
    report("test_workers_run_as_nobody_master_stays_root", 3)


def test_unknown_user_never_serves(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    path = ops.write_config(ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"],
                                       cert=pki.cert(SITE_HOST), workers=2,
                                       server_extra='user = "no-such-user-sniport"'))
    master = ops.start(path, serving=False)
    code = master.wait_exit(15.0)
    log = master.log()
    assert code == 1, log
    # The user is checked with the rest of the config: nothing is started at all.
    assert master.stderr.count(r"error: .*server\.user: no such user: 'no-such-user-sniport'") \
        == 1, log
    assert " serving " not in log
    assert not master.pid_file.exists()
    report("test_unknown_user_never_serves", 0)


def test_reload_to_an_unknown_user_keeps_the_old_workers(ops: Ops, pki: Pki,
                                                         tmp_path: Path) -> None:
    cert = root_only_cert(pki, tmp_path)

    def cfg(user: str, body: str) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=body, workers=2, server_extra=f'user = "{user}"')

    path = ops.write_config(cfg("nobody", "v1"))
    master = ops.start(path)
    ctx = pki.client_context()
    workers = ops.track_workers(master)
    ops.write_config(cfg("no-such-user-sniport", "v2"))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"ERROR reload failed \(1 problem\(s\)\); still serving the previous "
                    r"config", start=mark)
    # Refused with the rest of the config: no worker of a new generation ever started.
    assert master.stderr.count(r"ERROR reload: .*server\.user: no such user: "
                               r"'no-such-user-sniport'") == 1
    assert master.workers() == workers
    for w in workers:
        assert_dropped(w)
    for _ in range(5):
        assert get_body(ctx, port=master.port) == b"v1"
    report("test_reload_to_an_unknown_user_keeps_the_old_workers", 5)


def test_sigusr1_reopens_the_access_log_after_the_drop(ops: Ops, pki: Pki,
                                                       tmp_path: Path) -> None:
    """As logrotate does it on a server: /var/log/sniport is root's (0755), the workers run
    as nobody; after the move and SIGUSR1 the new file gets the workers' lines."""
    logs = Path(tempfile.mkdtemp(prefix="sniport-ops-logs-", dir="/tmp"))
    ops.closers.append(lambda: shutil.rmtree(logs))
    os.chmod(logs, 0o755)
    access, rotated = logs / "access.log", logs / "access.log.1"
    path = ops.write_config(ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"],
                                       cert=pki.cert(SITE_HOST), workers=1, access_log=access,
                                       server_extra='user = "nobody"'))
    master = ops.start(path)
    ctx = pki.client_context()
    assert get_body(ctx, port=master.port, path="/before") == b"v1"
    wait_until(lambda: len(json_log_file(access, "req")) == 1, 5.0, "the first request line")
    os.rename(access, rotated)
    mark = master.mark()
    master.signal(signal.SIGUSR1)
    master.wait_log(r"INFO log files reopened", start=mark)
    sent = 1
    for _ in range(3):
        assert get_body(ctx, port=master.port, path="/after") == b"v1"
        sent += 1
    report("test_sigusr1_reopens_the_access_log_after_the_drop", sent)
    try:
        wait_until(lambda: len(json_log_file(access, "req")) == 3, 3.0,
                   "3 request lines in the new access.log")
    except TimeoutError:
        pytest.fail(f"new access.log: {json_log_file(access, 'req')}; moved file: "
                    f"{[r['path'] for r in json_log_file(rotated, 'req')]}; log:\n"
                    f"{master.log()}")
    assert [r["path"] for r in json_log_file(rotated, "req")] == ["/before"]


def test_workers_as_nobody_answer_challenges_and_take_renewed_root_only_keys(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    """Workers that dropped to nobody still answer ACME challenges (they read the storage's
    challenges/, which is world-readable by design) and still take a renewed certificate
    whose key only root may read: the master reads it and hands it over in a memfd."""
    from support.clients import fetch, plain_conn, request_bytes
    from support.pki import insecure_client_context

    from sniport.certs.directory import DirectoryStorage
    from sniport.wire import acme

    # The state directory must be reachable by nobody, as /var/lib/sniport is (pytest's
    # tmp_path is root-only).
    state = Path(tempfile.mkdtemp(prefix="sniport-priv-"))
    os.chmod(state, 0o755)
    try:
        cert = root_only_cert(pki, tmp_path)
        extra = ("[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\n"
                 + site_block("auto", ["auto.priv.test"], "acme",
                              route("/", respond={"body": "auto"})))
        text = ops_config(state_dir=state, listen=["127.0.0.1:0"], cert=cert, workers=2,
                          server_extra='user = "nobody"\nhttp_listen = ["127.0.0.1:0"]\n',
                          extra=extra)
        master = ops.start(ops.write_config(text))
        for w in ops.track_workers(master):
            assert_dropped(w)
        storage = DirectoryStorage(str(state / "acme"))
        http01 = acme.Challenge("http-01", "auto.priv.test", "u", "tok-priv", "tok-priv.k")
        alpn = acme.Challenge("tls-alpn-01", "auto.priv.test", "u", "tok-priv2", "tok-priv2.k")
        storage.publish_challenge(http01)
        storage.publish_challenge(alpn)
        for _ in range(4):  # each worker, most likely
            with plain_conn(master.listen_port(1)) as c:
                c.send(request_bytes(acme.http01_path("tok-priv"), "auto.priv.test"))
                assert c.response().body == b"tok-priv.k"
            ctx = insecure_client_context()
            ctx.set_alpn_protocols([acme.ACME_TLS_ALPN])
            with socket.create_connection(("127.0.0.1", master.port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="auto.priv.test") as tls:
                assert tls.selected_alpn_protocol() == acme.ACME_TLS_ALPN
        # A renewed root-only pair: served by the nobody workers from the next handshake.
        new_chain, new_key = pki.cert(SITE_HOST, directory=tmp_path / "renewed")
        shutil.copyfile(new_key, cert[1])
        shutil.copyfile(new_chain, cert[0])
        want = pem_fingerprint(new_chain.read_bytes())

        def renewed() -> bool:
            return all(served_fingerprint(master.port) == want for _ in range(6))
        wait_until(renewed, 15.0, "the renewed certificate in every worker")
        assert fetch(master.port, SITE_HOST, pki.client_context(), "/").body == b"v1"
        assert "certificate update refused" not in master.log()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    report("test_workers_as_nobody_answer_challenges_and_take_renewed_root_only_keys", 2)


def served_fingerprint(port: int) -> str:
    from support.pki import der_fingerprint, insecure_client_context

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            insecure_client_context().wrap_socket(raw, server_hostname=SITE_HOST) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der_fingerprint(der)


def test_check_refuses_an_acme_storage_the_workers_cannot_reach(pki: Pki,
                                                                 tmp_path: Path) -> None:
    """pytest's tmp_path is root-only (0700): workers running as nobody could not read the
    challenge answers under it, so every challenge would fail. ``check`` says so."""
    from support.process import run_cli

    extra = ("[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\n"
             + site_block("auto", ["auto.priv.test"], "acme", route("/", respond={})))
    config = tmp_path / "sniport.toml"
    config.write_text(ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"],
                                 cert=pki.cert(SITE_HOST), server_extra='user = "nobody"',
                                 extra=extra))
    out = run_cli("check", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 1
    blocked = next(p for p in [*reversed(tmp_path.parents), tmp_path]
                   if not os.stat(p).st_mode & 0o001)
    assert (f"acme.storage: workers run as 'nobody' and cannot reach {tmp_path}/state/acme/"
            f"challenges ({blocked} is not searchable by them)") in out.stderr, out.stderr
