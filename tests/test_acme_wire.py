"""Issue 10 item 2, sans-IO core: sniport/wire/acme.py (RFC 8555, 7515/7518/7638, 8737, 9773).

The order machine is driven by a scripted fake CA: bytes in, outcomes out. Every POST it emits
is decoded and its ES256 signature verified, so the JWS is checked on every step, not once.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire import acme
from sniport.wire.acme import (
    Done,
    ErrorKind,
    Failed,
    OrderMachine,
    Publish,
    Request,
    Response,
    Wait,
)

CA = "https://ca.test"
DIRECTORY = {
    "newNonce": f"{CA}/nonce",
    "newAccount": f"{CA}/acct",
    "newOrder": f"{CA}/order",
    "renewalInfo": f"{CA}/ari/",
}
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
ACCOUNT_KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jws(body: bytes, key: ec.EllipticCurvePublicKey) -> tuple[dict[str, Any], Any]:
    """(protected header, payload: parsed JSON, or None for POST-as-GET); asserts the ES256
    signature (r||s, RFC 7518 section 3.4) verifies once converted back to DER."""
    obj = json.loads(body)
    assert set(obj) == {"protected", "payload", "signature"}  # flattened, RFC 7515 7.2.2
    sig = unb64(obj["signature"])
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, f"{obj['protected']}.{obj['payload']}".encode(), ec.ECDSA(hashes.SHA256()))
    protected = json.loads(unb64(obj["protected"]))
    payload = None if obj["payload"] == "" else json.loads(unb64(obj["payload"]))
    return protected, payload


class FakeCA:
    """Hands out nonces and remembers which it issued, so nonce reuse would be caught."""

    def __init__(self) -> None:
        self.count = 0
        self.issued: set[str] = set()
        self.used: set[str] = set()

    def nonce(self) -> str:
        self.count += 1
        value = f"nonce{self.count}"
        self.issued.add(value)
        return value

    def reply(self, status: int, body: Any = b"", *, nonce: bool = True,
              **headers: str) -> Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        pairs = [(k.replace("_", "-"), v) for k, v in headers.items()]
        if nonce:
            pairs.append(("Replay-Nonce", self.nonce()))
        return Response(status, tuple(pairs), raw)

    def check(self, outcome: object, url: str, *, kid: str | None = None) -> Any:
        """Assert ``outcome`` is a signed POST to ``url``; return its payload."""
        assert isinstance(outcome, Request), outcome
        assert (outcome.method, outcome.url) == ("POST", url), outcome
        assert outcome.body is not None
        protected, payload = verify_jws(outcome.body, ACCOUNT_KEY.public_key())
        assert protected["alg"] == "ES256" and protected["url"] == url
        assert protected["nonce"] in self.issued and protected["nonce"] not in self.used
        self.used.add(protected["nonce"])
        if kid is None:
            assert protected["jwk"] == acme.jwk(ACCOUNT_KEY.public_key()) and "kid" not in protected
        else:
            assert protected["kid"] == kid and "jwk" not in protected
        return payload


def machine(names: tuple[str, ...] = ("a.test", "b.test"), **kw: Any) -> OrderMachine:
    kw.setdefault("clock", lambda: NOW)
    return OrderMachine(DIRECTORY, ACCOUNT_KEY, names, email="me@example.test", **kw)


def authz(name: str, status: str = "pending", challenges: list[dict[str, Any]] | None = None,
          ) -> dict[str, Any]:
    if challenges is None:
        challenges = [
            {"type": "http-01", "url": f"{CA}/ch/{name}/http", "token": "tok-http_1"},
            {"type": "dns-01", "url": f"{CA}/ch/{name}/dns", "token": "tok-dns"},
            {"type": "tls-alpn-01", "url": f"{CA}/ch/{name}/alpn", "token": "tok-alpn_1"},
        ]
    return {"status": status, "identifier": {"type": "dns", "value": name},
            "challenges": challenges}


def to_order(m: OrderMachine, ca: FakeCA, names: tuple[str, ...] = ("a.test", "b.test"),
             ) -> object:
    """start -> newNonce -> newAccount -> newOrder; returns the outcome after newOrder."""
    out = m.start()
    assert out == Request("HEAD", DIRECTORY["newNonce"], None, "newNonce")
    out = m.receive(ca.reply(200))
    payload = ca.check(out, DIRECTORY["newAccount"])
    assert payload == {"termsOfServiceAgreed": True, "contact": ["mailto:me@example.test"]}
    out = m.receive(ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"))
    payload = ca.check(out, DIRECTORY["newOrder"], kid=f"{CA}/acct/1")
    assert payload == {"identifiers": [{"type": "dns", "value": n} for n in names]}
    return m.receive(ca.reply(201, {
        "status": "pending", "finalize": f"{CA}/order/1/fin",
        "authorizations": [f"{CA}/authz/{n}" for n in names],
    }, Location=f"{CA}/order/1"))


def issue(csr_der: bytes) -> bytes:
    """What the CA would return: leaf for the CSR's names + a CA certificate, PEM."""
    csr = x509.load_der_x509_csr(csr_der)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake CA")])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name)
            .public_key(csr.public_key()).serial_number(7)
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=60))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=600))
               .sign(ca_key, hashes.SHA256()))
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca_cert))


