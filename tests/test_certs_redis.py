"""certs/redis_store.py and certs/backends.py: the Redis backend of Storage and the async
challenge sources, against a real redis-server started per test (tests/support/redis.py)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.redis import RedisInfo, start_redis

from sniport.certs import backends
from sniport.certs.backends import DirectoryChallenges, challenge_source, open_storage
from sniport.certs.directory import DirectoryStorage, cert_id
from sniport.certs.redis_store import RedisChallenges, RedisStorage, parse_url
from sniport.certs.storage import ChallengeSource, Storage, StorageError
from sniport.wire.acme import Challenge, tls_alpn01_certificate

URL = "https://acme.example/directory"
NAMES = ["b.example.com", "a.example.com", "*.example.com"]
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
LOCK = "sniport:lock:" + cert_id(NAMES)
CERT = "sniport:cert:" + cert_id(NAMES)


def pair(name: str = "a.example.com") -> tuple[bytes, bytes]:
    return tls_alpn01_certificate(name, "x.y")


def _ch(kind: str, name: str = "a.example.com", token: str = TOKEN) -> Challenge:
    return Challenge(kind, name, "https://acme.example/chall/1", token, f"{token}.thumb")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisInfo]:
    info = start_redis(tmp_path)
    yield info
    info.stop()


@pytest.fixture
def store(server: RedisInfo) -> Iterator[RedisStorage]:
    s = RedisStorage(server.url)
    yield s
    s.close()


@pytest.fixture
def raw(server: RedisInfo) -> Iterator[redis.Redis]:
    """A plain client: what the test sets and inspects behind the backend's back."""
    r = redis.Redis(host="127.0.0.1", port=server.port)
    yield r
    r.close()


def test_it_is_a_storage_and_the_description_hides_the_password() -> None:
    s: Storage = RedisStorage("redis://user:secret@127.0.0.1:7/3")
    assert s.description == "redis://user@127.0.0.1:7/3"
    assert "secret" not in RedisStorage("redis://:secret@h").description
    tls = RedisStorage("rediss://:pw@redis.example:6380/1?ca=/etc/ca.pem")
    assert tls.description == "rediss://redis.example:6380/1?ca=/etc/ca.pem"
    assert tls.target.tls and tls.target.ca == "/etc/ca.pem" and tls.target.password == "pw"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://", "needs a host"),
        ("redis://h/x", "must be a number"),
        ("redis://h:99999/0", "Redis URL"),
        ("redis://h/0?ca=/x", "rediss"),
        ("rediss://h/0?ca=", "needs a path"),
        ("redis://h/0?timeout=3", "unknown"),
        ("http://h/0", "redis://"),
    ],
)
def test_bad_urls_are_refused(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_url(url)


def test_backends_pick_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), DirectoryStorage)
    assert isinstance(open_storage("redis://127.0.0.1:1/0"), RedisStorage)
    assert isinstance(open_storage("rediss://127.0.0.1:1/0"), RedisStorage)
    assert isinstance(challenge_source(str(tmp_path)), DirectoryChallenges)
    assert isinstance(challenge_source("redis://127.0.0.1:1/0"), RedisChallenges)
    with pytest.raises(ValueError, match="unknown scheme"):
        open_storage("s3://bucket/acme")
    with pytest.raises(ValueError, match="unknown scheme"):
        challenge_source("s3://bucket/acme")
    assert not backends.is_redis("relative/redis:/x")


def test_problem_is_none_and_leaves_nothing(store: RedisStorage, raw: redis.Redis) -> None:
    assert store.problem() is None
    assert raw.keys("*") == []


# --- account keys ----------------------------------------------------------------------------


def test_account_key_is_made_once_and_kept(store: RedisStorage, server: RedisInfo,
                                           raw: redis.Redis) -> None:
    key = store.account_key(URL)
    again = RedisStorage(server.url).account_key(URL)
    assert again.private_numbers() == key.private_numbers()
    (name,) = raw.keys("sniport:account:*")
    assert len(name) == len(b"sniport:account:") + 16
    other = store.account_key(URL + "/other")
    assert other.private_numbers() != key.private_numbers()


