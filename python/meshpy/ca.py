"""The mesh certificate authority: SPIFFE IDs, root and intermediate CAs, workload certificates.

Every workload is named by a SPIFFE ID, ``spiffe://<trust domain>/ns/<namespace>/sa/<service>``,
carried as the single URI SAN of an X.509-SVID (https://github.com/spiffe/spiffe, standards
SPIFFE-ID.md and X509-SVID.md). A CA lives in a directory:

    ca.pem      the CA's certificate
    ca.key      its private key, PKCS#8 PEM, mode 0600 (created that way)
    bundle.pem  the trust anchors: the root certificate(s)
    chain.pem   intermediates only: this CA's certificate and any above it, the root excluded
    ca.json     {"version": 1, "kind": "root" | "intermediate", "trust_domain": "..."}

A root signs intermediates (path length 1) and workload certificates; an intermediate
(path length 0) signs workload certificates only, so the root's key can stay offline.

A workload directory written by `write_pem_files` holds ``cert.pem`` (the leaf followed by the
intermediates, what a TLS peer presents), ``key.pem`` (0600) and ``bundle.pem``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import parse_duration
from .errors import MeshpyError

__all__ = [
    "CLOCK_SKEW",
    "KEY_TYPES",
    "CADirectoryError",
    "CAError",
    "CertificateAuthority",
    "InvalidCSRError",
    "InvalidNameError",
    "IssuedCertificate",
    "SpiffeId",
    "check_chain",
    "describe",
    "generate_csr",
    "generate_key",
    "parse_spiffe_id",
    "parse_ttl",
    "spiffe_id",
    "validate_trust_domain",
    "write_pem_files",
]

KeyType: TypeAlias = Literal["ecdsa-p256", "ed25519"]
KEY_TYPES: tuple[str, ...] = ("ecdsa-p256", "ed25519")

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
Ttl: TypeAlias = float | int | str | dt.timedelta

# Certificates start this long before they are issued, for peers whose clocks run behind.
CLOCK_SKEW = dt.timedelta(minutes=1)

DAY = 86400.0
ROOT_TTL = 3650 * DAY
INTERMEDIATE_TTL = 365 * DAY
WORKLOAD_TTL = 24 * 3600.0
MAX_TTL = 100 * 365 * DAY

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_BUNDLE = "bundle.pem"
CA_CHAIN = "chain.pem"
CA_META = "ca.json"
CA_FILES = (CA_CERT, CA_KEY, CA_BUNDLE, CA_CHAIN, CA_META)
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BUNDLE_FILE = "bundle.pem"

Kind: TypeAlias = Literal["root", "intermediate"]


class CAError(MeshpyError):
    """A CA operation failed: files that cannot be read or written, an expired CA, a refusal."""


class CADirectoryError(CAError):
    """The directory given is not a meshpy CA directory (missing, or no ``ca.json``)."""


class InvalidNameError(CAError, ValueError):
    """A SPIFFE ID, trust domain, namespace, service or DNS name that is not allowed."""


class InvalidCSRError(CAError, ValueError):
    """A certificate signing request that is unreadable, badly signed or has an unusable key."""


# --- names ------------------------------------------------------------------------------------

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_TRUST_DOMAIN = 255
_MAX_SPIFFE_ID = 2048


def _trust_domain_problem(name: object) -> str | None:
    """What is wrong with a trust domain, as a phrase completing "the trust domain ..."."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if len(name) > _MAX_TRUST_DOMAIN:
        return f"is longer than {_MAX_TRUST_DOMAIN} characters"
    if _TRUST_DOMAIN.fullmatch(name):
        return None
    if _TRUST_DOMAIN.fullmatch(name.lower()):
        return f"must be lower case ({name.lower()!r})"
    return "may hold only lower-case letters, digits, '.', '-' and '_' (no scheme, port or path)"


