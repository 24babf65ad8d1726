"""ACME (RFC 8555) protocol steps, sans-IO: keys, JWS, the order state machine, challenges.

Job: everything an ACME client computes, with no I/O at all. A driver (the next building
block: HTTP calls, storage, publishing challenges, renewal timing) feeds an ``OrderMachine``
responses as plain data (status, headers, body bytes) and acts on the one outcome each call
returns: a ``Request`` to send, a ``Publish`` of a challenge, a ``Wait``, ``Done`` (chain and
key PEM) or ``Failed`` (a typed ``AcmeError``, with the server's problem document if any).

Rules:
- Nothing from the network raises: malformed JSON, missing fields, wrong types, bodies over
  ``MAX_BODY`` become ``Failed(AcmeError)`` naming what was wrong.
- Every response's Replay-Nonce is kept for the next request and every nonce is used once
  (RFC 8555 section 6.5). ``badNonce`` retries the same request with the fresh nonce, a bounded
  number of times (section 6.5).
- Polling honours Retry-After (section 7.5.1, 7.4), capped, and gives up after a bounded
  number of polls.
- The account key is EC P-256 and every JWS is ES256 (RFC 7518 section 3.4), flattened JSON
  serialization (RFC 8555 section 6.2); the signature is r||s, not DER.
- TLS-ALPN-01 challenge certificates (RFC 8737) are built here too: building a certificate is
  pure computation, and it belongs to the challenge's rules, not to a certificate source.

Why not josepy: josepy 2.x (certbot's JOSE library) now depends only on ``cryptography`` (1.x
pulled pyOpenSSL), and it does ES256 with the r||s conversion. But its ``Header`` supports only
the registered header names (its own docstring: "subclass and override from_json and
to_partial_json" for others), and ACME's ``nonce`` and ``url`` are exactly such names, so we
would subclass its JSON-field framework (certbot's ``acme`` package does) to save about forty
lines of ``json.dumps`` + ``decode_dss_signature``. One alg, one key type, one serialization
is less code than the adapter. The tests cross-check our thumbprint and JWS against values
josepy 2.2.0 computed.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

MAX_BODY = 1 << 20  # 1 MiB: a directory, order or chain is a few KiB; more is garbage or abuse
# RFC 8737 section 3: the acmeIdentifier extension (id-pe 31).
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACME_TLS_ALPN = "acme-tls/1"  # RFC 8737 section 6.2
HTTP01_PREFIX = "/.well-known/acme-challenge/"  # RFC 8555 section 8.3
PROBLEM_PREFIX = "urn:ietf:params:acme:error:"  # RFC 8555 section 6.7
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def b64u(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2, RFC 8555 section 6.1)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def valid_token(token: str) -> bool:
    """A challenge token is base64url characters only (RFC 8555 section 8.3 and 8.1); it ends
    up in a URL path and a file name, so anything else is refused."""
    return 0 < len(token) <= 256 and _B64URL.fullmatch(token) is not None


# --- keys, JWK, thumbprint -----------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _coord(value: int) -> str:
    # RFC 7518 section 6.2.1.2: x and y are the full 32 bytes for P-256, leading zeros kept.
    return b64u(value.to_bytes(32, "big"))


def jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a P-256 key (RFC 7517, RFC 7518 section 6.2)."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError("account key must be P-256")
    numbers = public_key.public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": _coord(numbers.x), "y": _coord(numbers.y)}


def thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 section 3: SHA-256 over the required members, keys sorted, no whitespace."""
    canonical = json.dumps(jwk(public_key), sort_keys=True, separators=(",", ":"))
    return b64u(hashlib.sha256(canonical.encode("ascii")).digest())


