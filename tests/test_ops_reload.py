"""Reloads (SIGHUP, ``sniport reload``) with real processes: under load nothing fails,
passthrough streams move to the new workers (or, if their block changed, last until
drain_timeout), a broken config changes nothing and ``sniport reload`` says so,
signals during a reload are queued, listeners come and go, certificates are re-read.

Each test prints how many requests it sent ("[ops] name: N requests").
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from support.backends import echo_backend, free_port
from support.clients import (
    HeldHandshake,
    Load,
    PeerClosed,
    Stream,
    connect_tls,
    get_body,
    running_load,
    wait_requests,
)
from support.configs import PT_HOST, SITE_HOST, ops_config, short_unix_path
from support.logs import json_log_file
from support.pki import Pki
from support.proc import children, wait_gone
from support.process import Ops, report, run_cli
from support.waiting import TIMEOUT, wait_until


def wait_body(pki: Pki, port: int, want: str, previous: str, timeout: float = 5.0,
              failures: list[str] | None = None) -> int:
    """New connections until the answer is ``want``; an answer from the generation that is
    being replaced (``previous``) is allowed while its workers take their SIGTERM. Returns
    the number of requests sent. With ``failures``, a request that fails is recorded there
    (and the next one tried) instead of raising."""
    ctx = pki.client_context()
    deadline = time.monotonic() + timeout
    sent = 0
    while True:
        sent += 1
        try:
            body = get_body(ctx, port=port).decode()
        except (PeerClosed, OSError) as exc:
            if failures is None:
                raise
            failures.append(f"content check: {type(exc).__name__}: {exc}")
            assert time.monotonic() < deadline, f"no {want!r} after {timeout:g}s"
            continue
        if body == want:
            return sent
        assert body == previous, f"answer {body!r}: neither {want!r} nor {previous!r}"
        assert time.monotonic() < deadline, f"still {previous!r} after {timeout:g}s"
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------


RELOADS = 20
BETWEEN = 20  # answers of each kind of request of the load between two reloads


def test_twenty_reloads_under_load_fail_no_request(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    backend = echo_backend(pki, ops)
    cert = pki.cert(SITE_HOST)
    access = tmp_path / "access.log"

    def cfg(n: int) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=f"v{n}", workers=2, drain_timeout="2s", access_log=access,
                          backend_port=backend.port)

    path = ops.write_config(cfg(0))
    master = ops.start(path)
    ctx = pki.client_context()
    latest = [0]

    def valid(body: bytes) -> bool:
        m = re.fullmatch(rb"v(\d+)", body)
        return m is not None and int(m.group(1)) <= latest[0]

    load = Load(ctx, master.port, backend_name=PT_HOST, valid_body=valid)
    checks = 0
    check_failures: list[str] = []
    reload_seconds = []
    with running_load(load):
        wait_requests(load, 10, TIMEOUT)
        for n in range(1, RELOADS + 1):
            ops.write_config(cfg(n))
            latest[0] = n
            mark = master.mark()
            t0 = time.monotonic()
            master.reload(via_cli=n % 2 == 0)
            master.wait_log(rf"reloaded \S+ \(generation {n + 1}\)", start=mark)
            reload_seconds.append(time.monotonic() - t0)
            checks += wait_body(pki, master.port, f"v{n}", f"v{n - 1}",
                                failures=check_failures)
            wait_requests(load, BETWEEN, 20.0)
    stats = load.stats
    # Every request written to a socket: answered, failed, retried, and the content checks.
    sent = stats.total + len(stats.failures) + stats.stale_retries + checks
    stats.failures.extend(check_failures)
    report("test_twenty_reloads_under_load_fail_no_request", sent)
    print(f"[ops]   by kind {dict(stats.requests)}, connections {dict(stats.connections)}, "
          f"keep-alive retries after a drain closed an idle connection {stats.stale_retries}, "
          f"content checks {checks}, failures {len(stats.failures)}, "
          f"answers {dict(stats.versions)}, "
          f"reload time max {max(reload_seconds):.3f}s")
    master.signal(signal.SIGTERM)
    assert master.wait_exit(TIMEOUT) == 0
    conns = json_log_file(access, "conn")
    # A failed request names its client address: sniport's line for that connection says
    # how sniport ended it.
    failed = [f + "".join(f"\n    sniport ended {c['client']} ({c['sni']}): end={c['end']} "
                          f"up={c['up']} down={c['down']} duration={c['duration']}"
                          for c in conns if f"client {c['client']}," in f)
              for f in stats.failures]
    assert stats.failures == [], "\n".join(failed[:10])
    assert stats.total >= RELOADS * BETWEEN * len(set(Load.KINDS))
    for kind in ("keepalive", "close", "who", "echo"):
        assert stats.requests[kind] > 0, kind
    log = master.log()
    assert "reload failed" not in log
    assert " died " not in log
    assert "Traceback" not in log
    assert master.stderr.count(r"reloaded .* \(generation \d+\)") == RELOADS
    # Every answered request of the terminated site has its access-log line, and every
    # passthrough connection its connection line: none was lost in a drain.
    requests = json_log_file(access, "req")
    assert len(requests) == (stats.requests["keepalive"] + stats.requests["close"] + checks
                             - len(check_failures))
    assert {r["status"] for r in requests} == {200}
    pt = [c for c in conns if c["sni"] == PT_HOST]
    assert len(pt) == stats.connections["who"] + stats.connections["echo"]


def test_passthrough_streams_survive_reloads_that_route_them_the_same_way(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    """Issue 14 item 4. A reload that changes only the terminated site (as a certificate
    renewal does) hands the passthrough streams to the new workers: they outlive any number
    of reloads and drain_timeout, and no old worker lingers for them. Before the fix every
    stream was cut at drain_timeout (2 s here)."""
    backend = echo_backend(pki, ops)
    cert = pki.cert(SITE_HOST)
    access = tmp_path / "access.log"

    def cfg(n: int) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=f"v{n}", workers=2, drain_timeout="2s", access_log=access,
                          backend_port=backend.port)

    master = ops.start(ops.write_config(cfg(1)))
    ctx = pki.client_context()
    ops.track_workers(master)
    streams = [Stream(ctx, master.port) for _ in range(4)]
    sent = 0
    for i, stream in enumerate(streams):
        assert stream.echo(f"before any reload {i}".encode()) == f"before any reload {i}".encode()
        sent += 1
    first_reload = time.monotonic()
    old_workers: list[int] = []
    for n in range(2, 7):
        old_workers += master.workers()
        ops.write_config(cfg(n))
        master.reload(via_cli=n % 2 == 0)
        master.wait_generation(n)
        for i, stream in enumerate(streams):
            data = f"after reload {n - 1} on {i}".encode() * 100
            assert stream.echo(data) == data
            sent += 1
        sent += wait_body(pki, master.port, f"v{n}", f"v{n - 1}")
    # Every old worker is gone well before drain_timeout: nothing of theirs had to finish.
    wait_gone(old_workers, 1.5)
    assert not master.status()["draining_workers"]
    while time.monotonic() - first_reload < 3.0:  # past drain_timeout of the first reload
        time.sleep(0.1)
    for i, stream in enumerate(streams):
        assert stream.echo(f"late {i}".encode()) == f"late {i}".encode()
        sent += 1
    assert "still open after" not in master.log()
    for stream in streams:
        stream.close()
    report("test_passthrough_streams_survive_reloads_that_route_them_the_same_way", sent)

    def lines() -> list[dict[str, Any]]:
        ports = {f"127.0.0.1:{stream.local_port}" for stream in streams}
        return [c for c in json_log_file(access, "conn") if c["client"] in ports]

    # One line per stream, written where it ended, with its whole life and every byte.
    wait_until(lambda: len(lines()) == len(streams), 5.0, "the streams' connection lines")
    ports = [f"127.0.0.1:{stream.local_port}" for stream in streams]
    for line in lines():
        i = ports.index(line["client"])
        echoed = len(f"before any reload {i}late {i}") + sum(
            len(f"after reload {n - 1} on {i}") * 100 for n in range(2, 7))
        assert (line["sni"], line["upstream"], line["end"]) == (
            PT_HOST, f"127.0.0.1:{backend.port}", "eof"), line
        assert line["duration"] >= 3.0, line
        assert line["up"] >= echoed and line["down"] >= echoed, (echoed, line)


def test_passthrough_stream_whose_block_changed_is_cut_at_drain_timeout(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    """A reload that sends the stream's name to another upstream cannot keep it where it
    goes: it stays in the old worker, which closes it at drain_timeout."""
    backend = echo_backend(pki, ops)
    other = echo_backend(pki, ops)
    cert = pki.cert(SITE_HOST)
    access = tmp_path / "access.log"

    def cfg(port: int) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          workers=1, drain_timeout="2s", access_log=access, backend_port=port)

    master = ops.start(ops.write_config(cfg(backend.port)))
    ctx = pki.client_context()
    first_workers = ops.track_workers(master)
    stream = Stream(ctx, master.port)
    assert stream.echo(b"before the reload") == b"before the reload"
    ops.write_config(cfg(other.port))
    master.reload(via_cli=True)
    reloaded = time.monotonic()
    assert stream.echo(b"still the old upstream") == b"still the old upstream"
    try:
        stream.wait_closed(TIMEOUT)
    except TimeoutError:
        pytest.fail(f"the stream outlived drain_timeout by far; log:\n{master.log()}")
    lived = time.monotonic() - reloaded
    assert 1.8 <= lived <= 3.5, lived
    stream.close()
    master.wait_log(r"drain: 1 connection\(s\) still open after 2s; closing them")
    wait_gone(first_workers, 5.0)
    # A new stream goes through the current generation, to the new upstream.
    fresh = Stream(ctx, master.port)
    assert fresh.echo(b"fresh") == b"fresh"
    fresh.close()
    report("test_passthrough_stream_whose_block_changed_is_cut_at_drain_timeout", 3)

    def stream_line() -> list[dict[str, Any]]:
        return [c for c in json_log_file(access, "conn")
                if c["client"] == f"127.0.0.1:{stream.local_port}"]

    wait_until(lambda: len(stream_line()) == 1, 5.0, "the stream's connection line")
    line = stream_line()[0]
    assert (line["sni"], line["upstream"], line["end"]) == (
        PT_HOST, f"127.0.0.1:{backend.port}", "shutdown")
    assert 1.8 <= line["duration"] <= 4.0, line


@pytest.mark.parametrize("phase", ["handshake_done", "handshake_under_way", "hello_partial"])
def test_connection_accepted_before_a_reload_gets_its_first_request_answered(
        ops: Ops, pki: Pki, tmp_path: Path, phase: str) -> None:
    """A client that connected just before a reload and sends its first request just after
    must get an answer (then Connection: close): that connection is not an idle keep-alive
    one. The load above hits this window by chance; this test hits it every time, with the
    TLS handshake complete before the reload, still under way when the drain begins (the
    client's Finished held back), or the ClientHello not all there yet (10 bytes sent)."""
    cert = pki.cert(SITE_HOST)
    access = tmp_path / "access.log"

    def cfg(n: int) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=f"v{n}", workers=1, drain_timeout="2s", access_log=access)

    master = ops.start(ops.write_config(cfg(1)))
    ctx = pki.client_context()
    head = f"GET / HTTP/1.1\r\nHost: {SITE_HOST}\r\n\r\n".encode()
    clients = [HeldHandshake(ctx, master.port) for _ in range(3)]
    for c in clients:
        if phase == "handshake_done":
            c.start()
            c.raw.sendall(c.held)  # the handshake completes; no request yet
            c.held = b""
        elif phase == "handshake_under_way":
            c.start()  # the server waits for the client's Finished
        else:
            c.start(partial_hello=True)  # the server waits for the rest of the hello
    ops.write_config(cfg(2))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    time.sleep(0.1)  # the old worker has begun its drain
    for c in clients:
        if phase == "hello_partial":
            c.finish_hello()
        c.send(head)
    outcomes = []
    for c in clients:
        try:
            answer, closed = c.response()
        except OSError as exc:
            answer, closed = f"{type(exc).__name__}: {exc}".encode(), False
        c.close()
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
        close = b"\r\nconnection: close\r\n" in answer.lower()
        body = answer.rsplit(b"\r\n\r\n", 1)[-1].decode(errors="replace")
        outcomes.append(f"{status!r} connection_close={close} body={body!r} "
                        f"then closed by sniport={closed}")
    master.signal(signal.SIGTERM)
    master.wait_exit(TIMEOUT)
    ends = {c["client"]: f"end={c['end']} up={c['up']} down={c['down']} "
            f"duration={c['duration']}" for c in json_log_file(access, "conn")}
    report(f"test_connection_accepted_before_a_reload_gets_its_first_request_answered[{phase}]",
           len(clients))
    assert outcomes == ["'HTTP/1.1 200 OK' connection_close=True body='v1' "
                        "then closed by sniport=True"] * 3, (
        outcomes, [ends.get(c.local) for c in clients])