# --- JWK, thumbprint, key authorization ---------------------------------------------------

# Thumbprints computed by josepy 2.2.0 (JWKEC(key).thumbprint(SHA256)) in a throwaway venv,
# for keys with these private scalars: an independent implementation of RFC 7638.
JOSEPY_VECTORS = [
    (1, "c71d01700fb0328870f1ab580c939eea9786328764946db04470655c732f9743",
     "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY", "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"),
    (0x1234567890ABCDEF, "6007140cb090ecd6868417cdb084d19ea46c962c735d29f8b872a9c6492d35d8",
     "n62Erq4Iu-9_AQAU2CzvagneKwz4cbXODE8dE6WaWTQ", "B8tFdp8QcOLCRw_lsb_mMTPAsM3GTqS_N5Go7CoH_U8"),
    (2**255 + 12345, "076fb14690285d44d64f07339f9928a280c8fbfff25eb71b78ba907fe44237c6",
     "N5NsaisBJc-dvpMCdAdYF8f6PNut7LhSBCklAtiNF7w", "Frn9naG4ZBSO-uapQmRzfmfYp_g_di7nCE-VSMAwLrQ"),
]


@pytest.mark.parametrize(("d", "digest", "x", "y"), JOSEPY_VECTORS)
def test_thumbprint_matches_josepy(d: int, digest: str, x: str, y: str) -> None:
    public = ec.derive_private_key(d, ec.SECP256R1()).public_key()
    assert acme.jwk(public) == {"crv": "P-256", "kty": "EC", "x": x, "y": y}
    assert acme.thumbprint(public) == acme.b64u(bytes.fromhex(digest))
    assert acme.key_authorization("tok", public) == "tok." + acme.b64u(bytes.fromhex(digest))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=2**256 - 2**224))
def test_thumbprint_is_sha256_of_canonical_json(d: int) -> None:
    # Independent of the module's json.dumps: the canonical form spelled out by hand
    # (RFC 7638 section 3.3: lexicographic member order, no whitespace); coordinates are
    # always 32 bytes (43 characters), leading zeros kept (RFC 7518 section 6.2.1.2).
    public = ec.derive_private_key(d, ec.SECP256R1()).public_key()
    n = public.public_numbers()
    x = acme.b64u(n.x.to_bytes(32, "big"))
    y = acme.b64u(n.y.to_bytes(32, "big"))
    canonical = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (x, y)  # noqa: UP031
    assert len(x) == len(y) == 43
    assert acme.thumbprint(public) == acme.b64u(hashlib.sha256(canonical.encode()).digest())


def test_jwk_refuses_other_curves() -> None:
    with pytest.raises(ValueError):
        acme.jwk(ec.generate_private_key(ec.SECP384R1()).public_key())


# --- JWS ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
       st.booleans())
def test_jws_verifies_and_carries_the_header(payload: dict[str, Any], use_kid: bool) -> None:
    kid = f"{CA}/acct/9" if use_kid else None
    body = acme.jws(ACCOUNT_KEY, payload, url=f"{CA}/x", nonce="n0nce", kid=kid)
    protected, got = verify_jws(body, ACCOUNT_KEY.public_key())
    assert got == payload
    expected: dict[str, Any] = {"alg": "ES256", "nonce": "n0nce", "url": f"{CA}/x"}
    expected.update({"kid": kid} if kid else {"jwk": acme.jwk(ACCOUNT_KEY.public_key())})
    assert protected == expected


def test_post_as_get_has_empty_payload() -> None:
    body = acme.jws(ACCOUNT_KEY, None, url=f"{CA}/x", nonce="n", kid=f"{CA}/acct/1")
    assert json.loads(body)["payload"] == ""  # RFC 8555 section 6.3
    assert verify_jws(body, ACCOUNT_KEY.public_key())[1] is None


