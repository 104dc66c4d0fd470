"""How callers prove who they are to the control plane.

- Operators: a bearer admin token (``Authorization: Bearer ...``).
- Sidecars joining: a join token bound to one service identity, with an expiry.
- Sidecars afterwards: their workload identity. Each request carries the workload's
  certificate and a signature, made with the workload's private key, over the method, the
  path, a timestamp and the body's digest. The control plane checks that the certificate
  was issued by the mesh CA and is current, and that the signature verifies with its key:
  only the holder of that key can call as that identity. This works through any HTTP
  hop (a load balancer in front of several replicas) and needs nothing from the ASGI
  server, where TLS client certificates are not exposed. The channel itself is TLS.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..ca import certificate_spiffe_id, parse_spiffe_id

__all__ = [
    "MAX_CLOCK_SKEW",
    "AuthError",
    "JoinToken",
    "Workload",
    "sign_request",
    "verify_request",
]

CERT_HEADER = "x-meshpy-cert"
TIME_HEADER = "x-meshpy-time"
SIGNATURE_HEADER = "x-meshpy-signature"
MAX_CLOCK_SKEW = 300  # seconds a signed request's timestamp may differ from the server's clock
TOKEN_PREFIX = "mpt"


class AuthError(Exception):
    """The caller could not be authenticated; the message says why (for a 401 body)."""


def _signed_text(method: str, target: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"meshpy-v1\n{method.upper()}\n{target}\n{timestamp}\n{digest}".encode()


def sign_request(
    method: str, target: str, body: bytes, cert_pem: str, key_pem: str
) -> dict[str, str]:
    """Headers proving the request comes from the holder of `key_pem`.

    `target` is the path with its query string, exactly as sent.
    """
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    timestamp = str(int(time.time()))
    text = _signed_text(method, target, timestamp, body)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(text, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(text)
    else:
        raise ValueError("workload keys are ECDSA or Ed25519")
    return {
        CERT_HEADER: base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
        TIME_HEADER: timestamp,
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }


@dataclass(frozen=True)
class Workload:
    """An authenticated sidecar."""

    spiffe_id: str
    namespace: str
    service: str
    not_after: dt.datetime


def verify_request(
    method: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
    issuer: x509.Certificate,
    trust_domain: str,
) -> Workload:
    """The workload that signed this request; raises AuthError when anything is off."""
    try:
        cert_der = base64.b64decode(headers[CERT_HEADER], validate=True)
        signature = base64.b64decode(headers[SIGNATURE_HEADER], validate=True)
        timestamp = headers[TIME_HEADER]
    except KeyError as exc:
        raise AuthError(f"missing {exc.args[0]} header: sign the request") from None
    except ValueError:
        raise AuthError("malformed identity headers") from None
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise AuthError("the certificate header is not a DER certificate") from None
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_CLOCK_SKEW:
        raise AuthError("the request's timestamp is missing or too far from the server's clock")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError("the certificate was not issued by this mesh's CA") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthError("the certificate has expired or is not yet valid")
    uri = certificate_spiffe_id(cert)
    identity = parse_spiffe_id(uri) if uri else None
    if identity is None or identity.trust_domain != trust_domain or not identity.is_workload:
        raise AuthError("the certificate names no workload of this trust domain")
    text = _signed_text(method, target, timestamp, body)
    public_key = cert.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, text, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, text)
        else:
            raise AuthError("unsupported workload key type")
    except InvalidSignature:
        raise AuthError("the signature does not verify with the certificate's key") from None
    if identity.namespace is None or identity.service is None:
        raise AuthError("the certificate's SPIFFE ID is not /ns/<namespace>/sa/<service>")
    return Workload(uri, identity.namespace, identity.service, cert.not_valid_after_utc)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JoinToken:
    """``mpt.<id>.<secret>``: the store keeps the id and the secret's digest, never the secret."""

    id: str
    secret: str

    @classmethod
    def generate(cls) -> JoinToken:
        return cls(secrets.token_hex(8), secrets.token_urlsafe(24))

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        prefix, _, rest = text.strip().partition(".")
        token_id, _, secret = rest.partition(".")
        if prefix != TOKEN_PREFIX or not token_id or not secret:
            raise AuthError("malformed join token: expected mpt.<id>.<secret>")
        return cls(token_id, secret)

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.id}.{self.secret}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()

    def matches(self, digest: str) -> bool:
        return hmac.compare_digest(self.digest, digest)


def check_admin_token(header: str | None, expected: str) -> None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing admin token: send Authorization: Bearer <token>")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthError("wrong admin token")