# --------------------------------------------------------------------------------------------
# Broken reloads


def broken_config(case: str, base: str, tmp_path: Path, held_port: int) -> tuple[str, list[str]]:
    """The broken config text and the log lines (regexes) the reload must write."""
    missing = tmp_path / "missing-cert.pem"
    if case == "bad_toml":
        return base.replace("[[site]]", "[[site]\n"), [
            r"reload: \S+sniport\.toml: TOML syntax: .*line \d+",
            r"reload failed \(1 problem\(s\)\); still serving the previous config"]
    if case == "unknown_key":
        return base.replace("[server]", "[server]\nbogus_key = 1"), [
            r"reload: \S+sniport\.toml: server\.bogus_key: unknown key",
            r"reload failed \(1 problem\(s\)\); still serving the previous config"]
    if case == "missing_cert":
        cert_line = next(line for line in base.splitlines() if line.startswith("tls = "))
        key = re.search(r'key = "([^"]+)"', cert_line)
        assert key
        return base.replace(cert_line, f'tls = {{ cert = "{missing}", key = "{key.group(1)}" }}'
                            ), [
            rf"reload: \S+sniport\.toml: site\[0\]\(site\)\.tls: .*{re.escape(str(missing))}",
            r"reload failed \(1 problem\(s\)\); still serving the previous config"]
    if case == "port_held":
        return base.replace('listen = ["127.0.0.1:0"]',
                            f'listen = ["127.0.0.1:0", "127.0.0.1:{held_port}"]'), [
            rf"reload failed: listen 127\.0\.0\.1:{held_port}: Address already in use "
            r"\(another process holds it\); still serving the previous config"]
    assert case == "several"
    text = base.replace("[server]", "[server]\nbogus_key = 1").replace(
        'drain_timeout = "2s"', 'drain_timeout = "soon"').replace(
        'name = "site"', 'name = "site"\ncolour = "blue"')
    return text, [
        r"reload: \S+sniport\.toml: server\.bogus_key: unknown key",
        r"reload: \S+sniport\.toml: server\.drain_timeout: 'soon' is not a duration",
        r"reload: \S+sniport\.toml: site\[0\](\(site\))?\.colour: unknown key",
        r"reload failed \(3 problem\(s\)\); still serving the previous config"]


