"""Certificates: the test CA (trustme), leaves written to disk for sniport's configs, server
and client SSL contexts, and fingerprints to compare what a client saw with a file."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Pki:
    """The session's CA (the ``pki`` fixture) and the directory it writes into."""

    ca: trustme.CA
    dir: Path

    def cert(self, *names: str, directory: Path | None = None,
             rsa: bool = False) -> tuple[Path, Path]:
        """A leaf for ``names`` signed by the CA: (chain PEM path, key PEM path), written
        under ``directory`` (default: the shared pki dir; a module that writes a name other
        modules also use passes its own), ECDSA unless ``rsa``."""
        leaf = self.ca.issue_cert(*names, key_type=trustme.KeyType.RSA if rsa else
                                  trustme.KeyType.ECDSA)
        stem = re.sub(r"[^a-z0-9.-]", "_", names[0].lower()) + ("-rsa" if rsa else "")
        where = self.dir if directory is None else directory
        where.mkdir(parents=True, exist_ok=True)
        chain, key = where / f"{stem}.pem", where / f"{stem}.key"
        chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return chain, key

    @property
    def ca_file(self) -> Path:
        path = self.dir / "ca.pem"
        if not path.exists():
            path.write_bytes(self.ca.cert_pem.bytes())
        return path

    def client_context(self, *, check_hostname: bool = True,
                       alpn: Sequence[str] | None = None) -> ssl.SSLContext:
        """Verifies the chain against the test CA always; the host name unless told not to."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.check_hostname = check_hostname
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


def insecure_client_context() -> ssl.SSLContext:
    """A client context that verifies nothing (self-signed and foreign certificates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    """A server context for a (chain, key) pair, e.g. from ``Pki.cert``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


def pem_fingerprint(pem: str | bytes) -> str:
    """SHA-256 of the first certificate in a PEM text, as hex."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    assert m, "no certificate in the PEM text"
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def peer_der(sock: socket.socket | ssl.SSLObject) -> bytes:
    """The certificate the server presented on a TLS socket, DER."""
    assert isinstance(sock, ssl.SSLSocket | ssl.SSLObject), "not a TLS connection"
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def peer_dns_names(tls: ssl.SSLSocket) -> list[str]:
    """The DNS names in the subjectAltName of the (verified) server certificate."""
    cert = tls.getpeercert()
    assert cert is not None
    return [str(entry[1]) for entry in cert.get("subjectAltName", ())
            if isinstance(entry, tuple) and entry[0] == "DNS"]
