"""The I/O side of ACME (RFC 8555): HTTPS calls, and the driver of ``wire.acme.OrderMachine``.

Job: carry the sans-IO machine's requests over sniport's own upstream client
(``http/upstream.py``: TLS by the stdlib ``ssl``, responses parsed by httptools), publish and
withdraw challenges through the ``Storage``, sleep where the machine says, and ask the CA's
renewal information (ARI, RFC 9773).

Rules:
- One connection per call, ``Connection: close``: ACME calls are a handful per certificate
  every few weeks, so a keep-alive pool would be code without a benefit.
- Every call has one time cap (``timeout``) over connect, TLS handshake, request and the whole
  response; a body is kept up to ``acme.MAX_BODY + 1`` bytes and then the read stops (the
  machine turns an over-long body into a typed failure).
- Every network problem (refused, TLS verification, timeout, a response that is not HTTP or
  ends early) raises one type, ``AcmeTransportError``, whose message names the call and the
  reason. What the CA said (an error status, a problem document, an order gone invalid)
  raises ``AcmeOrderError`` carrying the machine's ``AcmeError``. Both are ``AcmeFailure``.
- Only ``https://`` URLs are called (RFC 8555 section 6.1), and a URL with control characters
  or spaces (it came from the server's JSON) is refused rather than written into a request.
- Every challenge published is withdrawn again, whatever the order's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sniport import __version__
from sniport.addresses import AddressError, parse_http_upstream
from sniport.certs.storage import Storage, StorageError
from sniport.config import ProxyHandler
from sniport.http.upstream import OneResponse, Upstream, UpstreamConn, upstream_tls_context
from sniport.logs import diag
from sniport.wire import acme

USER_AGENT = f"sniport/{__version__} acme"  # RFC 8555 section 6.1: clients send one
DEFAULT_ARI_RECHECK = 6 * 3600.0  # RFC 9773 section 4.3: no Retry-After -> ask again later
# RFC 9773 section 4.3: "values under one minute could be treated as if they were one minute,
# and values over one day could be treated as if they were one day".
ARI_RECHECK_MIN, ARI_RECHECK_MAX = 60.0, 86400.0


class AcmeFailure(Exception):
    """An ACME call or order did not work; the message says what and why."""


class AcmeTransportError(AcmeFailure):
    """The network failed us: refused, TLS, timeout, a response that is not HTTP or ends
    early."""


class AcmeOrderError(AcmeFailure):
    """The CA answered, and the answer was an error (the problem document is in ``error``)."""

    def __init__(self, error: acme.AcmeError) -> None:
        super().__init__(str(error))
        self.error = error


def _bad_url_char(url: str) -> bool:
    return any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url)


class _Collector(OneResponse):
    """A ``ResponseHandler`` that keeps status, headers and (capped) body of one response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: UpstreamConn, head: bool) -> None:
        self.done: asyncio.Future[acme.Response] = loop.create_future()
        self.conn = conn
        self.head = head  # a response to HEAD ends at its head (httptools#47, house rule 8)
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_complete = False
        self.framed = False  # Content-Length or chunked: the end is known, EOF is not it

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(acme.Response(self.status, tuple(self.headers),
                                               bytes(self.body)))

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(AcmeTransportError(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        if key.lower() in ("content-length", "transfer-encoding"):
            self.framed = True
        self.headers.append((key, text))

    def on_headers_complete(self) -> None:
        status = self.conn.get_status()
        if status < 200:  # an interim response (RFC 9110 section 15.2): the real one follows
            self.headers.clear()
            self.framed = False
            return
        self.status = status
        self.head_complete = True
        if self.head:
            self._finish()

    def on_body(self, body: bytes) -> None:
        room = acme.MAX_BODY + 1 - len(self.body)
        self.body += body[:room]
        if len(self.body) > acme.MAX_BODY:
            self._finish()  # enough to know it is too long; the caller closes

    def on_message_complete(self) -> None:
        if self.head_complete:
            self._finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        self._fail("unexpected protocol upgrade")

    def upstream_failed(self, reason: str) -> None:
        self._fail(f"not a valid HTTP response ({reason})")

    def upstream_lost(self) -> None:
        if self.head_complete and not self.framed:
            self._finish()  # RFC 9112 section 6.3: no length given, the close ends the body
        elif self.head_complete:
            self._fail("connection closed in the middle of the response body")
        else:
            self._fail("connection closed before a complete response")


class AcmeHttp:
    """HTTPS to an ACME server: ``ca`` is a PEM file to trust instead of the system store."""

    def __init__(self, ca: str = "", timeout: float = 30.0) -> None:
        self.ca = ca
        self.timeout = timeout
        self._tls: ssl.SSLContext | None = None
        self._upstreams: dict[str, Upstream] = {}

    def _upstream(self, authority: str) -> Upstream:
        upstream = self._upstreams.get(authority)
        if upstream is None:
            # keepalive 0: nothing pooled; max_fails 0: no passive health for a one-off call.
            target = parse_http_upstream(f"https://{authority}")
            cfg = ProxyHandler.model_validate({
                "upstreams": [str(target)], "ca": self.ca, "connect_timeout": self.timeout,
                "keepalive": 0, "max_fails": 0})
            if self._tls is None:
                self._tls = upstream_tls_context(cfg)
            upstream = Upstream(target, cfg, self._tls)
            self._upstreams[authority] = upstream
        return upstream

    async def call(self, method: str, url: str, body: bytes | None = None,
                   headers: Sequence[tuple[str, str]] = ()) -> acme.Response:
        """One request, one response; raises ``AcmeTransportError`` for anything but an HTTP
        response (an error status is a response: the machine reads the problem in it)."""
        where = f"{method} {url}"
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or _bad_url_char(url) \
                or parts.username is not None:
            raise AcmeTransportError(f"{where}: not an https URL sniport will call")
        authority = parts.netloc
        try:
            upstream = self._upstream(authority)
        except (AddressError, ValueError) as exc:
            raise AcmeTransportError(f"{where}: {exc}") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}",
                 "Connection: close"]
        names = {k.lower() for k, _ in headers}
        for key, value in headers:
            if _bad_url_char(key) or "\r" in value or "\n" in value:
                raise AcmeTransportError(f"{where}: bad header {key!r}")
            lines.append(f"{key}: {value}")
        if method == "POST" and "content-type" not in names:
            lines.append("Content-Type: application/jose+json")  # RFC 8555 section 6.2
        if body is not None or method == "POST":
            lines.append(f"Content-Length: {len(body or b'')}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        try:
            return await asyncio.wait_for(self._exchange(upstream, request, method == "HEAD"),
                                          self.timeout)
        except AcmeTransportError as exc:
            raise AcmeTransportError(f"{where}: {exc}") from None
        except TimeoutError:
            raise AcmeTransportError(f"{where}: no answer within {self.timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise AcmeTransportError(
                f"{where}: TLS certificate not trusted ({exc.verify_message or exc})"
                + ("" if self.ca else "; set the ACME CA file if this CA is private")) from None
        except ssl.SSLError as exc:
            raise AcmeTransportError(f"{where}: TLS failed ({exc.reason or exc})") from None
        except ConnectionRefusedError:
            raise AcmeTransportError(f"{where}: connection refused") from None
        except OSError as exc:
            raise AcmeTransportError(f"{where}: {exc.strerror or exc}") from None

    async def _exchange(self, upstream: Upstream, request: bytes, head: bool) -> acme.Response:
        loop = asyncio.get_running_loop()
        conn = await upstream.connect(loop)
        try:
            collector = _Collector(loop, conn, head)
            conn.begin(collector)
            conn.transport.write(request)
            return await collector.done
        finally:
            conn.close()


def _error_from(response: acme.Response, what: str) -> AcmeOrderError:
    problem = None
    with contextlib.suppress(ValueError, RecursionError):
        problem = acme.parse_problem(json.loads(response.body)) if response.body else None
    retry = acme.parse_retry_after(response.header("Retry-After"),
                                   datetime.datetime.now(datetime.UTC))
    return AcmeOrderError(acme.AcmeError(acme.ErrorKind.PROBLEM,
                                         f"{what}: HTTP {response.status}", problem, retry))


def _json(response: acme.Response, what: str) -> dict[str, object]:
    if len(response.body) > acme.MAX_BODY:
        raise AcmeOrderError(acme.AcmeError(acme.ErrorKind.MALFORMED,
                                            f"{what}: body over {acme.MAX_BODY} bytes"))
    try:
        value = json.loads(response.body)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise AcmeOrderError(acme.AcmeError(acme.ErrorKind.MALFORMED,
                                            f"{what}: not a JSON object"))
    return value


async def fetch_directory(http: AcmeHttp, url: str) -> dict[str, object]:
    """RFC 8555 section 7.1.1: the directory object (a GET, no JWS)."""
    response = await http.call("GET", url)
    if response.status != 200:
        raise _error_from(response, f"directory {url}")
    return _json(response, f"directory {url}")


async def obtain(
    http: AcmeHttp,
    directory: Mapping[str, object],
    account_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    *,
    email: str,
    challenges: Sequence[str],
    storage: Storage,
    replaces: str | None = None,
    log: logging.Logger = diag,
    default_poll: float = 1.0,
) -> acme.Done:
    """One order from newAccount to the chain; raises ``AcmeFailure`` (or ``StorageError``
    when a challenge cannot be published). Challenges published are withdrawn in the end."""
    machine = acme.OrderMachine(directory, account_key, list(names), email=email,
                                challenges=tuple(challenges), replaces=replaces,
                                default_poll=default_poll)
    published: list[acme.Challenge] = []
    try:
        outcome = machine.start()
        while True:
            if isinstance(outcome, acme.Request):
                log.debug("acme %s: %s %s", outcome.purpose, outcome.method, outcome.url)
                response = await http.call(outcome.method, outcome.url, outcome.body,
                                           outcome.headers)
                outcome = machine.receive(response)
            elif isinstance(outcome, acme.Publish):
                challenge = outcome.challenge
                log.debug("acme: publishing %s for %s", challenge.type, challenge.name)
                # Recorded before the call: a publish that half-worked is withdrawn too.
                published.append(challenge)
                storage.publish_challenge(challenge)
                outcome = machine.published()
            elif isinstance(outcome, acme.Wait):
                await asyncio.sleep(outcome.seconds)
                outcome = machine.waited()
            elif isinstance(outcome, acme.Done):
                return outcome
            else:
                raise AcmeOrderError(outcome.error)
    finally:
        for challenge in published:
            try:
                storage.withdraw_challenge(challenge)
            except StorageError as exc:
                log.warning("acme: cannot withdraw the %s challenge for %s: %s",
                            challenge.type, challenge.name, exc)


def _clamp_recheck(seconds: float | None) -> float:
    if seconds is None:
        return DEFAULT_ARI_RECHECK
    return min(max(seconds, ARI_RECHECK_MIN), ARI_RECHECK_MAX)


async def renewal_window(
    http: AcmeHttp, directory: Mapping[str, object], cert: x509.Certificate
) -> tuple[acme.RenewalWindow | None, float]:
    """RFC 9773 section 4: the CA's suggested renewal window for ``cert`` and the seconds
    until it should be asked again; ``(None, 6 h)`` when the CA offers no renewalInfo or the
    certificate has no Authority Key Identifier to name it by."""
    try:
        url = acme.renewal_info_url(directory, cert)
    except ValueError:
        return None, DEFAULT_ARI_RECHECK
    if url is None:
        return None, DEFAULT_ARI_RECHECK
    response = await http.call("GET", url)
    if response.status != 200:
        raise _error_from(response, "renewalInfo")
    window = acme.parse_renewal_info(response.body, response.header("Retry-After"),
                                     datetime.datetime.now(datetime.UTC))
    if isinstance(window, acme.AcmeError):
        raise AcmeOrderError(window)
    return window, _clamp_recheck(window.retry_after)
