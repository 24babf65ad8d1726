"""Issue 14, operations (items 1, 2, 3, 5): what a new user meets.

A reload (or a run) whose config cannot open its access log is refused with a problem line,
by the same code as ``check``, and the master goes on serving; ``check`` lists every problem
in one pass, files included; ``sniport reload`` waits for its verdict; the small things a
new user trips over (a broken pipe, ``--help``, ``check``'s output, ``run --listen``, the
unit's binary, unix-socket clients, a denied client of a terminated site).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
from support.backends import App, stopping
from support.clients import HttpConn, curl, get_body, split_curl_output
from support.configs import (
    PROXY_HOST,
    SITE_HOST,
    ops_config,
    proxy_route,
    proxy_site_config,
    route,
    short_unix_path,
    site_config,
    toml_lines,
)
from support.logs import json_log_file
from support.pki import Pki
from support.process import PYTHON, ROOT, Ops, SniportWith, report, run_cli
from support.waiting import wait_until

NO_TRACEBACK = re.compile(r"Traceback|File \"|Error:.*\n\s+at ")


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert not NO_TRACEBACK.search(text), text


# --------------------------------------------------------------------------------------------
# Item 1: a log that cannot be opened


def test_reload_whose_access_log_cannot_be_opened_keeps_serving(ops: Ops, pki: Pki,
                                                                tmp_path: Path) -> None:
    """Before: the master died with a traceback and every site went down."""
    cert = pki.cert(SITE_HOST)
    good_log = tmp_path / "access.log"
    base = ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                      body="v1", access_log=good_log)
    path = ops.write_config(base)
    master = ops.start(path)
    ctx = pki.client_context()
    assert get_body(ctx, port=master.port) == b"v1"
    sent = 1
    for bad, reason in ((tmp_path, "is a directory"),
                        (tmp_path / "not-a-dir" / "access.log", "is not a directory")):
        if bad != tmp_path:
            (tmp_path / "not-a-dir").write_text("a file where a directory should be")
        ops.write_config(base.replace(str(good_log), str(bad)).replace('"v1"', '"v2"'))
        verdict = master.reload(via_cli=True, ok=False)
        assert verdict is not None
        assert "server.access_log: " in verdict.stderr and reason in verdict.stderr, \
            verdict.stderr
        assert_no_traceback(verdict.stderr, master.log())
        assert master.proc.poll() is None, master.log()
        assert get_body(ctx, port=master.port) == b"v1"
        sent += 1
        # check says the same, in the same words.
        checked = run_cli("check", "-c", str(path))
        assert checked.returncode == 1
        assert reason in checked.stderr
    # A log in a directory that does not exist yet: created, and the reload goes through.
    fresh = tmp_path / "logs" / "sniport" / "access.log"
    ops.write_config(base.replace(str(good_log), str(fresh)).replace('"v1"', '"v3"'))
    checked = run_cli("check", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    assert f"will create the directory {fresh.parent}" in checked.stdout
    assert not fresh.parent.exists()  # check changes nothing
    master.reload(via_cli=True)
    assert get_body(ctx, port=master.port) == b"v3"
    sent += 1
    wait_until(lambda: any(r.get("kind") == "req" for r in json_log_file(fresh)), 5.0,
               f"a request line in {fresh}")
    report("test_reload_whose_access_log_cannot_be_opened_keeps_serving", sent)


def test_run_with_an_access_log_it_cannot_open_lists_the_problem(pki: Pki,
                                                                 tmp_path: Path) -> None:
    """Before: `sniport run` died with a traceback, and `check` said ok."""
    cert = pki.cert(SITE_HOST, directory=tmp_path / "certs")
    text = site_config("site", [SITE_HOST], cert, route("/", respond={"body": "x"}),
                       server=toml_lines(state_dir=tmp_path / "state", access_log=tmp_path))
    path = tmp_path / "sniport.toml"
    path.write_text(text)
    checked = run_cli("check", "-c", str(path))
    ran = run_cli("run", "-c", str(path))
    for r in (checked, ran):
        assert r.returncode == 1
        assert r.stderr.splitlines() == [
            f"error: {path}: server.access_log: {tmp_path} is a directory; access_log "
            "names a file", "1 problem(s); nothing was started"], r.stderr


def test_the_systemd_unit_makes_the_readme_log_directory() -> None:
    """The README's example logs to /var/log/sniport/access.log: the unit creates that
    directory (LogsDirectory=), and sniport would create it too."""
    unit = (ROOT / "contrib" / "systemd" / "sniport.service").read_text().splitlines()
    assert "LogsDirectory=sniport" in unit
    readme = (ROOT / "README.md").read_text()
    assert 'access_log = "/var/log/sniport/access.log"' in readme


# --------------------------------------------------------------------------------------------
# Item 2: every problem in one pass, files included


def test_check_lists_structural_and_file_problems_in_one_pass(pki: Pki,
                                                              tmp_path: Path) -> None:
    """Before: a missing certificate appeared only once the structural mistakes were fixed,
    and a certificate path that is a directory was a traceback."""
    cert, key = pki.cert("good.example", directory=tmp_path / "certs")
    missing = tmp_path / "missing.pem"
    text = f"""