@pytest.mark.parametrize("case", ["bad_toml", "unknown_key", "missing_cert", "port_held",
                                  "several"])
def test_broken_reload_changes_nothing(ops: Ops, pki: Pki, tmp_path: Path, case: str) -> None:
    cert = pki.cert(SITE_HOST)
    base = ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                      body="v1", workers=2)
    path = ops.write_config(base)
    master = ops.start(path)
    ctx = pki.client_context()
    workers = ops.track_workers(master)
    before = master.status()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    ops.closers.append(holder.close)
    text, expected = broken_config(case, base, tmp_path, holder.getsockname()[1])
    ops.write_config(text)
    mark = master.mark()
    verdict = master.reload(via_cli=True, ok=False)  # waits for the outcome, exits 1
    assert verdict is not None
    end, _ = master.stderr.wait(r"reload failed", start=mark)
    log = master.stderr.lines()[mark:end + 1]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in log), (pattern, log)
    told = verdict.stderr.splitlines()
    assert told[-1].endswith("still serving generation 1"), told
    if case not in ("port_held",):
        # The same code as `check`: the same problems, in the log and from `reload`.
        checked = run_cli("check", "-c", str(path))
        assert checked.returncode == 1
        problems = [line.removeprefix("error: ") for line in checked.stderr.splitlines()
                    if line.startswith("error: ")]
        logged = [line.split(" ERROR reload: ", 1)[1] for line in log
                  if " ERROR reload: " in line]
        assert problems == logged
        assert [line.removeprefix("error: ") for line in told[:-1]] == problems
    else:
        assert "Address already in use" in told[-1]
    status = run_cli("status", "-c", str(path))
    assert "last reload:" in status.stdout and " FAILED: " in status.stdout, status.stdout
    # Nothing changed: same workers, same generation, same answers, no new process.
    sent = 0
    for _ in range(5):
        assert get_body(ctx, port=master.port) == b"v1"
        sent += 1
    assert master.workers() == workers
    assert children(master.pid) == sorted(workers)
    after = master.status()
    assert (after["generation"], after["loaded_at"], after["listeners"]) == (
        before["generation"], before["loaded_at"], before["listeners"])
    assert "reloaded" not in master.log()
    # Fixed, it reloads.
    ops.write_config(base.replace('body = "v1"', 'body = "v2"'))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    sent += wait_body(pki, master.port, "v2", "v1")
    report(f"test_broken_reload_changes_nothing[{case}]", sent)


