"""Issue 10 item 1: ``[acme]`` and ``tls = "acme"`` in the config, and what ``check`` says
about them: which names, which challenges, where stored; and what cannot work, refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.process import run_cli
from test_config import only

from sniport.config import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, loads

SITE = ('[[site]]\nname = "blog"\nhosts = ["example.com", "www.example.com"]\ntls = "acme"\n'
        '[[site.route]]\npath = "/"\nrespond = { body = "hi" }\n')


def test_defaults_and_the_staging_shortcut() -> None:
    acme = loads(SITE, "x").config.acme
    assert acme.directory == LETS_ENCRYPT
    assert acme.challenges == ["tls-alpn-01", "http-01"]
    assert acme.renew_before is None and acme.storage == "{state_dir}/acme"
    staging = loads('[acme]\ndirectory = "staging"\nrenew_before = "10d"\n'.replace(
        '"10d"', '"240h"') + SITE, "x").config.acme
    assert staging.directory == LETS_ENCRYPT_STAGING and staging.renew_before == 240 * 3600


@pytest.mark.parametrize(("text", "path", "reason"), [
    ('[acme]\ndirectory = "http://ca.test/dir"\n', "acme.directory", "is an https:// URL"),
    ('[acme]\nemail = "not-an-address"\n', "acme.email", "is not an email address"),
    ('[acme]\nchallenges = ["dns-01"]\n', "acme.challenges", "not supported yet"),
    ('[acme]\nchallenges = ["http-01", "http-01"]\n', "acme.challenges", "listed twice"),
    ('[acme]\nchallenges = []\n', "acme.challenges", "at least 1"),
    ('[acme]\nchallenges = ["tls-sni-01"]\n', "acme.challenges", "expected"),
    ('[acme]\nstorage = "redis://127.0.0.1:99999/0"\n', "acme.storage", "Port out of range"),
    ('[acme]\nstorage = "s3://bucket/acme"\n', "acme.storage", "redis://"),
    ('[acme]\nrenew_before = "soon"\n', "acme.renew_before", "duration"),
    ('[acme]\nsecret = 1\n', "acme.secret", "unknown key"),
    # http-01 needs port 80; a wildcard needs dns-01.
    ('[acme]\nchallenges = ["http-01"]\n', "acme.challenges", "server.http_listen is empty"),
    ('[server]\nlisten = ["127.0.0.1:1"]\n' + SITE.replace('"www.example.com"',
                                                           '"*.example.com"'),
     "site[0](blog).hosts[1]", "wildcard certificate needs the dns-01 challenge"),
])
def test_what_cannot_work_is_refused_naming_its_key(text: str, path: str, reason: str) -> None:
    body = text if "[[site]]" in text else text + SITE
    got_path, why = only(body)
    assert (got_path, reason in why) == (path, True), why


@pytest.mark.parametrize(("value", "reason"), [
    ('"https://10.0.0.2:80"', "plain HTTP"),
    ('"10.0.0.2:99999"', "port"),
])
def test_bad_http_upstream(value: str, reason: str) -> None:
    text = ('[server]\nhttp_listen = ["127.0.0.1:80"]\n[[passthrough]]\nname = "p"\n'
            f'hosts = ["p.test"]\nupstreams = ["127.0.0.1:1"]\nhttp_upstream = {value}\n')
    path, why = only(text)
    assert path == "passthrough[0](p).http_upstream" and reason in why


def test_http_upstream_needs_http_listen() -> None:
    text = ('[[passthrough]]\nname = "p"\nhosts = ["p.test"]\nupstreams = ["127.0.0.1:1"]\n'
            'http_upstream = "10.0.0.2:80"\n')
    assert only(text) == ("passthrough[0](p).http_upstream",
                          "needs server.http_listen (plain HTTP is received there)")


def run_check(tmp_path: Path, text: str) -> tuple[int, str, str]:
    config = tmp_path / "sniport.toml"
    config.write_text(text)
    out = run_cli("check", "-c", str(config), cwd=tmp_path)
    return out.returncode, out.stdout, out.stderr


def test_check_explains_what_will_happen_and_creates_no_storage(tmp_path: Path) -> None:
    code, out, err = run_check(tmp_path, (
        f'[server]\nlisten = ["127.0.0.1:1"]\nstate_dir = "{tmp_path}/state"\n'
        '[acme]\nemail = "ops@example.com"\n' + SITE))
    assert code == 0, err
    assert (f"note: site blog: no ACME certificate for example.com, www.example.com yet: one "
            f"will be ordered from {LETS_ENCRYPT} by tls-alpn-01, stored in "
            f"{tmp_path}/state/acme; a temporary self-signed certificate is served until "
            "then") in out
    assert "note: site blog: http-01 is not used: server.http_listen is empty" in out
    assert "example.com                              -> site:blog  (certificate by ACME)" \
        in out
    assert not (tmp_path / "state" / "acme").exists()  # check changes nothing there


def test_check_says_when_the_storage_cannot_be_used(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    code, _, err = run_check(tmp_path, (
        f'[server]\nlisten = ["127.0.0.1:1"]\nstate_dir = "{tmp_path}/state"\n'
        f'[acme]\nstorage = "{tmp_path}/file/acme"\n' + SITE))
    assert code == 1
    assert "acme.storage: " in err and f"{tmp_path}/file" in err, err


def test_check_says_when_the_ca_bundle_cannot_be_used(tmp_path: Path) -> None:
    """Found in review: a missing ``ca`` passed check and failed later, in the ACME
    service, as a failed order."""
    (tmp_path / "garbage.pem").write_text("not PEM")
    for ca, reason in ((tmp_path / "missing.pem", "No such file or directory"),
                       (tmp_path / "garbage.pem", "")):
        code, _, err = run_check(tmp_path, (
            f'[server]\nlisten = ["127.0.0.1:1"]\nstate_dir = "{tmp_path}/state"\n'
            f'[acme]\nca = "{ca}"\n' + SITE))
        assert code == 1
        assert "acme.ca: cannot be used to trust the ACME directory: " + reason in err, err
