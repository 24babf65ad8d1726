"""The Redis backend of ``Storage`` (and the workers' async challenge reads from Redis).

Job: keep the ACME state that several instances share (account keys, certificates, locks,
pending challenge answers) in one Redis database, named by ``storage = "redis://..."``:

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]       plain TCP (port 6379, database 0)
    rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ca=/path/ca.pem]
                                                     TLS; the server's certificate is checked
                                                     against ``ca`` (else the system's CAs)
                                                     and its name against HOST

Keys (all under ``sniport:``; ``<id>`` is ``directory.cert_id(names)``, the same name the
directory backend gives the certificate's folder)::

    sniport:account:<sha256(directory_url)[:16]>   string: account key PEM (PKCS8, P-256)
    sniport:cert:<id>                   hash: chain (PEM, leaf first), key (PEM), version
                                        (random hex, new on every save), names (sorted,
                                        "\\n"-joined)
    sniport:certnames                   set: the "\\n"-joined sorted name set of each
                                        certificate saved (``stored_names``)
    sniport:lock:<id>                   string "pid host time random", PX = stale_after
    sniport:challenge:http-01:<token>   string: key authorization, EX 3600
    sniport:challenge:tls-alpn-01:<name> string: key authorization, EX 3600
    sniport:probe:<random>              written then deleted by ``problem()`` (PX 10000)

Rules:
- An account key is never replaced: SET NX, and the loser loads the winner's; a corrupt
  one raises (replacing it loses the account).
- A certificate, its key and its version are one hash written by one HSET (with the
  SADD to ``certnames`` in the same MULTI): a reader never pairs a new chain with an old
  key; a reader still checks that the key matches the leaf. ``certificate_version`` is one
  HGET.
- A lock is ``SET NX PX``: it expires by itself when its holder dies (and, as in the
  directory backend, a holder that is a dead process of this host is broken at once).
  Refresh and release compare the lock's value first, in Lua (atomic on the server):
  nobody extends or deletes a lock another process took after ours expired.
- Challenge answers expire after an hour: a crashed service leaves nothing forever.
- Tokens and names are validated (``valid_token``, ``valid_name``) before they become keys.
- Every Redis error, timeout or unexpected value raises ``StorageError`` naming the server
  ("redis 127.0.0.1:6379: connection refused"); no call waits longer than ``timeout`` per
  round trip, and nothing is retried (the callers poll again anyway).
- The async reader (``RedisChallenges``) never raises: an error or a timeout is a miss and
  a throttled log line. Its client is made lazily in the loop that uses it.
- ``description`` is the URL without its password.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from sniport.certs.directory import (
    _holder_gone,
    _load_account_key,
    _matches,
    cert_id,
    valid_name,
)
from sniport.certs.storage import StorageError, StoredCertificate
from sniport.logs import Throttle, diag
from sniport.wire.acme import Challenge, generate_key, valid_token

PREFIX = "sniport:"
CHALLENGE_TTL = 3600  # seconds: the CA validates within minutes
_ANSWER_CAP = 1024  # as in the directory backend
_PEM_CAP = 1 << 20
_CERTNAMES = PREFIX + "certnames"

# KEYS[1] the lock, ARGV[1] our value, ARGV[2] milliseconds: touch it only if it is ours.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``redis://`` / ``rediss://`` storage URL."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    ca: str | None

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def description(self) -> str:
        user = f"{self.username}@" if self.username else ""
        query = "?ca=" + urllib.parse.quote(self.ca) if self.ca else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{self.where}/{self.db}{query}"

    def client_options(self, timeout: float) -> dict[str, Any]:
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        if self.tls:
            options["ssl"] = True
            options["ssl_cert_reqs"] = "required"
            options["ssl_check_hostname"] = True
            if self.ca:
                options["ssl_ca_certs"] = self.ca
        return options


def parse_url(url: str) -> RedisTarget:
    """The target of a storage URL; ValueError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"not a Redis URL: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL (redis:// or rediss://): {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("a Redis URL needs a host: redis://HOST:PORT/DB")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and path.isascii()):
        raise ValueError(f"the Redis database must be a number: /{path}")
    if parts.fragment:
        raise ValueError("a Redis URL has no #fragment")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - {"ca"})
    if unknown:
        raise ValueError(f"unknown Redis URL parameter(s): {', '.join(unknown)} (only ?ca=)")
    ca = query.get("ca", [None])[-1]
    if ca is not None and parts.scheme != "rediss":
        raise ValueError("?ca= is for rediss:// (TLS) only")
    if ca == "":
        raise ValueError("?ca= needs a path")
    unquote = urllib.parse.unquote
    return RedisTarget(
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ca=ca,
    )