def test_account_key_another_instance_made_first_is_used(store: RedisStorage, server: RedisInfo,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sniport.certs import redis_store

    theirs = RedisStorage(server.url)
    real = redis_store.generate_key
    made: list[Any] = []
    calls: list[int] = []

    def racing() -> Any:
        # Between our GET (nothing) and our SET NX, another instance stores its key.
        calls.append(1)
        if len(calls) == 1:
            made.append(theirs.account_key(URL))
        return real()

    monkeypatch.setattr(redis_store, "generate_key", racing)
    ours = store.account_key(URL)
    assert ours.private_numbers() == made[0].private_numbers()


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xfe", b"x" * 2_000_000])
def test_corrupt_account_key_raises_and_is_kept(store: RedisStorage, raw: redis.Redis,
                                                content: bytes) -> None:
    store.account_key(URL)
    (name,) = raw.keys("sniport:account:*")
    raw.set(name, content)
    with pytest.raises(StorageError, match="corrupt account key"):
        store.account_key(URL)
    assert raw.get(name) == content


def test_account_key_of_the_wrong_type_raises(store: RedisStorage, raw: redis.Redis) -> None:
    store.account_key(URL)
    (name,) = raw.keys("sniport:account:*")
    raw.delete(name)
    raw.rpush(name, b"x")
    with pytest.raises(StorageError, match="WRONGTYPE"):
        store.account_key(URL)


# --- certificates ----------------------------------------------------------------------------


def test_save_load_round_trip(store: RedisStorage, server: RedisInfo) -> None:
    assert store.load_certificate(NAMES) is None
    chain, key = pair()
    store.save_certificate(NAMES, chain, key)
    loaded = RedisStorage(server.url).load_certificate(list(reversed(NAMES)))
    assert loaded is not None
    assert (loaded.chain_pem, loaded.key_pem) == (chain, key)
    assert loaded.version == store.certificate_version(NAMES)


def test_version_changes_on_save(store: RedisStorage) -> None:
    assert store.certificate_version(NAMES) is None
    store.save_certificate(NAMES, *pair())
    first = store.certificate_version(NAMES)
    assert first is not None and first == store.certificate_version(NAMES)
    store.save_certificate(NAMES, *pair())
    second = store.certificate_version(NAMES)
    assert second not in (None, first)
    loaded = store.load_certificate(NAMES)
    assert loaded is not None and loaded.version == second


def test_stored_names(store: RedisStorage, raw: redis.Redis) -> None:
    assert store.stored_names() == []
    store.save_certificate(NAMES, *pair())
    store.save_certificate(["c.example.org"], *pair("c.example.org"))
    store.save_certificate(list(reversed(NAMES)), *pair())  # the same set: once
    raw.sadd("sniport:certnames", b"\xff", b"../x", b"")  # not ours: ignored
    assert store.stored_names() == [
        ("*.example.com", "a.example.com", "b.example.com"), ("c.example.org",)]


def test_key_chain_mismatch_and_corrupt_pem_are_detected(store: RedisStorage) -> None:
    chain, _ = pair()
    _, other_key = pair()
    store.save_certificate(NAMES, chain, other_key)
    with pytest.raises(StorageError, match="does not match"):
        store.load_certificate(NAMES)
    store.save_certificate(NAMES, b"not a pem", other_key)
    with pytest.raises(StorageError, match="corrupt"):
        store.load_certificate(NAMES)


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.hdel(CERT, "key"),
        lambda r: r.hset(CERT, "version", b"\xff\xfe"),
        lambda r: r.hset(CERT, "version", b"v" * 100),
        lambda r: (r.delete(CERT), r.set(CERT, b"a string")),
        lambda r: (r.delete("sniport:certnames"), r.set("sniport:certnames", b"x")),
    ],
    ids=["no key", "version not ascii", "version too long", "not a hash", "names not a set"],
)
def test_garbage_certificate_values_raise_storage_error(
    store: RedisStorage, raw: redis.Redis, damage: Callable[[redis.Redis], object]
) -> None:
    store.save_certificate(NAMES, *pair())
    damage(raw)
    calls = [lambda: store.load_certificate(NAMES), lambda: store.certificate_version(NAMES),
             store.stored_names]
    raised = 0
    for call in calls:
        try:
            call()
        except StorageError as exc:
            assert str(exc).startswith(f"redis 127.0.0.1:{store.target.port}: ")
            raised += 1
    assert raised >= 1