def _segment_problem(segment: str) -> str | None:
    if not segment:
        return "path segments must not be empty (no '//' and no trailing '/')"
    if segment in (".", ".."):
        return f"path segments must not be {segment!r}"
    if not _SEGMENT.fullmatch(segment):
        return f"path segment {segment!r} may hold only letters, digits, '.', '-' and '_'"
    return None


def validate_trust_domain(name: str) -> str:
    """Return `name` if it is a valid SPIFFE trust domain, else raise InvalidNameError."""
    problem = _trust_domain_problem(name)
    if problem:
        raise InvalidNameError(f"invalid trust domain {name!r}: it {problem}")
    return name


def _validate_name(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise InvalidNameError(f"invalid {what}: expected a string, got {type(value).__name__}")
    problem = _segment_problem(value)
    if problem is None:
        return value
    if not value:
        problem = "it is empty"
    elif value in (".", ".."):
        problem = f"it cannot be {value!r}"
    else:
        problem = "only letters, digits, '.', '-' and '_' are allowed"
    raise InvalidNameError(f"invalid {what} {value!r}: {problem}")


def validate_service(name: str) -> str:
    """Return `name` if it can be the service (``sa``) part of a SPIFFE ID."""
    return _validate_name("service name", name)


def validate_namespace(name: str) -> str:
    """Return `name` if it can be the namespace (``ns``) part of a SPIFFE ID."""
    return _validate_name("namespace", name)


def validate_dns_name(name: str) -> str:
    """Return `name` lower-cased if it is a DNS name (``*.`` allowed as the first label)."""
    text = name.lower().rstrip(".") if isinstance(name, str) else ""
    labels = text.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if (
        not text
        or len(text) > 253
        or not labels
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidNameError(
            f"invalid DNS name {name!r}: expected labels of letters, digits and '-'"
            " such as payments.shop.svc.cluster.local"
        )
    return text


@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID. ``str()`` gives the URI."""

    trust_domain: str
    path: str  # "" for a trust domain's own ID, else "/seg/seg..."

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def uri(self) -> str:
        return str(self)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def is_workload(self) -> bool:
        """Leaf SVIDs need a path; the bare trust domain ID belongs to CAs."""
        return bool(self.path)

    @property
    def namespace(self) -> str | None:
        """``shop`` for ``/ns/shop/sa/payments``; None for IDs of any other shape."""
        parts = self.segments
        return parts[1] if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa" else None

    @property
    def service(self) -> str | None:
        """``payments`` for ``/ns/shop/sa/payments``; None for IDs of any other shape."""
        parts = self.segments
        return parts[3] if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa" else None


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID per the SPIFFE-ID spec.

    ``spiffe://`` (lower case), a trust domain of lower-case letters, digits, ``.``, ``-`` and
    ``_``, then an optional path of non-empty segments of letters, digits, ``.``, ``-`` and
    ``_`` that are not ``.`` or ``..``; no port, user info, query, fragment, percent-encoding
    or trailing slash; at most 2048 bytes. Raises InvalidNameError naming the problem.
    """

    def bad(problem: str) -> InvalidNameError:
        return InvalidNameError(f"invalid SPIFFE ID {uri!r}: {problem}")

    if not isinstance(uri, str):
        raise InvalidNameError(f"invalid SPIFFE ID: expected a string, got {type(uri).__name__}")
    if len(uri.encode()) > _MAX_SPIFFE_ID:
        raise bad(f"longer than {_MAX_SPIFFE_ID} bytes")
    if not uri.startswith("spiffe://"):
        if uri[:9].lower() == "spiffe://":
            raise bad("the scheme must be 'spiffe' in lower case")
        raise bad("it must start with 'spiffe://'")
    trust_domain, slash, path = uri[len("spiffe://") :].partition("/")
    problem = _trust_domain_problem(trust_domain)
    if problem:
        raise bad(f"the trust domain {trust_domain!r} {problem}")
    if not slash:
        return SpiffeId(trust_domain, "")
    for segment in path.split("/"):
        problem = _segment_problem(segment)
        if problem:
            raise bad(problem)
    return SpiffeId(trust_domain, "/" + path)


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service>``, each part validated."""
    validate_trust_domain(trust_domain)
    validate_namespace(namespace)
    validate_service(service)
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


# --- ttls -------------------------------------------------------------------------------------

_DAYS = re.compile(r"\s*(\d+)d")


def parse_ttl(value: Ttl) -> float:
    """Seconds from a certificate lifetime, between 1s and 100 years.

    Strings take everything `meshpy.config.parse_duration` does (``30s``, ``90m``, ``24h``,
    ``1h30m``) plus a leading number of days (``3650d``, ``1d12h``): parse_duration stops at one
    year, which is short for a root. Numbers are seconds; a timedelta is taken as is.
    """
    seconds: float
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        days, rest = 0, value
        if isinstance(value, str) and (match := _DAYS.match(value)):
            days, rest = int(match.group(1)), value[match.end() :]
        try:
            seconds = days * DAY
            if not (days and isinstance(rest, str) and not rest.strip()):
                seconds += parse_duration(rest)
        except ValueError as exc:
            too_long = "at most" in str(exc)  # parse_duration's one-year limit
            hint = " (write ttls over a year in days, such as 3650d)" if too_long else ""
            raise ValueError(
                f"expected a ttl such as 30s, 90m, 24h or 3650d, got {value!r}{hint}"
            ) from None
    if not math.isfinite(seconds) or seconds < 1:
        raise ValueError(f"expected a ttl of at least 1s, got {value!r}")
    if seconds > MAX_TTL:
        raise ValueError(f"expected a ttl of at most 36500d (100 years), got {value!r}")
    return seconds


def _format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _format_span(delta: dt.timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return "".join(shown) or "0s"


# --- keys and certificates --------------------------------------------------------------------


def generate_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A new private key: ``ecdsa-p256`` (the default) or ``ed25519``."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r} (known: {', '.join(KEY_TYPES)})")


def _key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def describe_key(public_key: object) -> str:
    """``ECDSA P-256``, ``Ed25519``, ``RSA 2048``..."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    return type(public_key).__name__


def _check_workload_key(public_key: object) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in ("secp256r1", "secp384r1"):
            return
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    elif isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return
    raise InvalidCSRError(
        f"unsupported key {describe_key(public_key)}: expected ECDSA P-256 or P-384,"
        " Ed25519, or RSA of 2048 bits or more"
    )


def _serial() -> int:
    # 128 random bits; never zero, which RFC 5280 forbids.
    return secrets.randbits(128) or 1


def _ca_name(trust_domain: str, kind: Kind) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshpy {kind} CA"),
        ]
    )


