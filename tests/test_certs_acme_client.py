"""certs/acme_client.py: ACME over sniport's own HTTPS client, against a real pebble (the
happy path, with pebble's default 5% badNonce rejections kept on) and against a fake ACME
server on a real socket (every way a call can fail: an error status with a problem document,
garbage, a connection closed mid-response, a server too slow, refused, untrusted TLS)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.backends import free_port
from support.fakeacme import FakeAcme, Reply, problem
from support.memstorage import MemoryStorage
from support.pebble import PebbleInfo, start_pebble

from sniport.certs.acme_client import (
    USER_AGENT,
    AcmeHttp,
    AcmeOrderError,
    AcmeTransportError,
    fetch_directory,
    obtain,
    renewal_window,
)
from sniport.wire import acme

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[PebbleInfo]:
    info = start_pebble(tmp_path, always_valid=True)  # default badNonce rejection kept
    try:
        yield info
    finally:
        info.stop()


def sans(chain_pem: bytes) -> list[str]:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(ext.get_values_for_type(x509.DNSName))


def test_obtain_from_pebble(pebble: PebbleInfo) -> None:
    storage = MemoryStorage()
    names = ("one.sniport.test", "two.sniport.test")

    async def main() -> tuple[acme.Done, tuple[acme.RenewalWindow | None, float]]:
        http = AcmeHttp(ca=pebble.ca_file, timeout=10)
        directory = await fetch_directory(http, pebble.directory_url)
        done = await obtain(http, directory, storage.account_key(pebble.directory_url), names,
                            email="ops@sniport.test", challenges=("tls-alpn-01", "http-01"),
                            storage=storage, default_poll=0.1)
        leaf = x509.load_pem_x509_certificates(done.chain_pem)[0]
        return done, await renewal_window(http, directory, leaf)

    done, (window, recheck) = run(main())
    assert sans(done.chain_pem) == sorted(names)
    chain = x509.load_pem_x509_certificates(done.chain_pem)
    key = serialization.load_pem_private_key(done.key_pem, None)
    assert key.public_key() == chain[0].public_key()
    assert storage.published  # a fresh account: fresh authorizations, challenges published
    assert storage.withdrawn == storage.published  # and every one withdrawn again
    assert storage.challenges == {}
    assert (window, recheck) == (None, 6 * 3600.0)  # pebble has no renewalInfo


def test_failed_order_withdraws_its_challenges(tmp_path: Path) -> None:
    # Validation on, and nobody answers: pebble marks the authorization invalid.
    info = start_pebble(tmp_path, always_valid=False, nonce_reject=0)
    storage = MemoryStorage()
    try:
        async def main() -> AcmeOrderError:
            http = AcmeHttp(ca=info.ca_file, timeout=10)
            directory = await fetch_directory(http, info.directory_url)
            with pytest.raises(AcmeOrderError) as caught:
                await obtain(http, directory, storage.account_key(info.directory_url),
                             ["nobody.sniport.test"], email="", challenges=("http-01",),
                             storage=storage, default_poll=0.1)
            return caught.value

        error = run(main())
    finally:
        info.stop()
    assert error.error.kind is acme.ErrorKind.INVALID, error
    assert len(storage.published) == 1
    assert storage.withdrawn == storage.published


def fake_call(tmp_path: Path, routes: dict[str, Reply], path: str, *, method: str = "GET",
              timeout: float = 5.0, trust: bool = True,
              body: bytes | None = None) -> tuple[acme.Response | Exception, FakeAcme]:
    async def main() -> tuple[acme.Response | Exception, FakeAcme]:
        async with FakeAcme(tmp_path) as fake:
            for p, reply in routes.items():
                fake.routes[p] = lambda hit, reply=reply: reply  # type: ignore[misc]
            http = AcmeHttp(ca=fake.ca_file if trust else "", timeout=timeout)
            try:
                return await http.call(method, fake.url(path), body), fake
            except AcmeTransportError as exc:
                return exc, fake

    return run(main())


def test_response_collected_whole(tmp_path: Path) -> None:
    reply = Reply(201, [("Link", "<https://a>;rel=up"), ("Link", "<https://b>;rel=up"),
                        ("Location", "https://x/1")], b'{"status": "valid"}')
    got, fake = fake_call(tmp_path, {"/x": reply}, "/x?q=1", method="POST", body=b"{}")
    assert isinstance(got, acme.Response)
    assert got.status == 201 and got.body == b'{"status": "valid"}'
    assert [v for k, v in got.headers if k == "Link"] == ["<https://a>;rel=up",
                                                          "<https://b>;rel=up"]
    hit = fake.hits[0]
    assert (hit.method, hit.path, hit.body) == ("POST", "/x?q=1", b"{}")
    assert hit.headers["user-agent"] == USER_AGENT
    assert hit.headers["content-type"] == "application/jose+json"
    assert hit.headers["connection"] == "close"


def test_head_ends_at_the_head(tmp_path: Path) -> None:
    got, _ = fake_call(tmp_path, {}, "/nonce", method="HEAD")
    assert isinstance(got, acme.Response) and got.status == 200
    assert got.header("replay-nonce") == "n0"


def test_body_capped(tmp_path: Path) -> None:
    got, _ = fake_call(tmp_path, {"/big": Reply(200, [], b"x" * (acme.MAX_BODY + 5000))},
                       "/big")
    assert isinstance(got, acme.Response)
    assert len(got.body) == acme.MAX_BODY + 1


def test_body_ended_by_close(tmp_path: Path) -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"a\": 1}"
    got, _ = fake_call(tmp_path, {"/x": Reply(raw=raw)}, "/x")
    assert isinstance(got, acme.Response) and got.body == b'{"a": 1}'


@pytest.mark.parametrize(("reply", "expect"), [
    (Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"newNo"),
     "connection closed in the middle of the response body"),
    (Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Le"), "connection closed before a complete"),
    (Reply(raw=b"SMTP ready\r\n\r\n"), "not a valid HTTP response"),
    (Reply(hang=True), "no answer within 0.3s"),
])
def test_transport_failures(tmp_path: Path, reply: Reply, expect: str) -> None:
    got, _ = fake_call(tmp_path, {"/dir": reply}, "/dir", timeout=0.3)
    assert isinstance(got, AcmeTransportError)
    assert expect in str(got) and "/dir" in str(got)


def test_untrusted_certificate(tmp_path: Path) -> None:
    got, _ = fake_call(tmp_path, {}, "/dir", trust=False)
    assert isinstance(got, AcmeTransportError)
    assert "TLS certificate not trusted" in str(got), got


def test_refused_and_bad_urls() -> None:
    async def main() -> list[str]:
        http = AcmeHttp(timeout=2)
        out = []
        for url in (f"https://127.0.0.1:{free_port()}/dir", "http://127.0.0.1/dir",
                    "https://127.0.0.1/a b", "https://127.0.0.1/a\r\nX: y"):
            with pytest.raises(AcmeTransportError) as caught:
                await http.call("GET", url)
            out.append(str(caught.value))
        return out

    refused, plain, space, crlf = run(main())
    assert "connection refused" in refused
    for text in (plain, space, crlf):
        assert "not an https URL" in text


def test_directory_errors(tmp_path: Path) -> None:
    async def main() -> list[AcmeOrderError]:
        async with FakeAcme(tmp_path) as fake:
            http = AcmeHttp(ca=fake.ca_file, timeout=5)
            out = []
            for reply in (problem(503, "serverInternal", "down for maintenance",
                                  ("Retry-After", "120")),
                          Reply(200, [], b"<html>not json"), Reply(200, [], b"[1, 2]")):
                fake.routes["/dir"] = lambda hit, reply=reply: reply  # type: ignore[misc]
                with pytest.raises(AcmeOrderError) as caught:
                    await fetch_directory(http, fake.url("/dir"))
                out.append(caught.value)
            return out

    down, html, array = run(main())
    assert down.error.problem is not None
    assert "down for maintenance" in str(down) and "HTTP 503" in str(down)
    assert down.error.retry_after == 120
    assert html.error.kind is acme.ErrorKind.MALFORMED and "not a JSON object" in str(html)
    assert array.error.kind is acme.ErrorKind.MALFORMED


def test_obtain_reports_what_the_ca_said(tmp_path: Path) -> None:
    storage = MemoryStorage()

    async def main() -> AcmeOrderError:
        async with FakeAcme(tmp_path) as fake:
            fake.routes["/account"] = lambda hit: problem(
                403, "unauthorized", "account creation disabled for this test")
            http = AcmeHttp(ca=fake.ca_file, timeout=5)
            directory = await fetch_directory(http, fake.url("/dir"))
            with pytest.raises(AcmeOrderError) as caught:
                await obtain(http, directory, storage.account_key("x"), ["a.sniport.test"],
                             email="", challenges=("http-01",), storage=storage)
            assert [h.path for h in fake.hits] == ["/dir", "/nonce", "/account"]
            assert fake.hits[2].headers["content-type"] == "application/jose+json"
            return caught.value

    error = run(main())
    assert error.error.kind is acme.ErrorKind.PROBLEM
    assert "account creation disabled for this test" in str(error)


def test_renewal_window_from_fake_ari(tmp_path: Path) -> None:
    ca_leaf = x509.load_pem_x509_certificate(
        FakeAcme(tmp_path).ca.issue_cert("a.sniport.test").cert_chain_pems[0].bytes())
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    window = {"suggestedWindow": {"start": start.isoformat(),
                                  "end": (start + datetime.timedelta(days=1)).isoformat()}}

    async def main() -> list[tuple[acme.RenewalWindow | None, float] | Exception]:
        async with FakeAcme(tmp_path, ari=True) as fake:
            http = AcmeHttp(ca=fake.ca_file, timeout=5)
            directory = await fetch_directory(http, fake.url("/dir"))
            out: list[tuple[acme.RenewalWindow | None, float] | Exception] = []
            for retry in ("120", "5", None, "9999999"):
                headers = [("Retry-After", retry)] if retry else []
                fake.routes["/ari"] = lambda hit, h=headers: Reply(  # type: ignore[misc]
                    200, h, json.dumps(window).encode())
                out.append(await renewal_window(http, directory, ca_leaf))
            fake.routes["/ari"] = lambda hit: problem(404, "malformed", "no such certificate")
            try:
                await renewal_window(http, directory, ca_leaf)
            except AcmeOrderError as exc:
                out.append(exc)
            assert fake.hits[1].path == f"/ari/{acme.ari_cert_id(ca_leaf)}"
            return out

    *windows, missing = run(main())
    seconds = []
    for w in windows:
        assert isinstance(w, tuple) and w[0] is not None
        assert w[0].start == start
        seconds.append(w[1])
    assert seconds == [120.0, 60.0, 6 * 3600.0, 86400.0]  # clamped to [1 min, 1 day]
    assert isinstance(missing, AcmeOrderError) and "no such certificate" in str(missing)


def test_runs_on_uvloop() -> None:
    # uvloop.run is the loop of these tests (house rule 8): check it is what runs them.
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(which()).startswith("uvloop")