def key_authorization(token: str, public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 8555 section 8.1: token || '.' || base64url(thumbprint)."""
    return f"{token}.{thumbprint(public_key)}"


# --- JWS -----------------------------------------------------------------------------------


def jws(
    key: ec.EllipticCurvePrivateKey,
    payload: Mapping[str, object] | None,
    *,
    url: str,
    nonce: str,
    kid: str | None,
) -> bytes:
    """A flattened JSON JWS (RFC 7515 section 7.2.2) as ACME wants it (RFC 8555 section 6.2).

    ``payload`` None is POST-as-GET: the payload is the empty string (section 6.3). ``kid``
    None puts the ``jwk`` in the header (newAccount, revokeCert by certificate key; section
    6.2 says exactly one of the two).
    """
    protected: dict[str, object] = {"alg": "ES256", "nonce": nonce, "url": url}
    if kid is None:
        protected["jwk"] = jwk(key.public_key())
    else:
        protected["kid"] = kid
    p64 = b64u(json.dumps(protected, separators=(",", ":")).encode())
    body64 = "" if payload is None else b64u(json.dumps(payload, separators=(",", ":")).encode())
    der = key.sign(f"{p64}.{body64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    # RFC 7518 section 3.4: the signature is R and S as 32-byte big-endian integers, not DER.
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return json.dumps(
        {"protected": p64, "payload": body64, "signature": b64u(signature)},
        separators=(",", ":"),
    ).encode()


# --- certificates: CSR, TLS-ALPN-01, ARI ----------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(names: Sequence[str]) -> tuple[bytes, bytes]:
    """(CSR DER, key PEM): a new P-256 key per certificate, SANs = the names (RFC 8555 section
    7.4: the CSR's names must be exactly the order's identifiers)."""
    key = generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER), _key_pem(key)


def tls_alpn01_certificate(
    name: str, key_auth: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) answering a TLS-ALPN-01 challenge for ``name`` (RFC 8737
    section 3): self-signed, one dNSName SAN, and the critical acmeIdentifier extension whose
    extnValue is the DER OCTET STRING of SHA-256(key authorization)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = generate_key()
    digest = hashlib.sha256(key_auth.encode("ascii")).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))  # short: it lives one validation
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            # 0x04 = OCTET STRING, 0x20 = 32 bytes: extnValue is DER(OCTET STRING(digest)).
            x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest),
            critical=True,  # RFC 8737 section 3: MUST be critical
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def http01_path(token: str) -> str:
    """RFC 8555 section 8.3: where the key authorization is served over plain HTTP."""
    if not valid_token(token):
        raise ValueError(f"not a base64url token: {token!r}")
    return HTTP01_PREFIX + token


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 section 4.1: base64url(AKI keyIdentifier) '.' base64url(serial DER content).
    Raises ValueError for a certificate without an AKI keyIdentifier (our own input)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise ValueError("certificate has no Authority Key Identifier") from exc
    if aki.key_identifier is None:
        raise ValueError("Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # The DER INTEGER's content octets: two's complement, a leading 0x00 when the top bit is set.
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    return f"{b64u(aki.key_identifier)}.{b64u(serial_bytes)}"


def renewal_info_url(directory: Mapping[str, object], cert: x509.Certificate) -> str | None:
    """The renewalInfo URL for ``cert``, or None when the CA has no ARI (pebble has none)."""
    base = directory.get("renewalInfo")
    if not isinstance(base, str) or not base:
        return None
    return f"{base.rstrip('/')}/{ari_cert_id(cert)}"


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    start: datetime.datetime
    end: datetime.datetime
    explanation_url: str | None
    retry_after: float | None  # RFC 9773 section 4.3: when to ask again


# --- problems and errors ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """RFC 7807 problem document as ACME uses it (RFC 8555 section 6.7)."""

    type: str
    detail: str
    status: int | None = None
    identifier: str | None = None
    subproblems: tuple[Problem, ...] = ()

    @property
    def acme_type(self) -> str:
        """``badNonce`` for ``urn:ietf:params:acme:error:badNonce``, else the full type."""
        return self.type.removeprefix(PROBLEM_PREFIX)


class ErrorKind(Enum):
    PROBLEM = "problem"  # the server answered with an error status (problem attached if any)
    MALFORMED = "malformed"  # the server's answer is not what RFC 8555 says it is
    INVALID = "invalid"  # an authorization or the order became invalid
    TIMEOUT = "timeout"  # polled too many times
    UNSUPPORTED = "unsupported"  # no acceptable challenge offered, etc.
    BAD_NONCE = "bad_nonce"  # badNonce more times than we retry
    CONFIG = "config"  # our own input: a bad directory, no names


@dataclass(frozen=True, slots=True)
class AcmeError:
    kind: ErrorKind
    message: str
    problem: Problem | None = None
    retry_after: float | None = None  # seconds, when the server said (rateLimited, 503...)

    def __str__(self) -> str:
        text = f"{self.kind.value}: {self.message}"
        if self.problem is not None:
            text += f" [{self.problem.type}: {self.problem.detail}]"
            for sub in self.problem.subproblems:
                text += f" [{sub.identifier or '?'}: {sub.type}: {sub.detail}]"
        return text


def parse_problem(value: object) -> Problem | None:
    """A problem document from parsed JSON, None if it is not one. Lenient on optional members,
    strict on types: a non-string detail is dropped rather than trusted."""
    if not isinstance(value, dict):
        return None
    ptype = value.get("type")
    if not isinstance(ptype, str):
        return None
    detail = value.get("detail")
    status = value.get("status")
    ident = value.get("identifier")
    ident_value = ident.get("value") if isinstance(ident, dict) else None
    subs_raw = value.get("subproblems")
    subs = []
    if isinstance(subs_raw, list):
        for item in subs_raw[:100]:
            sub = parse_problem(item)
            if sub is not None:
                subs.append(sub)
    return Problem(
        type=ptype,
        detail=detail if isinstance(detail, str) else "",
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        identifier=ident_value if isinstance(ident_value, str) else None,
        subproblems=tuple(subs),
    )


def _json_object(body: bytes, what: str) -> dict[str, object] | AcmeError:
    if len(body) > MAX_BODY:
        return AcmeError(ErrorKind.MALFORMED, f"{what}: body over {MAX_BODY} bytes")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return AcmeError(ErrorKind.MALFORMED, f"{what}: not JSON")
    if not isinstance(value, dict):
        return AcmeError(ErrorKind.MALFORMED, f"{what}: not a JSON object")
    return value


def parse_retry_after(value: str | None, now: datetime.datetime) -> float | None:
    """RFC 9110 section 10.2.3: delay-seconds or an HTTP-date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value[:12]))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - now).total_seconds())


