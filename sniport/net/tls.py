"""TLS server contexts for terminated sites, and self-signed certificates for development.

Job: build one ``ssl.SSLContext`` per certificate, once per config load, with the settings
every site gets; check that a key matches its certificate and which host names a certificate
covers; generate, cache and reuse a self-signed certificate for ``tls = "self-signed"``.

Rules:
- TLS 1.2 and 1.3 only; for 1.2 only forward-secret AEAD ciphers (ECDHE), the Mozilla
  "intermediate" profile without its DHE suites (they need a DH parameter file).
- Key exchange groups X25519, P-256, P-384, as Mozilla's intermediate profile (OpenSSL would
  also offer X448 and P-521, which auditors flag); the stdlib has no API for the list, so it
  is set through OpenSSL itself (``_ssl_ctx_call``), checked, and warned about if it fails.
- ALPN offers ``h2`` then ``http/1.1`` (RFC 7301; the server's order decides), or
  ``http/1.1`` only for a site with ``http2 = false``. The TLS 1.2 suites are all ECDHE
  with AEAD, as RFC 9113 section 9.2.2 requires for HTTP/2.
- Session resumption on unless ``tls_session_tickets = false``; then no tickets at all,
  including TLS 1.3 (``num_tickets = 0``: OpenSSL 3 issues tickets unless told not to).
- Certificates are matched to names as RFC 6125 section 6.4.3 says: a wildcard covers exactly
  one leftmost label.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Mozilla "intermediate" (https://ssl-config.mozilla.org/), ECDHE suites; TLS 1.3 suites are
# OpenSSL's defaults, all of them AEAD and forward secret.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
GROUPS = b"X25519:P-256:P-384"
SELF_SIGNED_DAYS = 365
SELF_SIGNED_RENEW_DAYS = 30


class TlsError(Exception):
    pass


def base_context(*, tickets: bool = True, http2: bool = True,
                 alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server context with every setting of the module's rules and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(alpn or (["h2", "http/1.1"] if http2 else ["http/1.1"]))
    _set_groups(ctx)
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        _session_cache_off(ctx)
    return ctx


def server_context(cert: str, key: str, *, tickets: bool = True,
                   http2: bool = True) -> ssl.SSLContext:
    ctx = base_context(tickets=tickets, http2=http2)
    unreadable = [f"{p}: {why}" for p in (cert, key) if (why := _unreadable(p))]
    if unreadable:
        raise TlsError("; ".join(f"cannot read {what}" for what in unreadable))
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(f"the key {key} does not match the certificate {cert}") from None
        raise TlsError(f"cannot load {cert} / {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename or cert}: "
                       f"{(exc.strerror or str(exc)).lower()}") from None
    return ctx


def pem_descriptor(chain_pem: bytes, key_pem: bytes) -> int:
    """A memory file (memfd) holding the chain and then the key: how a certificate travels
    from the master, which may read keys, to workers, which dropped the privilege to (the
    descriptor is passed over the control socket; nothing touches the disk)."""
    fd = os.memfd_create("sniport-cert", os.MFD_CLOEXEC)
    try:
        data = chain_pem.rstrip(b"\n") + b"\n" + key_pem
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        os.close(fd)
        raise
    return fd


def context_from_descriptor(fd: int, *, tickets: bool = True, http2: bool = True,
                            alpn: list[str] | None = None,
                            tickets_from: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """A server context whose certificate and key are read from ``fd`` (``pem_descriptor``).
    ``tickets_from``: the context it replaces, whose session-ticket keys it takes, so that
    sessions resume across the swap and on every worker (forked workers share the keys of
    the contexts the master built)."""
    ctx = base_context(tickets=tickets, http2=http2, alpn=alpn)
    try:
        # /proc/self/fd/N is this process's own descriptor: readable after a privilege drop.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise TlsError(f"cannot load the certificate: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsError(f"cannot read the certificate: {exc.strerror or exc}") from None
    if tickets_from is not None and tickets:
        copy_ticket_keys(tickets_from, ctx)
    return ctx


def context_from_pem(chain_pem: bytes, key_pem: bytes, **kwargs: Any) -> ssl.SSLContext:
    fd = pem_descriptor(chain_pem, key_pem)
    try:
        return context_from_descriptor(fd, **kwargs)
    finally:
        os.close(fd)


_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_TICKET_KEYS_SIZE = 80  # OpenSSL: 16 bytes name, 32 HMAC secret, 32 AES key


def copy_ticket_keys(src: ssl.SSLContext, dst: ssl.SSLContext) -> bool:
    """``dst`` encrypts and accepts session tickets with ``src``'s keys (False, and a debug
    line, if OpenSSL cannot be reached: resumption then starts over for the new context)."""
    import ctypes

    keys = ctypes.create_string_buffer(_TICKET_KEYS_SIZE)
    try:
        if _ssl_ctx_call(src, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, _TICKET_KEYS_SIZE, keys) != 1:
            raise RuntimeError("cannot read the ticket keys")
        if _ssl_ctx_call(dst, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, _TICKET_KEYS_SIZE, keys) != 1:
            raise RuntimeError("cannot set the ticket keys")
    except RuntimeError as exc:
        from sniport.logs import diag

        diag.debug("session ticket keys not carried over: %s", exc)
        return False
    return True


@dataclass(frozen=True)
class CertInfo:
    """What ``status`` and the swap checks need to know about a certificate."""

    names: list[str]
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime


def check_pair(chain_pem: bytes, key_pem: bytes, *,
               now: datetime.datetime | None = None) -> CertInfo:
    """The leaf of ``chain_pem`` if ``key_pem`` is its key and it is valid now; else
    TlsError saying why (a swap keeps the old certificate then)."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise TlsError(f"no PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"no usable PEM private key: {exc}") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise TlsError("the key does not match the certificate")
    info = cert_info(leaf)
    now = now or datetime.datetime.now(datetime.UTC)
    if info.not_after <= now:
        raise TlsError(f"the certificate expired on {info.not_after:%Y-%m-%d %H:%M} UTC")
    if info.not_before > now + datetime.timedelta(minutes=5):
        raise TlsError(f"the certificate is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC")
    return info