# --- the order flow -------------------------------------------------------------------------


def test_full_order_flow() -> None:
    ca, m = FakeCA(), machine()
    out = to_order(m, ca)
    assert ca.check(out, f"{CA}/authz/a.test", kid=f"{CA}/acct/1") is None
    out = m.receive(ca.reply(200, authz("a.test")))
    # tls-alpn-01 is preferred although http-01 comes first in the CA's list.
    assert isinstance(out, Publish)
    ch = out.challenge
    assert (ch.type, ch.name, ch.url, ch.token) == (
        "tls-alpn-01", "a.test", f"{CA}/ch/a.test/alpn", "tok-alpn_1")
    assert ch.key_authorization == "tok-alpn_1." + acme.thumbprint(ACCOUNT_KEY.public_key())
    out = m.published()
    assert ca.check(out, f"{CA}/ch/a.test/alpn", kid=f"{CA}/acct/1") == {}
    out = m.receive(ca.reply(200, {"type": "tls-alpn-01", "status": "processing"},
                             Retry_After="3"))
    assert out == Wait(3.0)
    ca.check(m.waited(), f"{CA}/authz/a.test", kid=f"{CA}/acct/1")
    out = m.receive(ca.reply(200, authz("a.test", "pending")))  # still validating: no Retry-After
    assert out == Wait(1.0)
    ca.check(m.waited(), f"{CA}/authz/a.test", kid=f"{CA}/acct/1")
    out = m.receive(ca.reply(200, authz("a.test", "valid")))
    ca.check(out, f"{CA}/authz/b.test", kid=f"{CA}/acct/1")
    out = m.receive(ca.reply(200, authz("b.test", "valid")))  # reused authorization
    ca.check(out, f"{CA}/order/1", kid=f"{CA}/acct/1")
    out = m.receive(ca.reply(200, {"status": "ready"}))
    payload = ca.check(out, f"{CA}/order/1/fin", kid=f"{CA}/acct/1")
    csr = x509.load_der_x509_csr(unb64(payload["csr"]))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "b.test"]
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    out = m.receive(ca.reply(200, {"status": "processing"}, Retry_After="2"))
    assert out == Wait(2.0)
    ca.check(m.waited(), f"{CA}/order/1", kid=f"{CA}/acct/1")
    out = m.receive(ca.reply(200, {"status": "valid", "certificate": f"{CA}/cert/1"}))
    assert isinstance(out, Request)
    assert ("Accept", "application/pem-certificate-chain") in out.headers
    ca.check(out, f"{CA}/cert/1", kid=f"{CA}/acct/1")
    chain = issue(csr.public_bytes(serialization.Encoding.DER))
    done = m.receive(ca.reply(200, chain))
    assert isinstance(done, Done)
    assert done.chain_pem == chain
    key = serialization.load_pem_private_key(done.key_pem, None)
    leaf = x509.load_pem_x509_certificates(chain)[0]
    assert key.public_key() == leaf.public_key()
    assert (done.account_url, done.order_url) == (f"{CA}/acct/1", f"{CA}/order/1")
    assert [c.name for c in done.challenges] == ["a.test"]
    assert m.receive(ca.reply(200)) is done  # finished: the same outcome again


def test_preference_order_and_no_acceptable_challenge() -> None:
    ca, m = FakeCA(), machine(("a.test",), challenges=("http-01",))
    to_order(m, ca, ("a.test",))
    out = m.receive(ca.reply(200, authz("a.test")))
    assert isinstance(out, Publish) and out.challenge.type == "http-01"
    ca, m = FakeCA(), machine(("a.test",))
    to_order(m, ca, ("a.test",))
    out = m.receive(ca.reply(200, authz("a.test", challenges=[
        {"type": "dns-01", "url": f"{CA}/c", "token": "t"}])))
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.UNSUPPORTED
    assert "dns-01" in out.error.message