def test_sighup_during_a_reload_is_queued(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    cert = pki.cert(SITE_HOST)

    def cfg(n: int) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                          body=f"v{n}", workers=2)

    master = ops.start(ops.write_config(cfg(1)))
    sent = 0
    # Second SIGHUP sent as soon as the first reload is under way.
    ops.write_config(cfg(2))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloading ", start=mark)
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    master.wait_log(r"reloaded \S+ \(generation 3\)", start=mark)
    # Two signals 5 ms apart: the second arrives while the first is being handled.
    ops.write_config(cfg(3))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    time.sleep(0.005)
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 4\)", start=mark)
    master.wait_log(r"reloaded \S+ \(generation 5\)", start=mark)
    sent += wait_body(pki, master.port, "v3", "v2")
    assert len(master.wait_generation(5)) == 2
    report("test_sighup_during_a_reload_is_queued", sent)


def test_reload_binds_new_listeners_and_closes_removed_ones(
        ops: Ops, pki: Pki, tmp_path: Path) -> None:
    cert = pki.cert(SITE_HOST)
    port_a, port_b = free_port(), free_port()
    sock = short_unix_path(tmp_path / "added.sock")

    def cfg(listen: list[str], body: str) -> str:
        return ops_config(state_dir=tmp_path / "state", listen=listen, cert=cert, body=body,
                          workers=1, drain_timeout="2s")

    master = ops.start(ops.write_config(cfg([f"127.0.0.1:{port_a}"], "v1")))
    ctx = pki.client_context()
    sent = 0
    ops.write_config(cfg([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}", f"unix:{sock}"], "v2"))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    assert get_body(ctx, port=port_b) == b"v2"
    assert get_body(ctx, unix=sock) == b"v2"
    sent += 2 + wait_body(pki, port_a, "v2", "v1")
    assert master.status()["listeners"] == [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}",
                                            f"unix:{sock}"]
    ops.write_config(cfg([f"127.0.0.1:{port_a}"], "v3"))
    mark = master.mark()
    master.signal(signal.SIGHUP)
    master.wait_log(r"reloaded \S+ \(generation 3\)", start=mark)
    sent += wait_body(pki, port_a, "v3", "v2")
    master.wait_log(rf"listener 127\.0\.0\.1:{port_b} closed \(no longer in the config\)",
                    start=mark)
    master.wait_log(rf"listener unix:{re.escape(sock)} closed \(no longer in the config\)",
                    start=mark)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_b), timeout=TIMEOUT).close()
    # The log line comes just before the close that removes the file.
    wait_until(lambda: not Path(sock).exists(), TIMEOUT, "the socket file removed")
    assert master.status()["listeners"] == [f"127.0.0.1:{port_a}"]
    report("test_reload_binds_new_listeners_and_closes_removed_ones", sent)