# --- locks -----------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released(store: RedisStorage, server: RedisInfo,
                                        raw: redis.Redis) -> None:
    lock = store.try_lock(NAMES, stale_after=60)
    assert lock is not None
    assert RedisStorage(server.url).try_lock(list(reversed(NAMES)), stale_after=60) is None
    value = raw.get(LOCK)
    assert value is not None and int(value.split()[0]) == os.getpid()
    assert 59_000 < raw.pttl(LOCK) <= 60_000
    lock.release()
    lock.release()  # idempotent
    assert raw.exists(LOCK) == 0
    again = store.try_lock(NAMES, stale_after=60)
    assert again is not None
    again.release()


def test_a_lock_expires_by_itself(store: RedisStorage) -> None:
    assert store.try_lock(NAMES, stale_after=0.3) is not None  # its holder "died"
    assert store.try_lock(NAMES, stale_after=0.3) is None
    time.sleep(0.5)
    taken = store.try_lock(NAMES, stale_after=60)
    assert taken is not None
    taken.release()


def test_refresh_keeps_a_lock_alive(store: RedisStorage, raw: redis.Redis) -> None:
    lock = store.try_lock(NAMES, stale_after=0.5)
    assert lock is not None
    for _ in range(4):
        time.sleep(0.2)
        lock.refresh()
    assert store.try_lock(NAMES, stale_after=0.5) is None
    assert raw.pttl(LOCK) > 300
    lock.release()


def test_release_keeps_the_lock_another_process_took(store: RedisStorage, server: RedisInfo,
                                                     raw: redis.Redis) -> None:
    ours = store.try_lock(NAMES, stale_after=0.2)
    assert ours is not None
    time.sleep(0.4)  # we stalled: ours expired
    theirs = RedisStorage(server.url).try_lock(NAMES, stale_after=60)
    assert theirs is not None
    content = raw.get(LOCK)
    ours.release()
    assert raw.get(LOCK) == content
    with pytest.raises(StorageError, match="taken over"):
        ours.refresh()
    assert raw.get(LOCK) == content and raw.pttl(LOCK) > 50_000
    assert store.try_lock(NAMES, stale_after=60) is None
    theirs.release()
    assert raw.exists(LOCK) == 0


def test_a_lock_whose_holder_died_on_this_host_is_broken_at_once(
    store: RedisStorage, raw: redis.Redis
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    raw.set(LOCK, f"{dead.pid} {socket.gethostname()} {time.time():.9f} ab", px=600_000)
    lock = store.try_lock(NAMES, stale_after=600)
    assert lock is not None
    lock.release()
    raw.set(LOCK, f"{os.getpid()} {socket.gethostname()} {time.time():.9f} ab", px=600_000)
    assert store.try_lock(NAMES, stale_after=600) is None
    raw.set(LOCK, b"\xff garbage", px=600_000)  # not ours to judge: waited for
    assert store.try_lock(NAMES, stale_after=600) is None


def _race(url: str, barrier: Any, results: Any) -> None:
    lock = RedisStorage(url).try_lock(NAMES, stale_after=60)
    results.put(lock is not None)
    barrier.wait()  # hold it until both have tried


def test_two_processes_racing_exactly_one_wins(server: RedisInfo, raw: redis.Redis) -> None:
    ctx = multiprocessing.get_context("fork")
    for _ in range(5):
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(server.url, barrier, results)) for _ in "ab"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        assert sorted(results.get(timeout=5) for _ in procs) == [False, True]
        raw.delete(LOCK)


# --- challenges --------------------------------------------------------------------------------


def test_http01_publish_read_withdraw(store: RedisStorage, server: RedisInfo,
                                      raw: redis.Redis) -> None:
    ch = _ch("http-01")
    reader = RedisStorage(server.url)
    store.publish_challenge(ch)
    assert reader.http01(TOKEN) == ch.key_authorization
    assert reader.tls_alpn01("a.example.com") is None
    assert 3500 < raw.ttl(f"sniport:challenge:http-01:{TOKEN}") <= 3600
    assert asyncio.run(_read_async(server.url, TOKEN, "a.example.com")) == (
        ch.key_authorization, None)
    store.withdraw_challenge(ch)
    store.withdraw_challenge(ch)  # missing is fine
    assert reader.http01(TOKEN) is None