[server]
listen = ["127.0.0.1:0"]
state_dir = "{tmp_path / 'state'}"
access_log = "{tmp_path}"
bogus = 1

[[site]]
name = "a"
hosts = ["a.example"]
tls = {{ cert = "{missing}", key = "{key}" }}
  [[site.route]]
  path = "/"
  respond = {{ body = "a" }}

[[site]]
name = "b"
hosts = ["b.example"]
tls = {{ cert = "{tmp_path}", key = "{key}" }}
colour = "blue"
  [[site.route]]
  path = "/"
  respond = {{ body = "b" }}

[[site]]
name = "c"
hosts = ["c.example"]
tls = {{ cert = "{cert}", key = "{key}" }}
  [[site.route]]
  path = "/"
  proxy = {{ upstreams = ["https://127.0.0.1:1"], ca = "{tmp_path / 'no-ca.pem'}" }}
"""
    path = tmp_path / "sniport.toml"
    path.write_text(text)
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 1
    assert_no_traceback(r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    expected = [
        ("server.bogus", "unknown key"),
        ("site[1](b).colour", "unknown key"),
        ("site[0](a).tls", f"cannot read {missing}: no such file"),
        ("site[1](b).tls", f"cannot read {tmp_path}: is a directory, not a PEM file"),
        ("site[2](c).route[0].proxy.ca", "cannot be set up"),
        ("server.access_log", f"{tmp_path} is a directory"),
    ]
    for where, reason in expected:
        assert any(e.startswith(f"error: {path}: {where}: ") and reason in e
                   for e in errors), (where, reason, r.stderr)
    assert len(errors) == len(expected), r.stderr
    assert r.stderr.splitlines()[-1] == f"{len(expected)} problem(s); nothing was started"


# --------------------------------------------------------------------------------------------
# Item 3: reload waits for its verdict


def test_reload_with_a_missing_config_file_says_so(tmp_path: Path) -> None:
    """Before: "no running sniport found" for a config file that does not exist."""
    missing = tmp_path / "missing.toml"
    for command in ("reload", "stop", "status", "check", "run"):
        r = run_cli(command, "-c", str(missing))
        assert r.returncode == 1, (command, r)
        assert r.stderr == f"error: config file {missing} does not exist\n", (command, r.stderr)


def test_reload_outcome_and_status(ops: Ops, pki: Pki, tmp_path: Path) -> None:
    """`sniport reload` exits 0 only once the new generation serves, 1 with the reason
    otherwise; `status` shows the last reload. Before: exit 0, "its log says how it went"."""
    cert = pki.cert(SITE_HOST)
    base = ops_config(state_dir=tmp_path / "state", listen=["127.0.0.1:0"], cert=cert,
                      body="v1")
    path = ops.write_config(base)
    master = ops.start(path)
    ctx = pki.client_context()
    before = run_cli("status", "-c", str(path))
    assert "last reload: none since start" in before.stdout
    ops.write_config(base.replace('"v1"', '"v2"'))
    ok = master.reload(via_cli=True)
    assert ok is not None and ok.stdout == "reloaded: generation 2 serving\n"
    # The verdict comes once the new generation serves: at once, the answer is new.
    assert get_body(ctx, port=master.port) == b"v2"
    status = run_cli("status", "-c", str(path)).stdout
    assert re.search(r"(?m)^last reload: \S+ \S+ \S+ ok: generation 2 serving$", status), status
    ops.write_config(base.replace("[server]", "[server]\nbogus = 1"))
    failed = master.reload(via_cli=True, ok=False)
    assert failed is not None
    assert failed.stderr.splitlines() == [
        f"error: {path}: server.bogus: unknown key",
        "error: reload failed: 1 problem(s) in the config; still serving generation 2"]
    status = run_cli("status", "-c", str(path)).stdout
    assert re.search(r"(?m)^last reload: .* FAILED: 1 problem\(s\) in the config; "
                     r"still serving generation 2$", status), status
    assert f"  {path}: server.bogus: unknown key" in status
    assert get_body(ctx, port=master.port) == b"v2"
    report("test_reload_outcome_and_status", 2)


# --------------------------------------------------------------------------------------------
# Item 5: the small things


def test_check_into_a_closed_pipe_is_quiet(pki: Pki, tmp_path: Path) -> None:
    """`sniport check | head -1`. Before: a BrokenPipeError traceback."""
    cert = pki.cert(SITE_HOST, directory=tmp_path / "certs")
    hosts = [f"h{i}.example" for i in range(2000)]  # more output than a pipe holds
    path = tmp_path / "sniport.toml"
    path.write_text(site_config("site", [SITE_HOST, *hosts], cert,
                                route("/", respond={"body": "x"}),
                                server=toml_lines(state_dir=tmp_path / "state")))
    r = subprocess.run(f"'{PYTHON}' -m sniport check -c '{path}' 2>'{tmp_path}/err' | head -1",
                       shell=True, capture_output=True, text=True, timeout=60)
    err = (tmp_path / "err").read_text()
    assert r.stdout.startswith("warning: ") or r.stdout.startswith(f"{path}: ok"), r.stdout
    assert err == "", err


def test_help_names_every_command() -> None:
    """Before: --help named 3 of 7 commands and showed reST backticks."""
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("run", "check", "routes", "reload", "stop", "status", "upgrade"):
        assert re.search(rf"(?m)^\s+{command}\s+\S", r.stdout), (command, r.stdout)
    assert "``" not in r.stdout
    for command in ("reload", "run"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "``" not in sub.stdout


def test_check_shows_http_listeners_and_what_non_tls_does(pki: Pki, tmp_path: Path) -> None:
    """Before: `check` left out http_listen and printed `-> reject` for non_tls = "close"."""
    cert = pki.cert(SITE_HOST, directory=tmp_path / "certs")
    path = tmp_path / "sniport.toml"
    path.write_text(site_config(
        "site", [SITE_HOST], cert, route("/", respond={"body": "x"}),
        server=toml_lines(state_dir=tmp_path / "state", http_listen=["127.0.0.1:0"])))
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index("http listeners (308 to https:// for site hosts, a passthrough block's "
                     "http_upstream for its hosts, 404 otherwise):")
    assert lines[at + 1].split() == ["127.0.0.1:0"]
    assert ["(not", "TLS)", "->", "close"] in [line.split() for line in lines]


def test_run_listen_moves_the_embedded_default(tmp_path: Path) -> None:
    """Before: the embedded default could not be moved off 8443 without a config."""
    tmp_path = Path(tempfile.mkdtemp(prefix="sniport-listen-"))  # reachable by nobody
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "PATH": "/usr/bin:/bin"}
    if shutil.which("setpriv") and os.geteuid() == 0:
        # As root the state directory would be /var/lib/sniport: run as nobody instead.
        for d in (tmp_path, empty):
            os.chown(d, 65534, 65534)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        prefix = []
    proc = subprocess.Popen([*prefix, PYTHON, "-m", "sniport", "run", "--listen",
                             "127.0.0.1:0"], cwd=empty, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            m = re.search(r"serving <embedded default> on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port and port != 8443
        r = curl("-sk", f"https://localhost:{port}/", "--resolve", f"localhost:{port}:127.0.0.1",
                 "-D", "-")
        head, body = split_curl_output(r.stdout)
        assert head.status == 200 and b"sniport" in body
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_readme_install_creates_the_binary_the_unit_runs() -> None:
    """Before: the unit ran /usr/local/bin/sniport, which the README never created, so
    `systemd-analyze verify` failed on a machine set up as the README says."""
    unit = (ROOT / "contrib" / "systemd" / "sniport.service").read_text()
    binary = re.search(r"(?m)^ExecStart=(\S+) run ", unit)
    assert binary
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Install as a service"):]
    block = section[section.index("```sh"):section.index("```", section.index("```sh") + 5)]
    venv = re.search(r"python3 -m venv (\S+) && \1/bin/pip install \.", block)
    assert venv, block
    assert f"ln -sf {venv.group(1)}/bin/sniport {binary.group(1)}" in block, block
    assert "cp contrib/systemd/sniport.service" in block


def test_unix_socket_clients_end_as_eof_and_send_no_empty_forwarded_for(
        sniport_with: SniportWith, pki: Pki, tmp_path: Path) -> None:
    """Before: a normal unix-socket client was logged as `error: Broken pipe`, and its
    upstream got empty X-Forwarded-For and X-Real-IP headers."""
    app = App("app")
    with stopping([app]):
        sock = short_unix_path(tmp_path / "in.sock")
        text = proxy_site_config(pki, tmp_path, proxy_route("/", [app.url], forwarded=True),
                                 server='log_format = "json"\n')
        text = text.replace('listen = ["127.0.0.1:0"]', f'listen = ["unix:{sock}"]')
        s = sniport_with(text)
        r = curl("-s", "--unix-socket", sock, "--cacert", str(pki.ca_file),
                 f"https://{PROXY_HOST}/hello")
        assert r.returncode == 0, r
        (rec,) = app.requests
        assert rec.get("X-Forwarded-For") == [] and rec.get("X-Real-IP") == [], rec.headers
        assert rec.get("Forwarded") == ["for=unknown;proto=https;host=\"" + PROXY_HOST + "\""]
        log = tmp_path / "access.log"
        wait_until(lambda: bool(json_log_file(log, "conn")), 5.0, "the connection line")
        lines = json_log_file(log, "conn")
        assert lines[0]["client"] == "unix" and lines[0]["end"] == "eof", lines
        assert "Broken pipe" not in s.log()


def test_denied_client_of_a_terminated_site_gets_403(sniport_with: SniportWith, pki: Pki,
                                                     tmp_path: Path) -> None:
    """Before: a TCP reset; now what nginx's `deny` gives: the handshake, then 403 (the
    site's error page) and a close, logged as denied."""
    cert = pki.cert(SITE_HOST, directory=tmp_path / "certs")
    www = tmp_path / "www"
    www.mkdir()
    (www / "403.html").write_text("<h1>go away</h1>\n")
    text = site_config("site", [SITE_HOST], cert, route("/", static={"root": str(www)}),
                       server=toml_lines(state_dir=tmp_path / "state", log_format="json"),
                       site='allow = ["127.0.0.2/32"]\nerror_pages = { 403 = "/403.html" }\n')
    s = sniport_with(text)
    ctx = pki.client_context()
    with HttpConn(_tls_from(ctx, s.port, "127.0.0.1")) as conn:
        conn.send(f"GET /403.html HTTP/1.1\r\nHost: {SITE_HOST}\r\n\r\n".encode())
        resp = conn.response()
        assert (resp.status, resp.body) == (403, b"<h1>go away</h1>\n")
        assert resp.header("Connection") == "close"
        assert conn.sock.recv(1) == b""  # then the close
    with HttpConn(_tls_from(ctx, s.port, "127.0.0.2")) as conn:
        conn.send(f"GET /403.html HTTP/1.1\r\nHost: {SITE_HOST}\r\n\r\n".encode())
        assert conn.response().status == 200
    wait_until(lambda: any(c.get("end") == "denied" and c["client"].startswith("127.0.0.1:")
                           for c in _json_lines(s.log())), 5.0, "a denied connection line")


