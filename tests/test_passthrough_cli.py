"""The command line: a bad config never starts (run lists what check lists), check on a good
config, routes, --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.process import run_cli
from support.waiting import TIMEOUT

import sniport
from sniport import compiled

GOOD = """
[server]
listen = ["127.0.0.1:0", "unix:{tmp}/in.sock"]

[[passthrough]]
name = "lan"
hosts = ["vpn.example.com"]
upstreams = ["127.0.0.1:9443"]

[[passthrough]]
name = "wild"
hosts = ["*.lan.example.com"]
upstreams = ["unix:{tmp}/up.sock"]

[[passthrough]]
name = "plain"
hosts = ["plain.example.net"]
upstreams = ["127.0.0.1:9080"]

[default]
to = "reject"
non_tls = "passthrough:plain"
"""

BAD = """
[server]
listen = ["127.0.0.1:99999"]
client_hello_timeout = "soon"
bogus = 1

[[passthrough]]
name = "lan"
hosts = ["vpn.example.com"]
upstreams = ["127.0.0.1:9443"]

[[passthrough]]
name = "twin"
hosts = ["VPN.Example.COM."]
upstreams = ["127.0.0.1:9444"]

[[passthrough]]
name = "broken"
hosts = ["a.*.example.com"]
upstreams = ["nowhere"]
proxy_protocol = "v3"
idle_timeout = "-1s"

[default]
to = "passthrough:missing"
"""

# (TOML path, a piece of the reason): every problem of BAD, each reported once.
BAD_PROBLEMS = [
    ("server.listen[0]", "port"),
    ("server.client_hello_timeout", "'soon' is not a duration"),
    ("server.bogus", "unknown key"),
    ("passthrough[1](twin).hosts[0]",
     "host 'vpn.example.com' is already claimed by passthrough[0](lan).hosts[0]"),
    ("passthrough[2](broken).hosts[0]", "wildcard is allowed only as the whole leftmost label"),
    ("passthrough[2](broken).upstreams[0]", "HOST:PORT"),
    ("passthrough[2](broken).proxy_protocol", "'off', 'v1' or 'v2'"),
    ("passthrough[2](broken).idle_timeout", "-1s"),
    ("default.to", "'passthrough:missing' names no block"),
]


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD.format(tmp=tmp_path))
    return path


def test_check_lists_every_problem(bad: Path) -> None:
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[-1] == f"{len(BAD_PROBLEMS)} problem(s); nothing was started"
    errors = lines[:-1]
    assert len(errors) == len(BAD_PROBLEMS), r.stderr
    for path, reason in BAD_PROBLEMS:
        matching = [e for e in errors if e.startswith(f"error: {bad}: {path}: ")]
        assert len(matching) == 1, (path, r.stderr)
        assert reason in matching[0], (reason, matching[0])


def test_run_with_a_bad_config_prints_the_same_list_and_never_starts(bad: Path) -> None:
    check = run_cli("check", "-c", str(bad))
    run = run_cli("run", "-c", str(bad))  # a run that started would time out here
    assert run.returncode != 0
    assert run.stderr == check.stderr
    assert "serving" not in run.stderr


def test_check_good_config_prints_listeners_and_routes(good: Path, tmp_path: Path) -> None:
    r = run_cli("check", "-c", str(good))
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines == [
        [f"{good}:", "ok"],
        ["listeners:"],
        ["127.0.0.1:0"],
        [f"unix:{tmp_path}/in.sock"],
        ["routes:"],
        ["plain.example.net", "->", "passthrough:plain"],
        ["vpn.example.com", "->", "passthrough:lan"],
        ["*.lan.example.com", "->", "passthrough:wild"],
        ["(no", "server", "name)", "->", "reject"],
        ["(any", "other", "name)", "->", "reject"],
        ["(not", "TLS)", "->", "passthrough:plain"],
    ]
    assert not (tmp_path / "in.sock").exists()  # check binds nothing


@pytest.mark.parametrize(("host", "label", "why"), [
    ("vpn.example.com", "passthrough:lan", "exact name vpn.example.com"),
    ("VPN.Example.COM.", "passthrough:lan", "exact name vpn.example.com"),
    ("a.lan.example.com", "passthrough:wild", "wildcard *.lan.example.com"),
    ("A.LAN.example.com.", "passthrough:wild", "wildcard *.lan.example.com"),
    ("a.b.lan.example.com", "reject", "no block claims 'a.b.lan.example.com': [default].to"),
    ("lan.example.com", "reject", "no block claims 'lan.example.com': [default].to"),
    ("", "reject", "no server name in the ClientHello: [default].to"),
])
def test_routes_names_the_block_and_why(good: Path, host: str, label: str, why: str) -> None:
    r = run_cli("routes", "-c", str(good), host)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    shown, _, rest = line.partition(" -> ")
    assert shown == (host or "(no server name)")
    decision, _, reason = rest.partition("  ")
    assert decision == label
    assert why in reason, line


def test_version() -> None:
    for argv in ([sys.executable, "-m", "sniport", "--version"],
                 [str(Path(sys.executable).parent / "sniport"), "--version"]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0
        assert r.stdout == f"sniport {sniport.__version__} ({compiled.describe()})\n"
    assert sniport.__version__ == "0.1.0"