def _validity(
    now: dt.datetime, ttl: float, issuer: x509.Certificate | None
) -> tuple[dt.datetime, dt.datetime]:
    """Backdated by CLOCK_SKEW, ending at the next whole second after `ttl`, inside the issuer."""
    not_before = (now - CLOCK_SKEW).replace(microsecond=0)
    end = now + dt.timedelta(seconds=ttl)
    not_after = end.replace(microsecond=0) + dt.timedelta(seconds=1 if end.microsecond else 0)
    if issuer is not None:
        not_before = max(not_before, issuer.not_valid_before_utc)
        not_after = min(not_after, issuer.not_valid_after_utc)
    return not_before, not_after


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def certificate_spiffe_id(cert: x509.Certificate) -> str | None:
    """The SPIFFE ID in a certificate's URI SAN, or None when it has no single spiffe:// URI."""
    uris = _uri_sans(cert)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return uris[0]


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _basic_constraints(cert)
    return constraints is not None and constraints.ca


def _load_certs(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"{source}: holds no PEM certificate") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path}: missing") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot be read: {exc.strerror or exc}") from None


# --- writing files ----------------------------------------------------------------------------


def _write_new(path: Path, data: str, mode: int) -> None:
    """Create `path` with `mode`; fail if it exists. The file is never wider than `mode`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CAError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot be created: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise CAError(f"{path}: cannot be written: {exc.strerror or exc}") from None


def _replace(path: Path, data: str, mode: int) -> None:
    """Atomically replace `path`: readers see the old file or the new one, never a part."""
    try:
        # mkstemp creates the file 0600 with O_EXCL, so a key is never readable by others.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CAError(f"{path}: cannot be written: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CAError(f"{path}: cannot be written: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --- issued certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A workload certificate and what goes with it.

    `not_before` is backdated by CLOCK_SKEW; `issued_at` is when it was signed, so a
    rotation schedule should count from `issued_at` (see `renew_at`).
    """

    cert_pem: str  # the leaf alone
    key_pem: str | None  # PKCS#8 PEM; None when signed from a CSR (the key stayed with its owner)
    chain_pem: str  # the leaf followed by the issuing intermediates: what a TLS peer presents
    bundle_pem: str  # the trust anchors the chain leads to
    spiffe_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode("ascii"))

    @property
    def lifetime(self) -> dt.timedelta:
        """From issuance to expiry (shorter than the ttl asked for when the CA expires first)."""
        return self.not_after - self.issued_at

    def renew_at(self, fraction: float = 2 / 3) -> dt.datetime:
        """When `fraction` of the lifetime has passed: the moment to rotate."""
        if not 0 < fraction <= 1:
            raise ValueError(f"expected a fraction in (0, 1], got {fraction!r}")
        return self.issued_at + self.lifetime * fraction