def _cause_text(exc: BaseException) -> str:
    """The OS's words for a connection failure, if that is what is inside."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()  # asyncio's strerror is its own sentence
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return ""


def reason(exc: Exception, timeout: float) -> str:
    """A short reason for a Redis failure ("connection refused", "no answer within 2s")."""
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, redis.AuthenticationError):
        return f"authentication failed: {exc}"
    if isinstance(exc, redis.ConnectionError):
        text = str(exc)
        if "Authentication required" in text or "NOAUTH" in text:
            return "authentication required (no or wrong password in the URL)"
        return _cause_text(exc) or text
    if isinstance(exc, redis.ResponseError):
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return f"authentication failed: {text}"
        return text
    return str(exc) or type(exc).__name__


def _ascii(value: object, what: str, cap: int) -> str:
    """A stored value as text; StorageError if it is not what we wrote."""
    if not isinstance(value, bytes):
        raise StorageError(f"{what}: unexpected value of type {type(value).__name__}")
    if len(value) > cap:
        raise StorageError(f"{what}: over {cap} bytes")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise StorageError(f"{what}: not ascii") from None


def _names_member(names: Sequence[str]) -> str:
    cert_id(names)  # validates: ValueError for what is not a name
    return "\n".join(sorted(set(names)))


def _challenge_key(ch: Challenge) -> str:
    if ch.type == "http-01":
        if not valid_token(ch.token):
            raise ValueError(f"not a base64url token: {ch.token!r}")
        return f"{PREFIX}challenge:http-01:{ch.token}"
    if ch.type == "tls-alpn-01":
        if not valid_name(ch.name):
            raise ValueError(f"not a lowercase DNS name: {ch.name!r}")
        # One pending per name: the TLS handshake only tells us the name (RFC 8737 s. 3).
        return f"{PREFIX}challenge:tls-alpn-01:{ch.name}"
    raise ValueError(f"unknown challenge type {ch.type!r}")


def http01_key(token: str) -> str | None:
    return f"{PREFIX}challenge:http-01:{token}" if valid_token(token) else None


def tls_alpn01_key(name: str) -> str | None:
    return f"{PREFIX}challenge:tls-alpn-01:{name}" if valid_name(name) else None


class _RedisLock:
    """A held ``sniport:lock:<id>``; implements ``CertLock``."""

    def __init__(self, storage: RedisStorage, key: str, value: str, ttl_ms: int) -> None:
        self._storage = storage
        self._key = key
        self._value = value
        self._ttl_ms = ttl_ms
        self._released = False

    def refresh(self) -> None:
        # Extending a lock that another process took over (ours expired) would keep theirs
        # alive for the wrong reason; raising tells our driver to stop ordering.
        done = self._storage._run(
            f"refresh lock {self._key}",
            lambda r: r.eval(_REFRESH, 1, self._key, self._value, self._ttl_ms),
        )
        if done != 1:
            raise StorageError(f"redis {self._storage.target.where}: lock {self._key} "
                               "expired or was taken over by another process")

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._storage._run(
            f"release lock {self._key}",
            lambda r: r.eval(_RELEASE, 1, self._key, self._value),
        )


class RedisStorage:
    """``Storage`` in a Redis database (keys in the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        # No I/O: the client connects on first use. ValueError for a bad URL.
        self.target = parse_url(url)
        self.description = self.target.description
        self.timeout = timeout
        # No retries: one round trip is bounded by ``timeout``, and the callers poll again.
        self._client: redis.Redis = redis.Redis(
            **self.target.client_options(timeout),
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
        )

    def close(self) -> None:
        self._client.close()

    def _run(self, what: str, call: Any) -> Any:
        """``call(client)``; any failure becomes a StorageError naming the server."""
        try:
            return call(self._client)
        except StorageError:
            raise
        except (redis.RedisError, OSError, ValueError) as exc:
            raise StorageError(
                f"redis {self.target.where}: {what}: {reason(exc, self.timeout)}"
            ) from exc

    def _fail(self, what: str) -> StorageError:
        return StorageError(f"redis {self.target.where}: {what}")

    # --- checks ------------------------------------------------------------------------

    def problem(self) -> str | None:
        probe = f"{PREFIX}probe:{secrets.token_hex(8)}"
        try:
            self._client.ping()
            # Write permission (ACLs, a read-only replica, a full maxmemory): SET then DEL.
            self._client.set(probe, b"1", px=10_000)
            self._client.delete(probe)
        except (redis.RedisError, OSError, ValueError) as exc:
            return f"redis {self.target.where}: {reason(exc, self.timeout)}"
        return None

    # --- account keys ------------------------------------------------------------------

    def account_key(self, directory_url: str) -> ec.EllipticCurvePrivateKey:
        key_name = PREFIX + "account:" + hashlib.sha256(
            directory_url.encode("utf-8")).hexdigest()[:16]
        for _ in range(2):
            pem = self._run(f"read {key_name}", lambda r: r.get(key_name))
            if pem is not None:
                try:
                    text = _ascii(pem, key_name, _PEM_CAP)
                    return _load_account_key(key_name, text.encode("ascii"))
                except (ValueError, TypeError, StorageError) as exc:
                    # Never replaced: a new key is a new ACME account, the old one is lost.
                    raise self._fail(f"corrupt account key {key_name}: {exc}") from exc
            key = generate_key()
            new_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # NX: another instance may have made (and used) one meanwhile: then load that one.
            if self._run(f"write {key_name}", lambda r, pem=new_pem: r.set(key_name, pem, nx=True)):
                return key
        raise self._fail(f"account key {key_name} vanished while being made")

    # --- certificates ------------------------------------------------------------------

    @staticmethod
    def _cert_key(names: Sequence[str]) -> str:
        return f"{PREFIX}cert:{cert_id(names)}"

    def certificate_version(self, names: Sequence[str]) -> str | None:
        key = self._cert_key(names)
        version = self._run(f"read {key}", lambda r: r.hget(key, "version"))
        if version is None:
            return None
        return _checked(lambda: _ascii(version, key, 64), self)

    def load_certificate(self, names: Sequence[str]) -> StoredCertificate | None:
        key = self._cert_key(names)
        chain, key_pem, version = self._run(
            f"read {key}", lambda r: r.hmget(key, ["chain", "key", "version"]))
        if chain is None and key_pem is None and version is None:
            return None
        if chain is None or key_pem is None or version is None:
            raise self._fail(f"{key}: incomplete (chain, key and version expected)")
        for value in (chain, key_pem):
            if not isinstance(value, bytes) or len(value) > _PEM_CAP:
                raise self._fail(f"{key}: corrupt certificate or key")
        version_text = _checked(lambda: _ascii(version, key, 64), self)
        try:
            matched = _matches(chain, key_pem, key)
        except StorageError as exc:  # unparsable PEM
            raise self._fail(str(exc)) from exc
        if not matched:
            raise self._fail(f"{key}: the private key does not match the certificate")
        return StoredCertificate(chain, key_pem, version_text)

    def save_certificate(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None:
        key = self._cert_key(names)
        member = _names_member(names)
        version = secrets.token_hex(8)

        def write(r: redis.Redis) -> None:
            # One HSET replaces the pair and its version at once; MULTI adds the name set.
            pipe = r.pipeline(transaction=True)
            pipe.hset(key, mapping={
                "chain": chain_pem, "key": key_pem, "version": version, "names": member})
            pipe.sadd(_CERTNAMES, member)
            pipe.execute()

        self._run(f"write {key}", write)

    def stored_names(self) -> list[tuple[str, ...]]:
        members = self._run(f"read {_CERTNAMES}", lambda r: r.smembers(_CERTNAMES))
        if not isinstance(members, set):
            raise self._fail(f"{_CERTNAMES}: not a set")
        found = []
        for member in members:
            try:
                names = tuple(_ascii(member, _CERTNAMES, 1 << 16).split("\n"))
                cert_id(names)
            except (StorageError, ValueError):
                continue  # not a name set of ours: ignored, as the directory backend does
            found.append(names)
        return sorted(found)

    # --- locks -------------------------------------------------------------------------

    def try_lock(self, names: Sequence[str], stale_after: float) -> _RedisLock | None:
        key = f"{PREFIX}lock:{cert_id(names)}"
        ttl_ms = max(1, round(stale_after * 1000))
        for attempt in range(2):
            value = (f"{os.getpid()} {socket.gethostname()} {time.time():.9f} "
                     f"{secrets.token_hex(6)}")
            if self._run(f"lock {key}", lambda r, v=value: r.set(key, v, nx=True, px=ttl_ms)):
                return _RedisLock(self, key, value, ttl_ms)
            if attempt:
                return None
            held = self._run(f"read {key}", lambda r: r.get(key))
            if held is None:
                continue  # expired or released meanwhile: try again
            if not isinstance(held, bytes) or not _holder_gone(held):
                return None
            # Its holder is a dead process of this host: broken at once, compared first so
            # that a lock another breaker took meanwhile stays.
            self._run(f"break {key}", lambda r, v=held: r.eval(_RELEASE, 1, key, v))
        return None

    # --- challenges --------------------------------------------------------------------

    def publish_challenge(self, challenge: Challenge) -> None:
        key = _challenge_key(challenge)
        data = challenge.key_authorization.encode("ascii")
        if len(data) > _ANSWER_CAP:
            raise ValueError("key authorization over 1 KiB")
        self._run(f"write {key}", lambda r: r.set(key, data, ex=CHALLENGE_TTL))

    def withdraw_challenge(self, challenge: Challenge) -> None:
        key = _challenge_key(challenge)
        self._run(f"delete {key}", lambda r: r.delete(key))

    def _answer(self, key: str | None) -> str | None:
        if key is None:
            return None
        value = self._run(f"read {key}", lambda r: r.get(key))
        if value is None:
            return None
        return _checked(lambda: _ascii(value, key, _ANSWER_CAP), self)

    def http01(self, token: str) -> str | None:
        return self._answer(http01_key(token))

    def tls_alpn01(self, name: str) -> str | None:
        return self._answer(tls_alpn01_key(name))


def _checked(call: Any, storage: RedisStorage) -> str:
    """``call()``, its StorageError prefixed with the server."""
    try:
        result: str = call()
    except StorageError as exc:
        raise storage._fail(str(exc)) from exc
    return result


MAX_LOOKUPS = 8  # Redis lookups in flight per worker (RedisChallenges)
MAX_WAITING = 256  # lookups waiting for one of those; past it, a miss


class RedisChallenges:
    """``ChallengeSource`` on ``redis.asyncio``: a worker's challenge reads, which must not
    block its event loop. Never raises: a failure is a miss (None) and a log line at most
    once a second."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.target = parse_url(url)  # ValueError for a bad URL, at once
        self.timeout = timeout
        self._client: redis.asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._throttle = Throttle()  # a Redis that is down fails every read: one line a second
        # Lookups anyone can cause (a challenge hello, a GET on port 80): a few Redis
        # connections at most per worker, the rest wait their turn (within the timeout), and
        # past MAX_WAITING a lookup is a miss: a flood on a slow Redis costs it nothing more.
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None

    def _get_client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # Made in the loop that uses it: a pool's connections belong to one loop.
            self._client = redis.asyncio.Redis(
                **self.target.client_options(self.timeout),
                retry=AsyncRetry(NoBackoff(), 0),
                retry_on_error=[],
            )
            self._loop = loop
            self._slots = asyncio.Semaphore(MAX_LOOKUPS)
        return self._client

    async def _get(self, key: str | None) -> str | None:
        if key is None or self._waiting >= MAX_WAITING:
            return None
        self._get_client()  # (re)made for this loop, with its semaphore
        assert self._slots is not None
        self._waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            return None
        finally:
            self._waiting -= 1
        try:
            return await self._lookup(key)
        finally:
            self._slots.release()

    async def _lookup(self, key: str) -> str | None:
        try:
            client = self._get_client()
            value = await asyncio.wait_for(client.get(key), self.timeout)
            if value is None:
                return None
            return _ascii(value, key, _ANSWER_CAP)
        except (TimeoutError, redis.RedisError, OSError, StorageError, ValueError) as exc:
            why = str(exc) if isinstance(exc, StorageError) else reason(exc, self.timeout)
            suffix = self._throttle.allow("read")
            if suffix is not None:
                diag.warning("redis %s: cannot read challenge answer %s: %s%s",
                             self.target.where, key, why, suffix)
            return None

    async def http01(self, token: str) -> str | None:
        return await self._get(http01_key(token))

    async def tls_alpn01(self, name: str) -> str | None:
        return await self._get(tls_alpn01_key(name))

    async def close(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