def test_bad_nonce_retries_same_request_with_fresh_nonce() -> None:
    ca, m = FakeCA(), machine(max_bad_nonce=2)
    m.start()
    first = m.receive(ca.reply(200))
    ca.check(first, DIRECTORY["newAccount"])
    bad = {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale", "status": 400}
    for _ in range(2):
        again = m.receive(ca.reply(400, bad))
        assert isinstance(again, Request) and again.purpose == first.purpose  # type: ignore[union-attr]
        ca.check(again, DIRECTORY["newAccount"])  # signed with the nonce of the error
    out = m.receive(ca.reply(400, bad))
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.BAD_NONCE
    assert out.error.problem is not None and out.error.problem.acme_type == "badNonce"


def test_bad_nonce_without_a_nonce_fetches_one() -> None:
    ca, m = FakeCA(), machine()
    m.start()
    m.receive(ca.reply(200))
    bad = {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale"}
    out = m.receive(ca.reply(400, bad, nonce=False))
    assert out == Request("HEAD", DIRECTORY["newNonce"], None, "newNonce")
    ca.check(m.receive(ca.reply(200)), DIRECTORY["newAccount"])


@pytest.mark.parametrize(("status", "ptype", "retry", "expected"), [
    (429, "rateLimited", "120", 120.0),
    (500, "serverInternal", None, None),
    (503, "serverInternal", "Thu, 01 Jan 2026 00:01:00 GMT", 60.0),  # HTTP-date vs the clock
    (403, "unauthorized", "garbage", None),
])
def test_error_problems_are_typed(status: int, ptype: str, retry: str | None,
                                  expected: float | None) -> None:
    ca, m = FakeCA(), machine()
    m.start()
    m.receive(ca.reply(200))
    m.receive(ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"))
    reply = ca.reply(status, {"type": acme.PROBLEM_PREFIX + ptype, "detail": "no"})
    if retry is not None:
        reply = Response(reply.status, (*reply.headers, ("Retry-After", retry)), reply.body)
    out = m.receive(reply)
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.PROBLEM
    assert out.error.problem is not None and out.error.problem.acme_type == ptype
    assert out.error.retry_after == expected
    assert "HTTP" in str(out.error) and ptype in str(out.error)


def test_problem_with_subproblems() -> None:
    ca, m = FakeCA(), machine()
    m.start()
    m.receive(ca.reply(200))
    m.receive(ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"))
    doc = {
        "type": "urn:ietf:params:acme:error:malformed", "detail": "some names refused",
        "status": 400,
        "subproblems": [
            {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": "policy",
             "identifier": {"type": "dns", "value": "b.test"}},
            "not a problem", {"detail": "no type"},
        ],
    }
    out = m.receive(ca.reply(400, doc, Content_Type="application/problem+json"))
    assert isinstance(out, Failed)
    problem = out.error.problem
    assert problem is not None and problem.status == 400
    assert [(s.acme_type, s.identifier, s.detail) for s in problem.subproblems] == [
        ("rejectedIdentifier", "b.test", "policy")]
    assert "b.test" in str(out.error)


def test_invalid_authorization_reports_the_challenge_error() -> None:
    ca, m = FakeCA(), machine()
    to_order(m, ca)
    m.receive(ca.reply(200, authz("a.test")))
    m.published()
    m.receive(ca.reply(200, {"status": "processing"}))
    m.waited()
    challenges = [{"type": "tls-alpn-01", "url": f"{CA}/c", "token": "t", "status": "invalid",
                   "error": {"type": "urn:ietf:params:acme:error:tls",
                             "detail": "no acme-tls/1"}}]
    out = m.receive(ca.reply(200, authz("a.test", "invalid", challenges)))
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.INVALID
    assert out.error.problem is not None and out.error.problem.detail == "no acme-tls/1"


def test_retry_after_is_capped_and_polls_are_bounded() -> None:
    ca, m = FakeCA(), machine(max_wait=30.0, max_polls=3)
    to_order(m, ca)
    m.receive(ca.reply(200, authz("a.test")))
    m.published()
    assert m.receive(ca.reply(200, {}, Retry_After="86400")) == Wait(30.0)
    for _ in range(2):
        m.waited()
        assert isinstance(m.receive(ca.reply(200, authz("a.test"))), Wait)
    m.waited()
    out = m.receive(ca.reply(200, authz("a.test")))
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.TIMEOUT


def test_invalid_order_after_finalize() -> None:
    ca, m = FakeCA(), machine(("a.test",))
    to_order(m, ca, ("a.test",))
    m.receive(ca.reply(200, authz("a.test", "valid")))
    m.receive(ca.reply(200, {"status": "ready"}))
    out = m.receive(ca.reply(200, {"status": "invalid", "error": {
        "type": "urn:ietf:params:acme:error:badCSR", "detail": "weak key"}}))
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.INVALID
    assert out.error.problem is not None and out.error.problem.acme_type == "badCSR"


def test_certificate_must_cover_the_names() -> None:
    ca, m = FakeCA(), machine(("a.test",))
    to_order(m, ca, ("a.test",))
    m.receive(ca.reply(200, authz("a.test", "valid")))
    m.receive(ca.reply(200, {"status": "ready"}))
    m.receive(ca.reply(200, {"status": "valid", "certificate": f"{CA}/cert"}))
    csr_der, _ = acme.make_csr(["other.test"])
    out = m.receive(ca.reply(200, issue(csr_der)))
    assert isinstance(out, Failed) and "a.test" in out.error.message


BIG = b"{" + b" " * acme.MAX_BODY + b"}"


@pytest.mark.parametrize(("step", "response", "needle"), [
    ("account", Response(201, (("Location", f"{CA}/a"),), b"not json"), "not JSON"),
    ("account", Response(201, (("Location", f"{CA}/a"),), b"[1]"), "not a JSON object"),
    ("account", Response(201, (), b"{}"), "Location"),
    ("account", Response(201, (("Location", f"{CA}/a"),), BIG), "bytes"),
    ("account", Response(201, (("Location", f"{CA}/a"),), b'{"status":"deactivated"}'),
     "deactivated"),
    ("account", Response(302, (), b""), "unexpected HTTP 302"),
    ("order", Response(201, (("Location", f"{CA}/o"),), b'{"status":"pending"}'),
     "authorizations"),
    ("order", Response(201, (("Location", f"{CA}/o"),),
                       b'{"status":"pending","authorizations":[1],"finalize":"x"}'),
     "authorizations"),
    ("order", Response(201, (("Location", f"{CA}/o"),),
                       b'{"status":"pending","authorizations":["https://x"]}'), "finalize"),
    ("order", Response(201, (("Location", f"{CA}/o"),),
                       b'{"status":7,"authorizations":["https://x"],"finalize":"f"}'), "status"),
    ("order", Response(400, (), b"<html>oops</html>"), "HTTP 400"),
    ("nonce", Response(200, (), b""), "Replay-Nonce"),
    ("nonce", Response(200, (("Replay-Nonce", "bad nonce!"),), b""), "Replay-Nonce"),
])
def test_malformed_responses_fail_typed(step: str, response: Response, needle: str) -> None:
    ca, m = FakeCA(), machine()
    m.start()
    if step != "nonce":
        m.receive(ca.reply(200))
    if step == "order":
        m.receive(ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"))
    out = m.receive(response)
    assert isinstance(out, Failed), out
    assert needle in str(out.error)


@pytest.mark.parametrize("body", [
    {"status": "pending", "identifier": "a.test", "challenges": []},
    {"status": "pending", "identifier": {"value": "a.test"}, "challenges": "x"},
    {"status": "pending", "identifier": {"value": "a.test"},
     "challenges": [{"type": "tls-alpn-01", "url": f"{CA}/c", "token": "../etc/passwd"}]},
    {"status": "pending", "identifier": {"value": "a.test"},
     "challenges": [{"type": "tls-alpn-01", "url": 5, "token": "t"}]},
    {"status": "expired", "identifier": {"value": "a.test"}},
])
def test_malformed_authorizations_fail_typed(body: dict[str, Any]) -> None:
    ca, m = FakeCA(), machine()
    to_order(m, ca)
    out = m.receive(ca.reply(200, body))
    assert isinstance(out, Failed)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=4), st.integers(min_value=100, max_value=599),
       st.binary(max_size=64) | st.recursive(
           st.none() | st.booleans() | st.integers() | st.text(max_size=10),
           lambda inner: st.lists(inner, max_size=3)
           | st.dictionaries(st.sampled_from(
               ["status", "type", "detail", "authorizations", "finalize", "identifier",
                "challenges", "subproblems", "certificate", "url", "token"]), inner, max_size=5),
           max_leaves=12))
def test_garbage_never_raises(step: int, status: int, body: Any) -> None:
    ca, m = FakeCA(), machine()
    out: object = m.start()
    script = [ca.reply(200), ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"),
              ca.reply(201, {"status": "pending", "finalize": f"{CA}/f",
                             "authorizations": [f"{CA}/authz/a.test"]}, Location=f"{CA}/o")]
    for response in script[:step]:
        out = m.receive(response)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    out = m.receive(Response(status, (("Location", f"{CA}/x"), ("Retry-After", "5")), raw))
    assert isinstance(out, Request | Publish | Wait | Failed)


def test_bad_directory_and_driver_misuse() -> None:
    m = OrderMachine({"newNonce": "http://insecure"}, ACCOUNT_KEY, ["a.test"])
    out = m.start()
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.CONFIG
    m = machine()
    out = m.published()  # before start
    assert isinstance(out, Failed) and out.error.kind is ErrorKind.CONFIG
    out = OrderMachine(DIRECTORY, ACCOUNT_KEY, []).start()
    assert isinstance(out, Failed) and "no names" in out.error.message


def test_ari_replaces_goes_into_new_order() -> None:
    ca, m = FakeCA(), machine(("a.test",), replaces="aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    m.start()
    m.receive(ca.reply(200))
    out = m.receive(ca.reply(201, {"status": "valid"}, Location=f"{CA}/acct/1"))
    assert ca.check(out, DIRECTORY["newOrder"], kid=f"{CA}/acct/1")["replaces"] == (
        "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")


# --- challenges -----------------------------------------------------------------------------


def test_tls_alpn01_certificate() -> None:
    ka = acme.key_authorization("tok-alpn_1", ACCOUNT_KEY.public_key())
    cert_pem, key_pem = acme.tls_alpn01_certificate("a.test", ka, NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == cert.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ext = cert.extensions.get_extension_for_oid(acme.ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    digest = hashlib.sha256(ka.encode()).digest()
    assert ext.value.value == b"\x04\x20" + digest  # DER OCTET STRING of the digest
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test"] and len(san) == 1
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=8)
    cert.verify_directly_issued_by(cert)  # self-signed


@pytest.mark.parametrize(("token", "ok"), [
    ("evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA", True),  # RFC 8555 section 8.3's example
    ("a_b-C9", True), ("", False), ("a.b", False), ("../x", False), ("a/b", False),
    ("a b", False), ("tök", False), ("a=", False), ("x" * 257, False),
])
def test_tokens_and_http01_path(token: str, ok: bool) -> None:
    assert acme.valid_token(token) is ok
    if ok:
        assert acme.http01_path(token) == "/.well-known/acme-challenge/" + token
    else:
        with pytest.raises(ValueError):
            acme.http01_path(token)


# --- ARI (RFC 9773) -------------------------------------------------------------------------


def ari_cert(aki: bytes | None, serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1)))
    if aki is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier(aki, None, None), False)
    return builder.sign(key, hashes.SHA256())


def test_ari_cert_id_rfc9773_example() -> None:
    # RFC 9773 section 4.1: AKI 69:88:5B:..:D4, serial 00:87:65:43:21.
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = ari_cert(aki, 0x87654321)
    assert acme.ari_cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert acme.renewal_info_url(DIRECTORY, cert) == (
        f"{CA}/ari/aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    assert acme.renewal_info_url({"newOrder": "x"}, cert) is None  # pebble: no ARI
    assert acme.ari_cert_id(ari_cert(aki, 0x12)).endswith(".Eg")
    with pytest.raises(ValueError):
        acme.ari_cert_id(ari_cert(None, 5))


def test_parse_renewal_info() -> None:
    body = json.dumps({"suggestedWindow": {"start": "2025-01-02T04:00:00Z",
                                           "end": "2025-01-03T04:00:00+00:00"},
                       "explanationURL": "https://ca.test/why"}).encode()
    window = acme.parse_renewal_info(body, "21600", NOW)
    assert isinstance(window, acme.RenewalWindow)
    assert window.start == datetime.datetime(2025, 1, 2, 4, tzinfo=datetime.UTC)
    assert window.end == datetime.datetime(2025, 1, 3, 4, tzinfo=datetime.UTC)
    assert window.explanation_url == "https://ca.test/why" and window.retry_after == 21600.0


@pytest.mark.parametrize("body", [
    b"nope", b"[]", b"{}", b'{"suggestedWindow":1}',
    b'{"suggestedWindow":{"start":"2025-01-02T04:00:00Z"}}',
    b'{"suggestedWindow":{"start":"2025-01-02T04:00:00","end":"2025-01-03T04:00:00"}}',
    b'{"suggestedWindow":{"start":"2025-01-03T04:00:00Z","end":"2025-01-02T04:00:00Z"}}',
    b'{"suggestedWindow":{"start":5,"end":"2025-01-02T04:00:00Z"}}',
])
def test_renewal_info_malformed(body: bytes) -> None:
    assert isinstance(acme.parse_renewal_info(body, None, NOW), acme.AcmeError)
