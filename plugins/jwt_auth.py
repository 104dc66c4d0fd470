"""Verify ``Authorization: Bearer <JWT>`` before the request goes upstream.

Tokens are checked with PyJWT against one key source:

- ``secret`` (or ``secret_env``, the name of an environment variable holding it): a
  shared secret for HS256/HS384/HS512, at least as many bytes as the hash (RFC 7518 3.2).
- ``jwks_file``: a JSON Web Key Set (``{"keys": [...]}``) read once when the filter is
  created, relative paths from the directory meshpy runs in. Every key needs a ``kid``;
  a token must name its key in its ``kid`` header and is verified with that key's
  algorithm only: its ``alg`` member, or RS256 for an RSA key, ES256/ES384/ES512 for an EC
  key by curve. Reload the config to pick up a changed file.

``algorithms`` lists what tokens may use (default HS256 with a secret, RS256 with a JWKS);
a token cannot pick anything else, and ``none`` is never accepted. ``exp`` is required
unless ``required_claims`` says otherwise; ``audience`` and ``issuer``, when given, must
match (and a token carrying ``aud`` is refused when no ``audience`` is set); ``leeway`` is
the clock skew allowed, in seconds.

A request without a bearer token gets 401 with ``WWW-Authenticate: Bearer``; one with a
bad token gets 401 with ``error="invalid_token"`` and an ``error_description`` saying why;
one with several ``Authorization`` headers gets 400 ``invalid_request`` (RFC 6750 3.1).
A valid token's claims go to ``req.ctx["jwt"]``, and its ``sub`` upstream in
``forward_subject_header`` (default ``x-jwt-sub``; null to turn it off). A client's own
value of that header is always removed, so the upstream can trust it.

.. code-block:: yaml

    routes:
      - match: {path_prefix: /api}
        cluster: api
        filters:
          - plugins.jwt_auth:JwtBearer:
              jwks_file: keys/jwks.json     # or secret_env: JWT_SECRET
              algorithms: [RS256, ES256]
              audience: api.example.com
              issuer: https://auth.example.com/
              leeway: 30
"""

import json
import os
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import get_default_algorithms

import meshpy

# The shortest secret for each HMAC algorithm: as long as its hash (RFC 7518 3.2).
HMAC_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048


class UnknownKeyError(jwt.InvalidTokenError):
    """The token names no key of the JWKS."""


# The first matching type gives the error_description (subclasses before their bases).
REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is meant for another audience"),
    (jwt.InvalidIssuerError, "the token comes from an unexpected issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (UnknownKeyError, "the token's key is unknown"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.DecodeError, "the token is malformed"),
)