def write_pem_files(
    out_dir: str | os.PathLike[str], issued: IssuedCertificate, *, key_pem: str | None = None
) -> dict[str, Path]:
    """Write ``cert.pem`` (the chain), ``key.pem`` (0600) and ``bundle.pem`` into `out_dir`.

    `key_pem` supplies the key when `issued` came from a CSR. The directory is created if
    needed; each file is replaced atomically, in the order bundle, key, cert (new trust
    anchors are in place before a certificate that needs them). The three are not replaced
    together: a reader that finds the key not matching the certificate should read again.
    Returns the paths by file name.
    """
    key = issued.key_pem if key_pem is None else key_pem
    if key is None:
        raise ValueError("no private key to write: pass key_pem for a certificate from a CSR")
    out = Path(out_dir)
    if (out / CA_META).exists():
        raise CAError(f"{out} is a CA directory; write workload certificates somewhere else")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CAError(f"{out}: cannot create the directory: {exc.strerror or exc}") from None
    paths = {name: out / name for name in (BUNDLE_FILE, KEY_FILE, CERT_FILE)}
    _replace(paths[BUNDLE_FILE], issued.bundle_pem, 0o644)
    _replace(paths[KEY_FILE], key, 0o600)
    _replace(paths[CERT_FILE], issued.chain_pem, 0o644)
    return paths


def generate_csr(key_type: str = "ecdsa-p256") -> tuple[str, str]:
    """A new key and a CSR for it, as ``(csr_pem, key_pem)``: what a workload sends to a CA.

    The CSR names nothing; the CA decides the identity (`CertificateAuthority.sign_csr`).
    """
    key = generate_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii"), _key_pem(key)


# --- the CA -----------------------------------------------------------------------------------


