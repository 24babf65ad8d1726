"""A worker's answers to ACME challenges (RFC 8555 section 8), read from the storage.

Job: give the key authorization of a pending HTTP-01 token, and a one-off TLS context for
a pending TLS-ALPN-01 challenge (RFC 8737), to whichever worker the CA reaches. The ACME
service publishes a challenge in the storage before it tells the CA to validate, so every
worker (and, with shared storage, every instance) can answer it at once: nothing is pushed
to workers, they look when a challenge arrives.

Rules:
- Only reads: workers that dropped their privileges read the storage's challenge answers,
  which are not secret (a key authorization is what the CA fetches in the clear). Reads
  are async (``ChallengeSource``): a local file for the directory storage, a bounded Redis
  call for a shared one; a failure is a miss, never an exception.
- The TLS-ALPN-01 context offers exactly ``acme-tls/1`` (RFC 8737 section 4: the
  handshake must negotiate it) and serves the challenge certificate for that one name,
  built when first asked and kept while the same key authorization is pending.
"""

from __future__ import annotations

import ssl

from sniport.certs.storage import ChallengeSource
from sniport.net.tls import context_from_pem
from sniport.wire.acme import ACME_TLS_ALPN, tls_alpn01_certificate

CACHE = 64  # challenge contexts kept per worker (names being validated at the same time)


class ChallengeAnswers:
    def __init__(self, source: ChallengeSource) -> None:
        self._source = source
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}

    async def http01(self, token: str) -> str | None:
        return await self._source.http01(token)

    async def tls_alpn01(self, name: str) -> ssl.SSLContext | None:
        """The context answering the TLS-ALPN-01 challenge pending for ``name``, or None."""
        key_auth = await self._source.tls_alpn01(name)
        if key_auth is None:
            return None
        ctx = self._contexts.get((name, key_auth))
        if ctx is None:
            if len(self._contexts) >= CACHE:
                self._contexts.clear()
            cert_pem, key_pem = tls_alpn01_certificate(name, key_auth)
            # No session tickets: a validation is one handshake, never resumed.
            ctx = context_from_pem(cert_pem, key_pem, tickets=False, alpn=[ACME_TLS_ALPN])
            self._contexts[(name, key_auth)] = ctx
        return ctx