def describe(exc: jwt.PyJWTError) -> str:
    """Why a token was refused, for the client."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the {exc.claim} claim"
    for kind, reason in REASONS:
        if isinstance(exc, kind):
            return reason
    return "the token is invalid"


def refuse(status: int, error: str, description: str) -> meshpy.Response:
    """An RFC 6750 error response; the description keeps only the characters it allows."""
    safe = "".join(c for c in description if " " <= c <= "~" and c not in '"\\')
    challenge = f'Bearer error="{error}", error_description="{safe}"'
    return meshpy.Response(status, f"{safe}\n", {"www-authenticate": challenge})


def load_jwks(path: str) -> dict[str, jwt.PyJWK]:
    """The signing keys of the JWK Set in `path`, by kid; raises ValueError saying why not."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read jwks_file {path!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"jwks_file {path!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'jwks_file {path!r} is not a JWK Set: expected {{"keys": [...]}}')
    keys: dict[str, jwt.PyJWK] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"jwks_file {path!r}: every signing key needs a kid")
        if kid in keys:
            raise ValueError(f"jwks_file {path!r}: kid {kid!r} is used twice")
        if "d" in entry:
            raise ValueError(f"jwks_file {path!r}: key {kid!r} is private; give public keys")
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ValueError(f"jwks_file {path!r}: key {kid!r}: {exc}") from None
        if isinstance(key.key, RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
            bits = key.key.key_size
            raise ValueError(f"jwks_file {path!r}: key {kid!r} has {bits} bits, under 2048")
        keys[kid] = key
    if not keys:
        raise ValueError(f"jwks_file {path!r} has no signing keys")
    return keys


class JwtBearer(meshpy.Filter):
    """Refuse requests without a valid bearer JWT; pass its claims and subject on."""

    def __init__(
        self,
        secret: str | None = None,
        secret_env: str | None = None,
        jwks_file: str | None = None,
        algorithms: list[str] | None = None,
        audience: str | list[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0,
        required_claims: list[str] | None = None,
        forward_subject_header: str | None = "x-jwt-sub",
    ) -> None:
        if [secret, secret_env, jwks_file].count(None) != 2:
            raise ValueError("give exactly one of secret, secret_env and jwks_file")
        if secret_env is not None:
            secret = os.environ.get(secret_env)
            if not secret:
                raise ValueError(f"environment variable {secret_env} is not set")
        if leeway < 0:
            raise ValueError(f"leeway must be 0 or more seconds, got {leeway}")
        if algorithms is None:
            algorithms = ["HS256"] if secret is not None else ["RS256"]
        if not algorithms:
            raise ValueError("algorithms is empty, so every token would be refused")
        for name in algorithms:
            if name.lower() == "none":
                raise ValueError("unsigned tokens (alg none) are never accepted")
            if name not in get_default_algorithms():
                raise ValueError(f"unknown algorithm {name!r}")
            if secret is None and name in HMAC_SECRET_BYTES:
                raise ValueError(f"{name} needs a secret, not a jwks_file")
            if secret is not None:
                if name not in HMAC_SECRET_BYTES:
                    raise ValueError(f"{name} needs a jwks_file; a secret is for HS256/384/512")
                if len(secret.encode()) < HMAC_SECRET_BYTES[name]:
                    raise ValueError(
                        f"the secret is too short: {name} needs {HMAC_SECRET_BYTES[name]} bytes"
                    )
        self.secret = secret
        self.keys = load_jwks(jwks_file) if jwks_file is not None else {}
        if jwks_file is not None and not any(
            key.algorithm_name in algorithms for key in self.keys.values()
        ):
            raise ValueError(f"no key of jwks_file {jwks_file!r} is for {', '.join(algorithms)}")
        self.algorithms = algorithms
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.required_claims = ["exp"] if required_claims is None else required_claims
        self.forward_subject_header = forward_subject_header

    def on_request(self, req: meshpy.Request) -> meshpy.Response | None:
        if self.forward_subject_header is not None:
            req.headers.pop(self.forward_subject_header, None)
        values = req.headers.get_all("authorization")
        if len(values) > 1:
            return refuse(400, "invalid_request", "more than one Authorization header")
        scheme, _, token = (values[0] if values else "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return meshpy.Response(
                401, "a bearer token is required\n", {"www-authenticate": "Bearer"}
            )
        try:
            claims = self.verify(token)
        except jwt.PyJWTError as exc:
            return refuse(401, "invalid_token", describe(exc))
        req.ctx["jwt"] = claims
        subject = claims.get("sub")
        if self.forward_subject_header is not None and isinstance(subject, str):
            try:
                req.headers[self.forward_subject_header] = subject
            except ValueError:
                return refuse(401, "invalid_token", "the token's subject cannot go in a header")
        return None

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once its signature and claims check out; raises PyJWTError."""
        if self.secret is not None:
            key, algorithms = self.secret, self.algorithms
        else:
            kid = jwt.get_unverified_header(token).get("kid")
            jwk = self.keys.get(kid) if isinstance(kid, str) else None
            if jwk is None:
                raise UnknownKeyError("unknown kid")
            if jwk.algorithm_name not in self.algorithms:
                raise jwt.InvalidAlgorithmError("the key's algorithm is not accepted")
            # The key's own algorithm only, whatever the token's header claims.
            key, algorithms = jwk.key, [jwk.algorithm_name]
        return jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={"require": self.required_claims},
        )
