"""The directory backend of ``Storage``: ACME state as plain files under one path.

Job: keep the account keys, the certificates obtained, the per-certificate locks and the
pending challenge answers in a directory that the ACME service writes and every worker
(privileges dropped) can read the challenge answers from.

Layout::

    {path}/                         0755  workers must traverse it to reach challenges/
      accounts/                     0700
        <sha256(directory_url)[:16]>.key   account key PEM (PKCS8, EC P-256), 0600
      certificates/                 0700
        <id>/                       0700
          bundle.pem                0600, the key then the chain (leaf first): one file, so
                                    one rename replaces the pair
          fullchain.pem             0644, the chain alone, for people and other tools
      challenges/                   0755  read by the workers
        http-01/<token>             0644, the key authorization (ascii)
        tls-alpn-01/<name>          0644, the key authorization
      locks/                        0700
        <id>.lock                   created O_CREAT|O_EXCL; content "pid host time"

``<id>`` is the first of the sorted names made path-safe (``*`` becomes ``_wildcard_``,
cut to 200 characters) + "-" + sha256 of the sorted, de-duplicated names joined by "\\n",
first 12 hex digits: readable for an operator, unique by the hash, independent of order.

Rules:
- The constructor, ``problem()``, ``http01()`` and ``tls_alpn01()`` create nothing: workers
  and ``check`` call them. Writers create the layout on first use (``ensure()``), with
  mkdir then chmod so the umask does not decide the modes.
- Every file is written beside its final name (a unique temp file, O_EXCL, its final mode),
  fsynced, then renamed over it, and the directory is fsynced: a crash leaves the old file
  or the new one, never half of one.
- An account key is never replaced: a new one is linked into place (fails if one appeared
  meanwhile, then that one is used) and a corrupt one raises (replacing it loses the account).
- A certificate and its key are saved as one file (``bundle.pem``), so a reader, or a
  crash between two writes, can never pair a new chain with an old key; a reader still
  checks that the key matches the leaf (a bundle damaged by hand is refused).
- A lock is removed (released, or broken when stale) by renaming it to a unique name first
  and checking its content there: two breakers cannot both win, and nobody deletes a lock
  that another process took in the meantime (it is linked back).
- Names and tokens are validated before they become file names: no path traversal.
- Reading challenge answers never raises (a worker logs a miss) and reads at most 1 KiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sniport.certs.storage import StorageError, StoredCertificate
from sniport.wire.acme import Challenge, generate_key, valid_token

# A lowercase DNS name (RFC 1035 section 2.3.1 with digits first allowed, RFC 1123 2.1).
_NAME = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z"
)
_DIR_MODES = {  # relative path -> mode, parents first
    "": 0o755,
    "accounts": 0o700,
    "certificates": 0o700,
    "challenges": 0o755,
    "challenges/http-01": 0o755,
    "challenges/tls-alpn-01": 0o755,
    "locks": 0o700,
}
_CHALLENGE_TYPES = ("http-01", "tls-alpn-01")
_ANSWER_CAP = 1024  # a key authorization is ~87 bytes; more is not ours
_PEM_CAP = 1 << 20  # a chain is a few KiB
_READ_RETRIES = (0.01, 0.02, 0.05, 0.1, 0.2)  # ~0.4 s: covers a writer between two renames


def valid_name(name: str) -> bool:
    """A lowercase DNS name without wildcard: safe as one path component."""
    return _NAME.match(name) is not None


def cert_id(names: Sequence[str]) -> str:
    """The directory name of the certificate for ``names`` (order and duplicates ignored)."""
    unique = sorted(set(names))
    if not unique:
        raise ValueError("a certificate needs at least one name")
    for name in unique:
        if not valid_name(name.removeprefix("*.")):
            raise ValueError(f"not a lowercase DNS name: {name!r}")
    digest = hashlib.sha256("\n".join(unique).encode("ascii")).hexdigest()[:12]
    # Cut: a 253-character name plus the suffix would pass NAME_MAX (255); the hash is unique.
    readable = unique[0].replace("*", "_wildcard_")[:200]
    return f"{readable}-{digest}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: str, data: bytes, mode: int) -> str:
    """``data`` in a new unique file beside ``path``, fsynced; returns its name."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    try:
        tmp = _write_temp(path, data, mode)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {_reason(exc)}") from exc