class CertificateAuthority:
    """A root or intermediate CA held in memory: `create_root`, `load`, then `issue`."""

    def __init__(
        self,
        *,
        trust_domain: str,
        kind: Kind,
        certificate: x509.Certificate,
        key: PrivateKey,
        chain: Sequence[x509.Certificate],
        bundle: Sequence[x509.Certificate],
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self.kind: Kind = kind
        self.certificate = certificate
        self._key = key
        # This CA's certificate and the intermediates above it, the root excluded ([] for a root).
        self.chain: list[x509.Certificate] = list(chain)
        self.bundle: list[x509.Certificate] = list(bundle)

    def __repr__(self) -> str:
        return (
            f"<CertificateAuthority {self.kind} spiffe://{self.trust_domain}"
            f" until {_format_time(self.not_after)}>"
        )

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}"

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def certificate_pem(self) -> str:
        return _cert_pem(self.certificate)

    @property
    def chain_pem(self) -> str:
        return "".join(_cert_pem(cert) for cert in self.chain)

    @property
    def bundle_pem(self) -> str:
        return "".join(_cert_pem(cert) for cert in self.bundle)

    @property
    def key_type(self) -> str:
        return describe_key(self._key.public_key())

    # creating and storing

    @classmethod
    def create_root(
        cls, trust_domain: str, *, key_type: str = "ecdsa-p256", ttl: Ttl = ROOT_TTL
    ) -> CertificateAuthority:
        """A new self-signed root CA for `trust_domain` (10 years by default)."""
        validate_trust_domain(trust_domain)
        seconds = parse_ttl(ttl)
        key = generate_key(key_type)
        now = dt.datetime.now(dt.UTC)
        not_before, not_after = _validity(now, seconds, None)
        name = _ca_name(trust_domain, "root")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(_ski(key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, _hash_for(key))
        )
        return cls(
            trust_domain=trust_domain,
            kind="root",
            certificate=cert,
            key=key,
            chain=[],
            bundle=[cert],
        )

    def create_intermediate(
        self, *, ttl: Ttl = INTERMEDIATE_TTL, key_type: str = "ecdsa-p256"
    ) -> CertificateAuthority:
        """A new intermediate CA signed by this root (path length 0: it signs workloads only).

        Its validity ends no later than this CA's.
        """
        constraints = _basic_constraints(self.certificate)
        if self.kind != "root" or constraints is None or constraints.path_length == 0:
            raise CAError(
                "an intermediate CA cannot sign another CA (path length 0);"
                " create intermediates from the root CA"
            )
        seconds = parse_ttl(ttl)
        now = dt.datetime.now(dt.UTC)
        self._check_usable(now)
        key = generate_key(key_type)
        not_before, not_after = _validity(now, seconds, self.certificate)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_ca_name(self.trust_domain, "intermediate"))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(_ski(key.public_key()), critical=False)
            .add_extension(_aki(self.certificate), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.spiffe_id)]),
                critical=False,
            )
            .sign(self._key, _hash_for(self._key))
        )
        return CertificateAuthority(
            trust_domain=self.trust_domain,
            kind="intermediate",
            certificate=cert,
            key=key,
            chain=[cert, *self.chain],
            bundle=self.bundle,
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the CA directory. Refuses (CAError) if any CA file is already there."""
        out = Path(directory)
        existing = [name for name in CA_FILES if (out / name).exists()]
        if existing:
            raise CAError(
                f"{out} already holds a CA ({', '.join(existing)}); refusing to overwrite it"
            )
        try:
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CAError(f"{out}: cannot create the directory: {exc.strerror or exc}") from None
        _write_new(out / CA_KEY, _key_pem(self._key), 0o600)
        _write_new(out / CA_CERT, self.certificate_pem, 0o644)
        if self.kind == "intermediate":
            _write_new(out / CA_CHAIN, self.chain_pem, 0o644)
        _write_new(out / CA_BUNDLE, self.bundle_pem, 0o644)
        # Written last: a directory without ca.json is not a CA (an interrupted init).
        meta = {"version": 1, "kind": self.kind, "trust_domain": self.trust_domain}
        _write_new(out / CA_META, json.dumps(meta, indent=2) + "\n", 0o644)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Read a CA directory and check that its files belong together."""
        where = Path(directory)
        if not where.exists():
            raise CADirectoryError(f"{where}: no such CA directory")
        if not where.is_dir():
            raise CADirectoryError(f"{where}: not a directory (expected a CA directory)")
        if not (where / CA_META).is_file():
            raise CADirectoryError(
                f"{where} is not a meshpy CA directory (it has no {CA_META});"
                " create one with `meshpy ca init`"
            )
        try:
            meta = json.loads(_read(where / CA_META))
        except ValueError as exc:
            raise CAError(f"{where / CA_META}: not valid JSON: {exc}") from None
        kind = meta.get("kind") if isinstance(meta, dict) else None
        trust_domain = meta.get("trust_domain") if isinstance(meta, dict) else None
        if kind not in ("root", "intermediate"):
            raise CAError(f"{where / CA_META}: 'kind' must be 'root' or 'intermediate'")
        problem = _trust_domain_problem(trust_domain)
        if problem or not isinstance(trust_domain, str):
            raise CAError(f"{where / CA_META}: the trust_domain {trust_domain!r} {problem}")

        certs = _load_certs(_read(where / CA_CERT), str(where / CA_CERT))
        if len(certs) != 1:
            raise CAError(f"{where / CA_CERT}: expected one certificate, found {len(certs)}")
        cert = certs[0]
        try:
            key = serialization.load_pem_private_key(_read(where / CA_KEY), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CAError(f"{where / CA_KEY}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise CAError(f"{where / CA_KEY}: unsupported key type {type(key).__name__}")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise CAError(f"{where / CA_KEY} is not the key of {where / CA_CERT}")
        if not _is_ca(cert):
            raise CAError(f"{where / CA_CERT} is not a CA certificate")
        cert_id = certificate_spiffe_id(cert)
        if cert_id is not None and cert_id != f"spiffe://{trust_domain}":
            raise CAError(
                f"{where / CA_CERT} is for {cert_id}, but {CA_META} says spiffe://{trust_domain}"
            )
        bundle = _load_certs(_read(where / CA_BUNDLE), str(where / CA_BUNDLE))
        if not bundle:
            raise CAError(f"{where / CA_BUNDLE}: holds no certificate")
        chain: list[x509.Certificate] = []
        if kind == "intermediate":
            chain = _load_certs(_read(where / CA_CHAIN), str(where / CA_CHAIN))
            if not chain or chain[0] != cert:
                raise CAError(f"{where / CA_CHAIN} must start with the certificate in {CA_CERT}")
        elif cert not in bundle:
            raise CAError(f"{where / CA_BUNDLE} does not hold the root certificate {CA_CERT}")
        return cls(
            trust_domain=trust_domain,
            kind=kind,
            certificate=cert,
            key=key,
            chain=chain,
            bundle=bundle,
        )

    # issuing

    def _check_usable(self, now: dt.datetime) -> None:
        if self.certificate.not_valid_after_utc <= now:
            raise CAError(
                f"the {self.kind} CA for {self.spiffe_id} expired at"
                f" {_format_time(self.certificate.not_valid_after_utc)}"
            )

    def issue(
        self,
        service: str,
        namespace: str,
        ttl: Ttl = WORKLOAD_TTL,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        key_type: str = "ecdsa-p256",
    ) -> IssuedCertificate:
        """A new key and a workload certificate for ``spiffe://<td>/ns/<namespace>/sa/<service>``.

        `dns_names` and `ip_addresses` are added as SANs for clients that check a host name
        (the control plane's own certificate is checked that way by httpx).
        """
        identity = parse_spiffe_id(spiffe_id(self.trust_domain, namespace, service))
        key = generate_key(key_type)
        return self._sign(
            key.public_key(), identity, ttl, dns_names, key_pem=_key_pem(key), ips=ip_addresses
        )

    def sign_csr(
        self,
        csr_pem: str | bytes,
        spiffe_id: str,
        ttl: Ttl = WORKLOAD_TTL,
        *,
        dns_names: Iterable[str] = (),
    ) -> IssuedCertificate:
        """Sign a workload's CSR as `spiffe_id`, which must be in this CA's trust domain.

        The CSR's signature must verify (it proves the requester holds the key). Everything
        else the CSR asks for (subject, SANs, extensions) is ignored: the certificate names
        `spiffe_id` and the given `dns_names`, nothing more. The result has no key_pem.
        """
        identity = parse_spiffe_id(spiffe_id)
        if identity.trust_domain != self.trust_domain:
            raise InvalidNameError(
                f"{spiffe_id} is not in this CA's trust domain {self.trust_domain}"
            )
        if not identity.is_workload:
            raise InvalidNameError(
                f"{spiffe_id} names a trust domain, not a workload (a path is required)"
            )
        data = csr_pem.encode("ascii") if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except (ValueError, UnicodeError) as exc:
            raise InvalidCSRError(f"not a PEM certificate signing request ({exc})") from None
        try:
            public_key = csr.public_key()
            valid = csr.is_signature_valid
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise InvalidCSRError(f"the CSR cannot be checked: {exc}") from None
        if not valid:
            raise InvalidCSRError("the CSR's signature does not verify with its public key")
        return self._sign(public_key, identity, ttl, dns_names, key_pem=None)

    def _sign(
        self,
        public_key: object,
        identity: SpiffeId,
        ttl: Ttl,
        dns_names: Iterable[str],
        *,
        key_pem: str | None,
        ips: Iterable[str] = (),
    ) -> IssuedCertificate:
        _check_workload_key(public_key)
        seconds = parse_ttl(ttl)
        dns = list(dict.fromkeys(validate_dns_name(name) for name in dns_names))
        now = dt.datetime.now(dt.UTC)
        self._check_usable(now)
        not_before, not_after = _validity(now, seconds, self.certificate)
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=is_rsa,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        names += [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain)])
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_ski(public_key), critical=False)
            .add_extension(_aki(self.certificate), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self._key, _hash_for(self._key))
        )
        cert_pem = _cert_pem(cert)
        return IssuedCertificate(
            cert_pem=cert_pem,
            key_pem=key_pem,
            chain_pem=cert_pem + self.chain_pem,
            bundle_pem=self.bundle_pem,
            spiffe_id=str(identity),
            not_before=not_before,
            not_after=not_after,
            issued_at=now,
        )