def _rfc3339(value: object) -> datetime.datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def parse_renewal_info(
    body: bytes, retry_after: str | None = None, now: datetime.datetime | None = None
) -> RenewalWindow | AcmeError:
    """RFC 9773 section 4.2: ``suggestedWindow`` {start, end} in RFC 3339, start before end."""
    obj = _json_object(body, "renewalInfo")
    if isinstance(obj, AcmeError):
        return obj
    window = obj.get("suggestedWindow")
    if not isinstance(window, dict):
        return AcmeError(ErrorKind.MALFORMED, "renewalInfo: suggestedWindow missing")
    start, end = _rfc3339(window.get("start")), _rfc3339(window.get("end"))
    if start is None or end is None:
        return AcmeError(ErrorKind.MALFORMED, "renewalInfo: start/end not RFC 3339 with offset")
    if end <= start:
        return AcmeError(ErrorKind.MALFORMED, "renewalInfo: window ends before it starts")
    expl = obj.get("explanationURL")
    now = now or datetime.datetime.now(datetime.UTC)
    return RenewalWindow(
        start, end, expl if isinstance(expl, str) else None, parse_retry_after(retry_after, now)
    )


# --- the order state machine -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response as the driver received it. Header names are matched case-insensitively;
    repeated headers (Link) are separate pairs."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Request:
    method: str  # "HEAD" or "POST" (RFC 8555 section 6.3: everything but newNonce is POST)
    url: str
    body: bytes | None
    purpose: str  # what it is for, for logs: "newNonce", "newAccount", "poll authz ..."
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Challenge:
    type: str  # "tls-alpn-01" or "http-01"
    name: str  # the identifier it proves
    url: str
    token: str
    key_authorization: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Make ``challenge`` answerable everywhere the CA may look, then call ``published()``."""

    challenge: Challenge


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``seconds``, then call ``waited()``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Done:
    chain_pem: bytes
    key_pem: bytes
    account_url: str
    order_url: str
    challenges: tuple[Challenge, ...]  # what was published, so the driver can remove it


@dataclass(frozen=True, slots=True)
class Failed:
    error: AcmeError


Outcome = Request | Publish | Wait | Done | Failed


@dataclass(slots=True)
class _Call:
    """A POST to be signed with whatever nonce is current; kept to resend on badNonce."""

    url: str
    payload: Mapping[str, object] | None
    purpose: str
    on_response: Callable[[Response], Outcome]
    use_jwk: bool = False
    accept_pem: bool = False
    bad_nonces: int = 0


def _str_field(obj: Mapping[str, object], key: str, what: str) -> str | AcmeError:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        return AcmeError(ErrorKind.MALFORMED, f"{what}: {key!r} missing or not a string")
    return value


@dataclass(slots=True)
class OrderMachine:
    """One certificate order from the directory to the chain (RFC 8555 section 7.1.1's flow).

    Each method returns the next ``Outcome``: ``start()`` first, then ``receive(response)``
    after a ``Request``, ``published()`` after a ``Publish``, ``waited()`` after a ``Wait``.
    After ``Done`` or ``Failed`` the machine is finished; every further call returns the same
    final outcome.
    """

    directory: Mapping[str, object]
    account_key: ec.EllipticCurvePrivateKey
    names: Sequence[str]
    email: str = ""
    challenges: Sequence[str] = ("tls-alpn-01", "http-01")
    replaces: str | None = None  # RFC 9773 section 5: the ARI id of the certificate renewed
    max_bad_nonce: int = 3
    default_poll: float = 1.0  # seconds between polls when the server gives no Retry-After
    max_wait: float = 60.0  # a Retry-After longer than this is capped
    max_polls: int = 60  # per authorization and for the order
    clock: Callable[[], datetime.datetime] = field(
        default=lambda: datetime.datetime.now(datetime.UTC)
    )

    _nonce: str | None = None
    _kid: str | None = None
    _order_url: str = ""
    _finalize_url: str = ""
    _authz: list[str] = field(default_factory=list)
    _authz_index: int = 0
    _polls: int = 0
    _finalized: bool = False
    _key_pem: bytes = b""
    _call: _Call | None = None  # the request in flight
    _after_nonce: _Call | None = None  # the call waiting for a fresh nonce
    _after_wait: _Call | None = None
    _challenge: Challenge | None = None
    _published: list[Challenge] = field(default_factory=list)
    _final: Done | Failed | None = None
    _expect: str = "start"  # which method the driver must call next

    # -- driver entry points --

    def start(self) -> Outcome:
        if self._expect != "start":
            return self._misuse("start")
        urls = {}
        for key in ("newNonce", "newAccount", "newOrder"):
            value = self.directory.get(key)
            if not isinstance(value, str) or not value.startswith("https://"):
                return self._fail(
                    AcmeError(ErrorKind.CONFIG, f"directory: {key!r} missing or not an https URL")
                )
            urls[key] = value
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            return self._fail(AcmeError(ErrorKind.CONFIG, "no names to order"))
        if not set(self.challenges) & {"tls-alpn-01", "http-01"}:
            return self._fail(AcmeError(ErrorKind.CONFIG, "no supported challenge type chosen"))
        payload: dict[str, object] = {"termsOfServiceAgreed": True}  # RFC 8555 section 7.3
        if self.email:
            payload["contact"] = [f"mailto:{self.email}"]
        return self._send(
            _Call(urls["newAccount"], payload, "newAccount", self._on_account, use_jwk=True)
        )

    def receive(self, response: Response) -> Outcome:
        if self._final is not None:
            return self._final
        if self._expect != "receive":
            return self._misuse("receive")
        if len(response.body) > MAX_BODY:
            return self._fail(AcmeError(ErrorKind.MALFORMED, f"body over {MAX_BODY} bytes"))
        # RFC 8555 section 6.5: every response may carry a fresh nonce; keep the latest.
        nonce = response.header("Replay-Nonce")
        if nonce is not None and _B64URL.fullmatch(nonce.strip()) and len(nonce) <= 256:
            self._nonce = nonce.strip()
        call, self._call = self._call, None
        if call is None:  # the newNonce HEAD (section 7.2)
            pending, self._after_nonce = self._after_nonce, None
            if self._nonce is None:
                return self._fail(AcmeError(ErrorKind.MALFORMED, "newNonce: no Replay-Nonce"))
            assert pending is not None
            return self._send(pending)
        if response.status >= 400:
            return self._on_error(call, response)
        return call.on_response(response)

    def published(self) -> Outcome:
        if self._final is not None:
            return self._final
        if self._expect != "published" or self._challenge is None:
            return self._misuse("published")
        challenge = self._challenge
        self._published.append(challenge)
        # RFC 8555 section 7.5.1: an empty JSON object tells the server to validate.
        return self._send(
            _Call(challenge.url, {}, f"respond {challenge.type} {challenge.name}",
                  self._on_challenge_response)
        )

    def waited(self) -> Outcome:
        if self._final is not None:
            return self._final
        if self._expect != "waited" or self._after_wait is None:
            return self._misuse("waited")
        call, self._after_wait = self._after_wait, None
        return self._send(call)

    # -- plumbing --

    def _misuse(self, called: str) -> Outcome:
        # A driver bug, not network input: still no exception, the order just fails.
        return self._fail(
            AcmeError(ErrorKind.CONFIG, f"driver called {called}() while {self._expect}() due")
        )

    def _fail(self, error: AcmeError) -> Failed:
        self._final = Failed(error)
        self._expect = "nothing"
        return self._final

    def _send(self, call: _Call) -> Outcome:
        self._expect = "receive"
        if self._nonce is None:
            self._after_nonce = call
            self._call = None
            return Request("HEAD", str(self.directory["newNonce"]), None, "newNonce")
        nonce, self._nonce = self._nonce, None  # each nonce once (section 6.5)
        body = jws(self.account_key, call.payload, url=call.url, nonce=nonce,
                   kid=None if call.use_jwk else self._kid)
        self._call = call
        headers = [("Content-Type", "application/jose+json")]
        if call.accept_pem:
            headers.append(("Accept", "application/pem-certificate-chain"))
        return Request("POST", call.url, body, call.purpose, tuple(headers))

    def _wait_then(self, call: _Call, response: Response) -> Outcome:
        self._polls += 1
        if self._polls > self.max_polls:
            return self._fail(AcmeError(ErrorKind.TIMEOUT, f"{call.purpose}: still not done "
                                        f"after {self.max_polls} polls"))
        after = parse_retry_after(response.header("Retry-After"), self.clock())
        seconds = self.default_poll if after is None else after
        self._after_wait = call
        self._expect = "waited"
        return Wait(min(max(seconds, 0.0), self.max_wait))

    def _on_error(self, call: _Call, response: Response) -> Outcome:
        obj = _json_object(response.body, call.purpose) if response.body else None
        problem = parse_problem(obj) if isinstance(obj, dict) else None
        if problem is not None and problem.acme_type == "badNonce":
            call.bad_nonces += 1
            if call.bad_nonces <= self.max_bad_nonce:
                # Section 6.5: the error carries a fresh nonce; resend, signed with it (or fetch
                # one first when the server left it out).
                return self._send(call)
            return self._fail(AcmeError(ErrorKind.BAD_NONCE, f"{call.purpose}: badNonce "
                                        f"{call.bad_nonces} times", problem))
        retry = parse_retry_after(response.header("Retry-After"), self.clock())
        message = f"{call.purpose}: HTTP {response.status}"
        return self._fail(AcmeError(ErrorKind.PROBLEM, message, problem, retry))

    def _object(self, response: Response, what: str) -> dict[str, object] | AcmeError:
        return _json_object(response.body, what)

    # -- steps --

    def _on_account(self, response: Response) -> Outcome:
        if response.status not in (200, 201):  # 200: the key already has an account (7.3.1)
            return self._unexpected("newAccount", response)
        kid = response.header("Location")
        if not kid or not kid.startswith("https://"):
            return self._fail(AcmeError(ErrorKind.MALFORMED, "newAccount: no Location"))
        obj = self._object(response, "account")
        if isinstance(obj, AcmeError):
            return self._fail(obj)
        if obj.get("status") not in ("valid", None):
            return self._fail(AcmeError(ErrorKind.INVALID, f"account is {obj.get('status')!r}"))
        self._kid = kid
        payload: dict[str, object] = {
            "identifiers": [{"type": "dns", "value": n} for n in self.names]
        }
        if self.replaces:
            payload["replaces"] = self.replaces
        return self._send(
            _Call(str(self.directory["newOrder"]), payload, "newOrder", self._on_new_order)
        )

    def _unexpected(self, what: str, response: Response) -> Failed:
        return self._fail(AcmeError(ErrorKind.MALFORMED, f"{what}: unexpected HTTP "
                                    f"{response.status}"))

    def _on_new_order(self, response: Response) -> Outcome:
        if response.status != 201:
            return self._unexpected("newOrder", response)
        location = response.header("Location")
        if not location or not location.startswith("https://"):
            return self._fail(AcmeError(ErrorKind.MALFORMED, "newOrder: no Location"))
        self._order_url = location
        obj = self._object(response, "order")
        if isinstance(obj, AcmeError):
            return self._fail(obj)
        authz = obj.get("authorizations")
        if not isinstance(authz, list) or not authz or not all(
            isinstance(a, str) and a.startswith("https://") for a in authz
        ) or len(authz) > 100:
            return self._fail(AcmeError(ErrorKind.MALFORMED,
                                        "order: 'authorizations' not a list of URLs"))
        finalize = _str_field(obj, "finalize", "order")
        if isinstance(finalize, AcmeError):
            return self._fail(finalize)
        self._authz = [str(a) for a in authz]
        self._finalize_url = finalize
        if obj.get("status") == "pending":
            return self._next_authz()
        return self._on_order_object(obj, response)

    def _next_authz(self) -> Outcome:
        if self._authz_index >= len(self._authz):
            # All authorizations valid: the order should be "ready" (section 7.1.6); read it.
            self._polls = 0
            return self._send(self._order_poll())
        url = self._authz[self._authz_index]
        self._polls = 0
        return self._send(_Call(url, None, f"authz {url}", self._on_authz))

    def _authz_poll(self) -> _Call:
        url = self._authz[self._authz_index]
        return _Call(url, None, f"poll authz {url}", self._on_authz)

    def _order_poll(self) -> _Call:
        return _Call(self._order_url, None, "poll order", self._on_order)

    def _on_authz(self, response: Response) -> Outcome:
        if response.status != 200:
            return self._unexpected("authz", response)
        obj = self._object(response, "authorization")
        if isinstance(obj, AcmeError):
            return self._fail(obj)
        status = obj.get("status")
        ident = obj.get("identifier")
        name = ident.get("value") if isinstance(ident, dict) else None
        if not isinstance(name, str):
            return self._fail(AcmeError(ErrorKind.MALFORMED, "authorization: no identifier"))
        if status == "valid":
            self._authz_index += 1
            return self._next_authz()
        if status == "invalid":
            problem = None
            raw = obj.get("challenges")
            for ch in raw if isinstance(raw, list) else []:
                if isinstance(ch, dict) and ch.get("error") is not None:
                    problem = parse_problem(ch.get("error"))
                    break
            return self._fail(AcmeError(ErrorKind.INVALID,
                                        f"authorization for {name} is invalid", problem))
        if status != "pending":
            # deactivated, expired, revoked (section 7.1.6): nothing to do but give up.
            return self._fail(AcmeError(ErrorKind.INVALID,
                                        f"authorization for {name} is {status!r}"))
        if self._challenge is not None and self._challenge.name == name:
            # We already answered; validation is under way (section 7.5.1).
            return self._wait_then(self._authz_poll(), response)
        return self._choose(obj, name)

    def _choose(self, obj: Mapping[str, object], name: str) -> Outcome:
        raw = obj.get("challenges")
        if not isinstance(raw, list):
            return self._fail(AcmeError(ErrorKind.MALFORMED, "authorization: no challenges"))
        offered: dict[str, Mapping[str, object]] = {}
        for ch in raw:
            if isinstance(ch, dict) and isinstance(ch.get("type"), str):
                offered.setdefault(str(ch["type"]), ch)
        for wanted in self.challenges:
            ch = offered.get(wanted)
            if ch is None or wanted not in ("tls-alpn-01", "http-01"):
                continue
            url, token = ch.get("url"), ch.get("token")
            if not isinstance(url, str) or not url.startswith("https://"):
                return self._fail(AcmeError(ErrorKind.MALFORMED, f"{wanted}: no url"))
            if not isinstance(token, str) or not valid_token(token):
                return self._fail(AcmeError(ErrorKind.MALFORMED, f"{wanted}: bad token"))
            challenge = Challenge(wanted, name, url, token,
                                  key_authorization(token, self.account_key.public_key()))
            self._challenge = challenge
            self._expect = "published"
            return Publish(challenge)
        return self._fail(AcmeError(
            ErrorKind.UNSUPPORTED,
            f"{name}: none of {list(self.challenges)} offered (offered: {sorted(offered)})",
        ))

    def _on_challenge_response(self, response: Response) -> Outcome:
        if response.status != 200:
            return self._unexpected("challenge", response)
        obj = self._object(response, "challenge")
        if isinstance(obj, AcmeError):
            return self._fail(obj)
        self._polls = 0
        # Section 7.5.1: poll the authorization, honouring Retry-After of this response.
        return self._wait_then(self._authz_poll(), response)

    def _on_order(self, response: Response) -> Outcome:
        if response.status != 200:
            return self._unexpected("order", response)
        obj = self._object(response, "order")
        if isinstance(obj, AcmeError):
            return self._fail(obj)
        return self._on_order_object(obj, response)

    def _on_order_object(self, obj: Mapping[str, object], response: Response) -> Outcome:
        status = obj.get("status")
        if status == "ready" and not self._finalized:
            self._finalized = True
            csr, self._key_pem = make_csr(list(self.names))
            self._polls = 0
            # Section 7.4: finalize with the CSR, base64url DER.
            return self._send(_Call(self._finalize_url, {"csr": b64u(csr)}, "finalize",
                                    self._on_order))
        if status in ("pending", "ready", "processing"):
            return self._wait_then(self._order_poll(), response)
        if status == "valid":
            cert = obj.get("certificate")
            if not isinstance(cert, str) or not cert.startswith("https://"):
                return self._fail(AcmeError(ErrorKind.MALFORMED, "order: no certificate URL"))
            if not self._finalized:
                return self._fail(AcmeError(ErrorKind.MALFORMED,
                                            "order valid before we finalized it"))
            return self._send(_Call(cert, None, "certificate", self._on_certificate,
                                    accept_pem=True))
        if status == "invalid":
            return self._fail(AcmeError(ErrorKind.INVALID, "order is invalid",
                                        parse_problem(obj.get("error"))))
        return self._fail(AcmeError(ErrorKind.MALFORMED, f"order: status {status!r}"))

    def _on_certificate(self, response: Response) -> Outcome:
        if response.status != 200:
            return self._unexpected("certificate", response)
        try:
            chain = x509.load_pem_x509_certificates(response.body)
        except ValueError:
            return self._fail(AcmeError(ErrorKind.MALFORMED, "certificate: not a PEM chain"))
        leaf = chain[0]
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = set(sans.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            covered = set()
        missing = [n for n in self.names if n not in covered]
        if missing:
            return self._fail(AcmeError(ErrorKind.MALFORMED,
                                        f"certificate does not cover {missing}"))
        self._final = Done(response.body, self._key_pem, self._kid or "", self._order_url,
                           tuple(self._published))
        self._expect = "nothing"
        return self._final