def _read_capped(path: str, cap: int) -> bytes:
    """At most ``cap`` bytes; OSError as the OS says, ValueError if there is more."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"over {cap} bytes")
    return data


def _stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat {path}: {_reason(exc)}") from exc
    return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"


def _remove_if(path: str, content: bytes) -> bool:
    """Remove ``path`` if it holds ``content``. Renamed aside first, so that a check and an
    unlink by name cannot hit a file another process put there in between; a file that turns
    out not to be the one meant is linked back (unless yet another one appeared)."""
    aside = f"{path}.{os.getpid()}.{secrets.token_hex(6)}.gone"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        with open(aside, "rb") as f:
            ours = f.read(_ANSWER_CAP) == content
        if not ours:
            # If a third process took the free name meanwhile, the moved lock's holder lost it.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        return ours
    finally:
        os.unlink(aside)


class _FileLock:
    """A held ``locks/<id>.lock``; implements ``CertLock``."""

    def __init__(self, path: str, content: bytes) -> None:
        self._path = path
        self._content = content
        self._released = False

    def refresh(self) -> None:
        # Touching a lock that another process took over (ours was judged stale) would keep
        # theirs alive for the wrong reason; raising tells our driver to stop ordering.
        try:
            with open(self._path, "rb") as f:
                if f.read(_ANSWER_CAP) != self._content:
                    raise StorageError(f"lock {self._path} was taken over by another process")
            os.utime(self._path)
        except OSError as exc:
            raise StorageError(f"cannot refresh lock {self._path}: {_reason(exc)}") from exc

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            _remove_if(self._path, self._content)
        except OSError as exc:
            raise StorageError(f"cannot release lock {self._path}: {_reason(exc)}") from exc


class DirectoryStorage:
    """``Storage`` in a directory (layout in the module docstring)."""

    def __init__(self, path: str) -> None:
        # No I/O: workers construct this only to read challenge answers.
        self.path = path
        self.description = path
        self._ensured = False

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # --- setup and checks --------------------------------------------------------------

    def ensure(self) -> None:
        """Create the layout with its modes (existing directories get their modes too)."""
        for rel, mode in _DIR_MODES.items():
            path = self._p(rel) if rel else self.path
            try:
                os.makedirs(path, exist_ok=True)
                os.chmod(path, mode)  # after mkdir: the umask must not decide
            except OSError as exc:
                raise StorageError(f"cannot create {path}: {_reason(exc)}") from exc
        self._ensured = True

    def _ready(self) -> None:
        if not self._ensured:
            self.ensure()

    def problem(self) -> str | None:
        path = os.path.abspath(self.path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return _creatable(path)
        except NotADirectoryError:
            return _creatable(path)  # a file somewhere above: found and named there
        except OSError as exc:
            return f"{path}: {_reason(exc)}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        for rel in _DIR_MODES:
            sub = os.path.join(path, rel) if rel else path
            if not os.path.lexists(sub):
                continue  # made by ensure(): the parent was checked writable
            if not os.path.isdir(sub):
                return f"{sub} is not a directory"
            if not os.access(sub, os.W_OK | os.X_OK):
                return f"{sub} is not writable"
        return None

    # --- account keys ------------------------------------------------------------------

    def account_key(self, directory_url: str) -> ec.EllipticCurvePrivateKey:
        name = hashlib.sha256(directory_url.encode("utf-8")).hexdigest()[:16] + ".key"
        path = self._p("accounts", name)
        try:
            return _load_account_key(path, _read_capped(path, _PEM_CAP))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot read account key {path}: {_reason(exc)}") from exc
        except (ValueError, TypeError) as exc:
            # Never replaced: a new key is a new ACME account, the old one would be lost.
            raise StorageError(f"corrupt account key {path}: {exc}") from exc
        self._ready()
        key = generate_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            tmp = _write_temp(path, pem, 0o600)
            try:
                # link, not replace: another process may have made (and used) one meanwhile.
                os.link(tmp, path)
            except FileExistsError:
                return self.account_key(directory_url)
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise StorageError(f"cannot write account key {path}: {_reason(exc)}") from exc
        return key

    # --- certificates ------------------------------------------------------------------

    def _cert_paths(self, names: Sequence[str]) -> tuple[str, str]:
        base = self._p("certificates", cert_id(names))
        return os.path.join(base, "bundle.pem"), os.path.join(base, "fullchain.pem")

    def certificate_version(self, names: Sequence[str]) -> str | None:
        return _stamp(self._cert_paths(names)[0])

    def load_certificate(self, names: Sequence[str]) -> StoredCertificate | None:
        bundle_path = self._cert_paths(names)[0]
        for _ in range(3):
            before = _stamp(bundle_path)
            if before is None:
                return None
            try:
                bundle = _read_capped(bundle_path, 2 * _PEM_CAP)
            except FileNotFoundError:
                continue  # replaced meanwhile: read the new one
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot read {bundle_path}: {exc}") from exc
            if _stamp(bundle_path) != before:
                continue  # replaced while read: the rename is atomic, read again
            key_pem, chain_pem = _split_bundle(bundle)
            if not _matches(chain_pem, key_pem, bundle_path):
                raise StorageError(f"{bundle_path}: the private key does not match the "
                                   "certificate")
            return StoredCertificate(chain_pem, key_pem, before)
        raise StorageError(f"{bundle_path}: changed while being read, three times")

    def save_certificate(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None:
        bundle_path, chain_path = self._cert_paths(names)
        self._ready()
        folder = os.path.dirname(bundle_path)
        try:
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o700)
        except OSError as exc:
            raise StorageError(f"cannot create {folder}: {_reason(exc)}") from exc
        # One file, one rename: the pair changes at once or not at all.
        _write_atomic(bundle_path, key_pem.rstrip(b"\n") + b"\n" + chain_pem, 0o600)
        _write_atomic(chain_path, chain_pem, 0o644)

    def stored_names(self) -> list[tuple[str, ...]]:
        """From each certificate's public ``fullchain.pem`` (its leaf's DNS names)."""
        found = []
        try:
            folders = sorted(os.listdir(self._p("certificates")))
        except OSError:
            return []
        for folder in folders:
            try:
                leaf = x509.load_pem_x509_certificate(_read_capped(
                    self._p("certificates", folder, "fullchain.pem"), _PEM_CAP))
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except (OSError, ValueError, x509.ExtensionNotFound):
                continue  # not a certificate of ours: ignored
            found.append(tuple(sorted(san.value.get_values_for_type(x509.DNSName))))
        return found

    # --- locks -------------------------------------------------------------------------

    def try_lock(self, names: Sequence[str], stale_after: float) -> _FileLock | None:
        path = self._p("locks", cert_id(names) + ".lock")
        self._ready()
        try:
            for attempt in range(2):
                content = f"{os.getpid()} {socket.gethostname()} {time.time_ns() / 1e9:.9f}"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    pass
                else:
                    try:
                        os.write(fd, content.encode("utf-8"))
                    finally:
                        os.close(fd)
                    return _FileLock(path, content.encode("utf-8"))
                if attempt:
                    return None
                try:
                    # Age and content from one open file: judged by name in two steps, they
                    # could come from two different locks.
                    with open(path, "rb") as f:
                        mtime = os.fstat(f.fileno()).st_mtime
                        held = f.read(_ANSWER_CAP)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if time.time() - mtime < stale_after and not _holder_gone(held):
                    return None
                _remove_if(path, held)  # only the stale one we judged: a fresh one stays
        except OSError as exc:
            raise StorageError(f"cannot lock {path}: {_reason(exc)}") from exc
        return None

    # --- challenges --------------------------------------------------------------------

    def _challenge_path(self, ch: Challenge) -> str:
        if ch.type == "http-01":
            if not valid_token(ch.token):
                raise ValueError(f"not a base64url token: {ch.token!r}")
            return self._p("challenges", "http-01", ch.token)
        if ch.type == "tls-alpn-01":
            if not valid_name(ch.name):
                raise ValueError(f"not a lowercase DNS name: {ch.name!r}")
            # One pending per name: the TLS handshake only tells us the name (RFC 8737 s. 3).
            return self._p("challenges", "tls-alpn-01", ch.name)
        raise ValueError(f"unknown challenge type {ch.type!r}")

    def publish_challenge(self, challenge: Challenge) -> None:
        path = self._challenge_path(challenge)
        data = challenge.key_authorization.encode("ascii")
        if len(data) > _ANSWER_CAP:
            raise ValueError("key authorization over 1 KiB")
        self._ready()
        _write_atomic(path, data, 0o644)

    def withdraw_challenge(self, challenge: Challenge) -> None:
        path = self._challenge_path(challenge)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {_reason(exc)}") from exc

    def http01(self, token: str) -> str | None:
        if not valid_token(token):
            return None
        return _answer(self._p("challenges", "http-01", token))

    def tls_alpn01(self, name: str) -> str | None:
        if not valid_name(name):
            return None
        return _answer(self._p("challenges", "tls-alpn-01", name))

    def close(self) -> None:
        """Nothing held open between calls."""


def _answer(path: str) -> str | None:
    try:
        return _read_capped(path, _ANSWER_CAP).decode("ascii")
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _creatable(path: str) -> str | None:
    """Whether ``path`` could be created, judged from its first existing ancestor."""
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            if parent == os.path.dirname(parent):
                return f"cannot create {path}: no existing parent"
            parent = os.path.dirname(parent)
            continue
        except OSError as exc:
            return f"cannot create {path}: {parent}: {_reason(exc)}"
        if not stat.S_ISDIR(st.st_mode):
            return f"cannot create {path}: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create {path}: {parent} is not writable"
        return None


def _load_account_key(path: str, pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an EC P-256 key")
    return key


def _split_bundle(bundle: bytes) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) of a ``bundle.pem``: the private key block, then the rest."""
    end = b"PRIVATE KEY-----"
    at = bundle.find(end, bundle.find(end) + len(end))  # the key's END line
    if at < 0:
        return b"", bundle
    cut = at + len(end)
    return bundle[:cut] + b"\n", bundle[cut:].lstrip(b"\n")


def _holder_gone(held: bytes) -> bool:
    """The lock names a process of this host that no longer exists (it died mid-order,
    e.g. SIGKILLed): stale at once, not after ``stale_after``."""
    parts = held.decode("utf-8", "replace").split()
    if len(parts) < 2 or parts[1] != socket.gethostname() or not parts[0].isdigit():
        return False
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _matches(chain_pem: bytes, key_pem: bytes, where: str) -> bool:
    """Whether the key is the leaf's; unparsable PEM is corrupt, not a race (writes are atomic)."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{where}: corrupt certificate or key: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(leaf.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))