def test_tls_alpn01_publish_read_withdraw(store: RedisStorage, server: RedisInfo) -> None:
    first, second = _ch("tls-alpn-01", token="first"), _ch("tls-alpn-01", token="second")
    store.publish_challenge(first)
    store.publish_challenge(second)  # one pending per name: the newer one answers
    assert store.tls_alpn01("a.example.com") == "second.thumb"
    assert store.http01("second") is None
    assert asyncio.run(_read_async(server.url, "second", "a.example.com")) == (
        None, "second.thumb")
    store.withdraw_challenge(second)
    assert store.tls_alpn01("a.example.com") is None


@pytest.mark.parametrize(
    "ch",
    [
        _ch("http-01", token="../x"),
        _ch("http-01", token="a:b"),
        _ch("http-01", token=""),
        _ch("http-01", token="a" * 300),
        _ch("tls-alpn-01", name="../x"),
        _ch("tls-alpn-01", name="a:b"),
        _ch("tls-alpn-01", name="A.example.com"),
        _ch("tls-alpn-01", name="*.example.com"),
        _ch("dns-01"),
    ],
    ids=repr,
)
def test_publish_refuses_bad_tokens_and_names(store: RedisStorage, raw: redis.Redis,
                                              ch: Challenge) -> None:
    with pytest.raises(ValueError):
        store.publish_challenge(ch)
    with pytest.raises(ValueError):
        store.withdraw_challenge(ch)
    assert raw.keys("*") == []


BAD = ["../x", "a/b", "", ".", "..", "a" * 5000, "x:y", "*", "a\x00b", "../../lock:x"]


def test_readers_refuse_odd_keys(store: RedisStorage, server: RedisInfo,
                                 raw: redis.Redis) -> None:
    for key in BAD:  # something readable where each key would land, were it not refused
        raw.set(f"sniport:challenge:http-01:{key}", b"secret")
        raw.set(f"sniport:challenge:tls-alpn-01:{key}", b"secret")
    raw.set("sniport:challenge:http-01:*", b"secret")
    for key in BAD:
        assert store.http01(key) is None
        assert store.tls_alpn01(key) is None
        assert asyncio.run(_read_async(server.url, key, key)) == (None, None)


@pytest.mark.parametrize("content", [b"x" * 1025, b"\xff\xfe", None],
                         ids=["over 1 KiB", "not ascii", "a list"])
def test_garbage_answers(store: RedisStorage, server: RedisInfo, raw: redis.Redis,
                         content: bytes | None) -> None:
    for key in (f"sniport:challenge:http-01:{TOKEN}", "sniport:challenge:tls-alpn-01:a.b"):
        if content is None:
            raw.rpush(key, b"x")
        else:
            raw.set(key, content)
    with pytest.raises(StorageError):
        store.http01(TOKEN)
    with pytest.raises(StorageError):
        store.tls_alpn01("a.b")
    assert asyncio.run(_read_async(server.url, TOKEN, "a.b")) == (None, None)


def test_answer_of_exactly_1_kib_is_read(store: RedisStorage, raw: redis.Redis) -> None:
    raw.set(f"sniport:challenge:http-01:{TOKEN}", b"k" * 1024)
    assert store.http01(TOKEN) == "k" * 1024


async def _read_async(url: str, token: str, name: str,
                      timeout: float = 2.0) -> tuple[str | None, str | None]:
    source: ChallengeSource = RedisChallenges(url, timeout=timeout)
    try:
        return await source.http01(token), await source.tls_alpn01(name)
    finally:
        await source.close()


def test_the_async_source_follows_its_loop(store: RedisStorage, server: RedisInfo) -> None:
    store.publish_challenge(_ch("http-01"))
    source = RedisChallenges(server.url)
    # Two loops one after the other (a worker's loop is one; tests make several).
    assert asyncio.run(source.http01(TOKEN)) == f"{TOKEN}.thumb"
    assert asyncio.run(source.http01(TOKEN)) == f"{TOKEN}.thumb"

    async def many() -> list[str | None]:
        try:
            return list(await asyncio.gather(*(source.http01(TOKEN) for _ in range(50))))
        finally:
            await source.close()

    assert asyncio.run(many()) == [f"{TOKEN}.thumb"] * 50


