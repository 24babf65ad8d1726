"""The embedded default: ``sniport run`` with no config file anywhere serves
https://localhost:8443/ with a self-signed certificate and the built-in welcome page.

The run happens in an empty directory with HOME and XDG_STATE_HOME pointing into it, so
that the certificate is generated there. As root, sniport's state directory is
/var/lib/sniport by design; to exercise the user's path the test runs sniport as the
unprivileged user ``nobody`` (setpriv) in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import curl, split_curl_output
from support.pki import pem_fingerprint
from support.process import PYTHON, Sniport

NOBODY = 65534


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="sniport-default-"))
    try:
        os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _port_8443_is_free() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", 8443))
    except OSError as exc:
        pytest.fail(f"127.0.0.1:8443 is taken on this machine ({exc}): the embedded default "
                    "listens there, so this test cannot run; free the port")
    finally:
        probe.close()


def test_embedded_default_serves_the_welcome_page(workdir: Path) -> None:
    assert not Path("/etc/sniport/sniport.toml").exists(), (
        "/etc/sniport/sniport.toml exists: sniport would use it instead of the default")
    _port_8443_is_free()
    cwd = workdir / "empty"
    home = workdir / "home"
    state = workdir / "state"
    for d in (cwd, home, state):
        d.mkdir()
        if os.geteuid() == 0:
            os.chown(d, NOBODY, NOBODY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_STATE_HOME": str(state), "LANG": "C.UTF-8"}
    prefix = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
              if os.geteuid() == 0 else [])
    proc = subprocess.Popen([*prefix, PYTHON, "-m", "sniport", "run"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s = Sniport(proc, Path("<embedded default>"))
    try:
        m = s.wait_log(r"serving (\S+ \S+) on ([^\n]+)")
        assert m.group(1) == "<embedded default>"
        assert m.group(2).strip() == "127.0.0.1:8443"
        assert list(cwd.iterdir()) == [], "sniport wrote into the working directory"

        r = curl("-k", "-D", "-", "https://localhost:8443/")
        assert r.returncode == 0, r.stderr
        head, body = split_curl_output(r.stdout)
        assert head.status == 200
        assert head.header("Content-Type") == "text/html; charset=utf-8"
        assert head.header("Server") == "sniport"
        page = body.decode()
        assert page.lstrip().lower().startswith("<!doctype html>")
        assert "sniport" in page.lower()
        assert "sniport.toml" in page  # how to configure it
        assert "[[site]]" in page and "[[passthrough]]" in page
        assert "sniport check" in page

        # The self-signed certificate is in XDG_STATE_HOME, covers localhost, and is the
        # one served: curl verifies against it.
        certs = sorted((state / "sniport" / "self-signed").glob("welcome-*.pem"))
        assert len(certs) == 1, list(state.rglob("*"))
        r = curl("--cacert", str(certs[0]), "-w", "\n%{ssl_verify_result}\n%{certs}",
                 "https://localhost:8443/some/path")
        assert r.returncode == 0, r.stderr
        text = r.stdout.decode()
        assert "\n0\n" in text
        assert pem_fingerprint(text) == pem_fingerprint(certs[0].read_text())

        # http:// typed on the same port: a 308 to the https page, not a closed connection.
        r = curl("-D", "-", "-o", "/dev/null", "http://localhost:8443/x?y=1")
        assert r.returncode == 0, r.stderr
        head, _ = split_curl_output(r.stdout)
        assert head.status == 308
        assert head.header("Location") == "https://localhost:8443/x?y=1"
    finally:
        with contextlib.suppress(Exception):
            s.stop()
    assert s.proc.returncode == 0, s.log()