def cert_info(leaf: x509.Certificate) -> CertInfo:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in
                 leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return CertInfo(names, leaf.issuer.rfc4514_string(), leaf.not_valid_before_utc,
                    leaf.not_valid_after_utc)


def _unreadable(path: str) -> str:
    """Why ``path`` cannot be read as a PEM file ("" if it can be tried)."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "is a directory, not a PEM file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return ""


_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_SESS_CACHE_OFF = 0


def _ssl_ctx_call(ctx: ssl.SSLContext, cmd: int, larg: int, parg: Any) -> int:
    """``SSL_CTX_ctrl(ctx, cmd, larg, parg)`` on the SSL_CTX behind ``ctx``.

    The stdlib has no API for a few settings, so this reaches the SSL_CTX behind the
    SSLContext (the first field after the object header, in CPython's _ssl.c) and checks it
    is the right pointer by reading the options back through OpenSSL before changing
    anything. Raises RuntimeError (and changes nothing) if the check fails."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            lib = next(line.split()[-1] for line in maps if "libssl.so" in line)
        libssl = ctypes.CDLL(lib)
        libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
        libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        libssl.SSL_CTX_ctrl.restype = ctypes.c_long
        # parg: bytes, a ctypes buffer (written by the GET controls) or None.
        libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                        ctypes.c_void_p]
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    except (StopIteration, OSError, AttributeError, ValueError) as exc:
        raise RuntimeError(str(exc)) from None
    if not pointer or libssl.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise RuntimeError("SSL_CTX not found where expected")
    return int(libssl.SSL_CTX_ctrl(pointer, cmd, larg, parg))


def _session_cache_off(ctx: ssl.SSLContext) -> None:
    """No TLS 1.2 session-ID resumption either: SSL_CTX_set_session_cache_mode(OFF)."""
    try:
        _ssl_ctx_call(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    except RuntimeError as exc:
        from sniport.logs import diag

        diag.warning("tls_session_tickets = false: TLS 1.2 session IDs may still resume "
                     "(cannot turn the session cache off: %s)", exc)


def _set_groups(ctx: ssl.SSLContext) -> None:
    """SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384"): returns 1 on success."""
    try:
        if _ssl_ctx_call(ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS) != 1:
            raise RuntimeError("OpenSSL refused the list")
    except RuntimeError as exc:
        from sniport.logs import diag

        diag.warning("TLS groups: cannot limit them to %s (%s); OpenSSL's defaults apply",
                     GROUPS.decode(), exc)


def covers(names: list[str], host: str) -> bool:
    """Whether a certificate with ``names`` is valid for ``host`` (itself maybe a wildcard)."""
    if host in names:
        return True
    if host.startswith("*."):
        return False  # only the same wildcard covers a wildcard host
    dot = host.find(".")
    return dot > 0 and f"*.{host[dot + 1:]}" in names


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/sniport")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sniport"


def self_signed(state_dir: Path, site: str, hosts: list[str]) -> tuple[str, str]:
    """A self-signed certificate for ``hosts``, generated once into ``state_dir`` and reused
    across restarts until it is within 30 days of expiry or the hosts change."""
    tag = hashlib.sha256("\n".join(sorted(hosts)).encode()).hexdigest()[:12]
    directory = state_dir / "self-signed"
    cert_path = directory / f"{site}-{tag}.pem"
    key_path = directory / f"{site}-{tag}.key"
    if cert_path.exists() and key_path.exists():
        try:
            leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
            leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        except (OSError, ValueError, x509.ExtensionNotFound):
            leaf = None  # unreadable, or made by a version without the key identifiers
        if leaf is not None:
            left = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if left > datetime.timedelta(days=SELF_SIGNED_RENEW_DAYS):
                return str(cert_path), str(key_path)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TlsError(f"cannot create {directory}: {exc.strerror}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sniport self-signed")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # RFC 5280 sections 4.2.1.1 and 4.2.1.2: strict validators want both identifiers,
        # even on a self-signed certificate (where they name the same key).
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    tmp_key = key_path.with_suffix(".key.tmp")
    tmp_cert = cert_path.with_suffix(".pem.tmp")
    # Written beside the final names, then renamed: a crash never leaves half a file.
    try:
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp_key, key_path)
        os.replace(tmp_cert, cert_path)
    except OSError as exc:
        raise TlsError(f"cannot write the self-signed certificate into {directory}: "
                       f"{exc.strerror}") from None
    return str(cert_path), str(key_path)