def test_directory_challenges(tmp_path: Path) -> None:
    store = DirectoryStorage(str(tmp_path / "acme"))
    store.publish_challenge(_ch("http-01"))
    store.publish_challenge(_ch("tls-alpn-01"))
    source = challenge_source(store.path)

    async def read() -> tuple[str | None, ...]:
        try:
            return (await source.http01(TOKEN), await source.tls_alpn01("a.example.com"),
                    await source.http01("../x"), await source.tls_alpn01("b.example.com"))
        finally:
            await source.close()

    assert asyncio.run(read()) == (f"{TOKEN}.thumb", f"{TOKEN}.thumb", None, None)


# --- a server that refuses, is down or is slow ---------------------------------------------------


def test_a_password_protected_server(tmp_path: Path) -> None:
    info = start_redis(tmp_path, password="s3cret")
    try:
        good = RedisStorage(info.url)
        assert good.problem() is None
        good.publish_challenge(_ch("http-01"))
        assert good.http01(TOKEN) == f"{TOKEN}.thumb"
        assert "s3cret" not in good.description
        wrong = RedisStorage(info.url.replace("s3cret", "nope"))
        problem = wrong.problem()
        assert problem is not None and "authentication failed" in problem
        assert problem.startswith(f"redis 127.0.0.1:{info.port}: ")
        missing = RedisStorage(f"redis://127.0.0.1:{info.port}/0").problem()
        assert missing is not None and "authentication" in missing.lower()
        with pytest.raises(StorageError, match="authentication failed"):
            wrong.http01(TOKEN)
        assert asyncio.run(_read_async(wrong.target.description.replace(
            "redis://", "redis://:nope@"), TOKEN, "a.example.com")) == (None, None)
    finally:
        info.stop()


def _every_sync_call(s: RedisStorage) -> list[Callable[[], object]]:
    return [
        lambda: s.account_key(URL),
        lambda: s.certificate_version(NAMES),
        lambda: s.load_certificate(NAMES),
        lambda: s.save_certificate(NAMES, *pair()),
        s.stored_names,
        lambda: s.try_lock(NAMES, 60),
        lambda: s.publish_challenge(_ch("http-01")),
        lambda: s.withdraw_challenge(_ch("http-01")),
        lambda: s.http01(TOKEN),
        lambda: s.tls_alpn01("a.example.com"),
    ]


def test_redis_down(store: RedisStorage, server: RedisInfo,
                    caplog: pytest.LogCaptureFixture) -> None:
    lock = store.try_lock(NAMES, stale_after=60)
    assert lock is not None
    server.stop()
    for call in [*_every_sync_call(store), lock.refresh, lock.release]:
        started = time.monotonic()
        with pytest.raises(StorageError, match=rf"redis 127.0.0.1:{server.port}: .*refused"):
            call()
        assert time.monotonic() - started < store.timeout + 0.5
    problem = store.problem()
    assert problem == f"redis 127.0.0.1:{server.port}: connection refused"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sniport"):
        assert asyncio.run(_read_async(server.url, TOKEN, "a.example.com")) == (None, None)
    assert time.monotonic() - started < 1
    assert "connection refused" in caplog.text


def test_a_slow_redis(server: RedisInfo, raw: redis.Redis) -> None:
    slow = RedisStorage(server.url, timeout=0.5)
    slow.publish_challenge(_ch("http-01"))
    assert slow.http01(TOKEN) == f"{TOKEN}.thumb"  # connected before the server stalls
    sleeper = threading.Thread(target=lambda: raw.execute_command("DEBUG", "SLEEP", "3"))
    sleeper.start()
    time.sleep(0.2)  # the server is now asleep
    try:
        for call in [lambda: slow.http01(TOKEN), lambda: slow.certificate_version(NAMES),
                     lambda: slow.try_lock(NAMES, 60)]:
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"no answer within 0.5s"):
                call()
            assert time.monotonic() - started < 1.2
        started = time.monotonic()
        problem = slow.problem()
        assert problem is not None and "no answer within 0.5s" in problem
        assert time.monotonic() - started < 1.2
        started = time.monotonic()
        got = asyncio.run(_read_async(server.url, TOKEN, "a.example.com", timeout=0.5))
        assert got == (None, None)
        assert time.monotonic() - started < 2.0  # two reads, 0.5 s each at most
    finally:
        sleeper.join(10)
    assert slow.http01(TOKEN) == f"{TOKEN}.thumb"  # and it recovers