def _tls_from(ctx: ssl.SSLContext, port: int, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname=SITE_HOST)


def _json_lines(text: str) -> list[dict[str, object]]:
    import json

    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize("command", ["routes", "status", "stop"])
def test_no_traceback_from_a_config_that_is_a_directory(tmp_path: Path, command: str) -> None:
    r = run_cli(command, "-c", str(tmp_path))
    assert r.returncode != 0
    assert_no_traceback(r.stderr, r.stdout)


def test_the_readme_example_config_is_valid_toml_and_a_valid_config() -> None:
    """The README's complete example is what a new user copies to /etc/sniport: it must
    parse and validate (its certificate files aside). Found while running it: its `tls`
    inline tables spanned two lines, which TOML 1.0 does not allow."""
    import tomllib

    from sniport.config import from_dict

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### A complete example")[1]
    text = section.split("```toml")[1].split("```")[0]
    loaded = from_dict(tomllib.loads(text), "README.md")
    assert [s.name for s in loaded.config.site] == ["blog", "app"]
    assert loaded.config.server.access_log == "/var/log/sniport/access.log"


def test_a_site_whose_every_route_is_wrong_still_gets_its_files_checked(tmp_path: Path) -> None:
    """Item 2 again, found by trying a config with many mistakes: a site whose only route
    was wrong was left out whole, so its missing certificate and its host claimed twice
    appeared only after the route was fixed."""
    missing = tmp_path / "missing.pem"
    path = tmp_path / "sniport.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:0"]
state_dir = "{tmp_path / 'state'}"

[[passthrough]]
name = "pt"
hosts = ["pt.test", "site.test"]
upstreams = ["127.0.0.1:1"]

[[site]]
name = "pt"
hosts = ["site.test"]
tls = {{ cert = "{missing}", key = "{missing}" }}
  [[site.route]]
  path = "nope"
  respond = {{ body = "x" }}
""")
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 1
    errors = [line.removeprefix(f"error: {path}: ") for line in r.stderr.splitlines()
              if line.startswith("error: ")]
    assert sorted(errors) == sorted([
        "site[0](pt).route[0].path: 'nope': a route path starts with /",
        "site[0](pt).name: name 'pt' is already used by passthrough[0](pt)",
        "site[0](pt).hosts[0]: host 'site.test' is already claimed by passthrough[0](pt).hosts[1]",
        f"site[0](pt).tls: cannot read {missing}: no such file; cannot read {missing}: "
        "no such file",
    ]), r.stderr