# --- checking and showing ---------------------------------------------------------------------


def _label(cert: x509.Certificate) -> str:
    return certificate_spiffe_id(cert) or cert.subject.rfc4514_string() or "(empty subject)"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_chain(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    *,
    at: dt.datetime | None = None,
) -> list[x509.Certificate]:
    """The path from `cert` through `chain` to an anchor in `bundle`, or CAError saying why not.

    Checks names, signatures, validity at `at` (default: now), CA flags and path lengths.
    A diagnostic for `meshpy ca show` and for checking files before use; it is not a full
    RFC 5280 validator (no name constraints, policies or revocation).
    """
    now = at or dt.datetime.now(dt.UTC)
    pool = [c for c in chain if c != cert]
    path = [cert]
    current = cert
    while True:
        if current.not_valid_after_utc < now:
            raise CAError(
                f"{_label(current)} expired at {_format_time(current.not_valid_after_utc)}"
            )
        if current.not_valid_before_utc > now:
            raise CAError(
                f"{_label(current)} is not valid before"
                f" {_format_time(current.not_valid_before_utc)}"
            )
        if current in bundle:
            return path
        issuer = next((a for a in bundle if _is_ca(a) and _issued_by(current, a)), None)
        if issuer is None:
            issuer = next((c for c in pool if _is_ca(c) and _issued_by(current, c)), None)
            if issuer is None:
                raise CAError(
                    f"{_label(current)} (issuer {current.issuer.rfc4514_string()}) was not"
                    " signed by any certificate in the bundle or the chain"
                )
            pool.remove(issuer)
        constraints = _basic_constraints(issuer)
        below = len(path) - 1  # CA certificates between the leaf and `issuer`
        if constraints and constraints.path_length is not None and below > constraints.path_length:
            raise CAError(f"{_label(issuer)} allows {constraints.path_length} CAs below it")
        path.append(issuer)
        current = issuer
        if len(path) > 10:
            raise CAError("the chain is longer than 10 certificates")