def test_reload_rereads_certificate_files(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    chain, key = tmp_path / "site.pem", tmp_path / "site.key"

    def issue() -> bytes:
        leaf = pki.ca.issue_cert(SITE_HOST)
        chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return leaf.cert_chain_pems[0].bytes()

    first = issue()
    path = ops.write_config(ops_config(state_dir=tmp_path / "state",
                                       listen=["127.0.0.1:0"], cert=(chain, key)))
    master = ops.start(path)
    ctx = pki.client_context()
    handshakes = [0]

    def served_pem() -> bytes:
        with connect_tls(ctx, SITE_HOST, port=master.port) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        handshakes[0] += 1
        return ssl.DER_cert_to_PEM_cert(der).encode()

    def same(a: bytes, b: bytes) -> bool:
        return a.replace(b"\r", b"").strip() == b.replace(b"\r", b"").strip()

    assert same(served_pem(), first)
    second = issue()  # a renewal hook: new files in place, then `sniport reload`
    mark = master.mark()
    master.reload(via_cli=True)
    master.wait_log(r"reloaded \S+ \(generation 2\)", start=mark)
    wait_until(lambda: same(served_pem(), second), 5.0, "the renewed certificate")
    assert not same(first, second)
    report("test_reload_rereads_certificate_files", handshakes[0])
