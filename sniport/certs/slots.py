"""The certificate a site serves, as one replaceable slot.

Job: hold the ``ssl.SSLContext`` that new handshakes of one or more sites use, and replace
it in place when the certificate behind it changes (a file rewritten, an ACME renewal), in
the master and in every worker, without a reload (DESIGN.md "Certificates").

Rules:
- A swap replaces the context object; connections already established keep the SSL object
  they were made with, so they go on untouched, and the next handshake uses the new one.
- The new context takes the session-ticket keys of the one it replaces: tickets issued
  before the swap still resume, on every worker.
- Sites that share a certificate share a slot per ALPN list (``http2``); ``source`` names
  where the certificate comes from, so that one update reaches every slot it feeds.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Sequence

from sniport.net.tls import CertInfo, context_from_descriptor


def source_key(source: str) -> str:
    """A short name for ``source`` in control messages (a source lists every name of an
    ACME certificate: up to 100, too long for one message)."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def file_source(cert: str, key: str) -> str:
    return f"file:{cert}\0{key}"


def acme_source(names: Sequence[str]) -> str:
    return "acme:" + ",".join(sorted(set(names)))


class CertSlot:
    __slots__ = ("context", "hosts", "http2", "info", "key", "kind", "source", "stand_in",
                 "temporary", "tickets", "version")

    def __init__(self, source: str, kind: str, context: ssl.SSLContext, info: CertInfo | None,
                 *, http2: bool, tickets: bool, version: str = "",
                 temporary: bool = False, stand_in: str = "") -> None:
        self.source = source  # file_source() / acme_source() / "self-signed:SITE"
        self.key = source_key(source)
        self.kind = kind  # "file", "acme" or "self-signed", for status
        self.context = context
        self.info = info
        self.http2 = http2
        self.tickets = tickets
        self.version = version  # the source's version of what is loaded
        self.temporary = temporary  # an ACME site's stand-in until its own is obtained:
        self.stand_in = stand_in  # "self-signed", or the certificate of its former hosts
        self.hosts: list[str] = []  # of the sites it serves

    def swap(self, fd: int, info: CertInfo | None, version: str) -> None:
        """Load the certificate and key in ``fd`` (``net.tls.pem_descriptor``) and serve it
        from the next handshake on. Raises TlsError (and changes nothing) if it cannot."""
        self.context = context_from_descriptor(fd, tickets=self.tickets, http2=self.http2,
                                               tickets_from=self.context)
        if info is not None:  # workers are not told: status is the master's
            self.info = info
        self.version = version
        self.temporary = False
        self.stand_in = ""