def _load_any(path: Path) -> tuple[Path, list[x509.Certificate], Path | None]:
    """The file to show, its certificates and the directory to look for bundle.pem in."""
    if path.is_dir():
        if (path / CA_META).is_file():
            files = [path / CA_CERT] + ([path / CA_CHAIN] if (path / CA_CHAIN).is_file() else [])
        elif (path / CERT_FILE).is_file():
            files = [path / CERT_FILE]
        else:
            raise CADirectoryError(f"{path} holds neither a CA ({CA_META}) nor a {CERT_FILE}")
        certs = [c for f in files for c in _load_certs(_read(f), str(f))]
        return files[0], certs, path
    if not path.exists():
        raise CADirectoryError(f"{path}: no such file or directory")
    return path, _load_certs(_read(path), str(path)), path.parent


def describe(
    path: str | os.PathLike[str], bundle: str | os.PathLike[str] | None = None
) -> tuple[str, bool]:
    """What `meshpy ca show` prints about a certificate file or a CA/workload directory.

    Returns the text and whether the certificate chains to the bundle (`bundle`, else the
    ``bundle.pem`` beside it); True as well when there is no bundle to check against.
    """
    shown, certs, where = _load_any(Path(path))
    if not certs:
        raise CAError(f"{shown}: holds no certificate")
    cert, chain = certs[0], certs[1:]
    now = dt.datetime.now(dt.UTC)
    constraints = _basic_constraints(cert)
    if constraints is not None and constraints.ca:
        root = cert.issuer == cert.subject and _issued_by(cert, cert)
        kind = "root CA" if root else "intermediate CA"
        if constraints.path_length is not None:
            kind += f" (path length {constraints.path_length})"
    else:
        kind = "workload certificate"
    if now > cert.not_valid_after_utc:
        state = f"expired {_format_span(now - cert.not_valid_after_utc)} ago"
    elif now < cert.not_valid_before_utc:
        state = f"not valid for another {_format_span(cert.not_valid_before_utc - now)}"
    else:
        state = f"expires in {_format_span(cert.not_valid_after_utc - now)}"
    rows = [
        ("file", str(shown)),
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("spiffe id", certificate_spiffe_id(cert) or "(none)"),
    ]
    dns = _dns_sans(cert)
    if dns:
        rows.append(("dns names", ", ".join(dns)))
    rows += [
        ("issuer", cert.issuer.rfc4514_string() or "(empty)"),
        ("kind", kind),
        ("key", describe_key(cert.public_key())),
        ("serial", f"{cert.serial_number:x}"),
        ("not before", _format_time(cert.not_valid_before_utc)),
        ("not after", f"{_format_time(cert.not_valid_after_utc)} ({state})"),
    ]
    ok = True
    bundle_path = Path(bundle) if bundle is not None else (where / BUNDLE_FILE if where else None)
    if bundle_path is None or (bundle is None and not bundle_path.is_file()):
        rows.append(("chains to", "not checked: no bundle.pem beside it (pass --bundle FILE)"))
    else:
        anchors = _load_certs(_read(bundle_path), str(bundle_path))
        try:
            found = check_chain(cert, chain, anchors, at=now)
        except CAError as exc:
            ok = False
            rows.append(("chains to", f"NO: {bundle_path}: {exc}"))
        else:
            if len(found) == 1:
                rows.append(("chains to", f"yes: it is a trust anchor in {bundle_path}"))
            else:
                middle = len(found) - 2
                via = f" through {middle} intermediate{'s' * (middle != 1)}" if middle else ""
                rows.append(("chains to", f"yes: {bundle_path}{via}"))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name + ':':<{width}}{value}" for name, value in rows), ok
