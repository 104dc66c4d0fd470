"""Unit tests of the example filters in plugins/, through meshpy.testing (no sockets)."""

import ast
import base64
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshpy import testing
from meshpy.filters import check_filter
from plugins.canary import CanaryRouter
from plugins.jwt_auth import JwtBearer
from plugins.ratelimit import TokenBucket
from plugins.request_id import CorrelationId
from plugins.tenant import RequireTenant

# --- tenant --------------------------------------------------------------------------------


def test_tenant_missing_header_is_refused_with_403() -> None:
    result = testing.run(RequireTenant(), testing.request("GET", "/orders"))
    assert result.short_circuited
    assert result.response is not None
    assert result.response.status == 403
    assert result.response.body == b"missing x-tenant header\n"


def test_tenant_empty_header_is_refused() -> None:
    result = testing.run(RequireTenant(), testing.request("GET", "/", {"x-tenant": ""}))
    assert result.short_circuited
    assert result.response is not None and result.response.status == 403


def test_tenant_is_stored_and_the_request_goes_upstream_unchanged() -> None:
    req = testing.request("GET", "/orders", {"x-tenant": "acme", "accept": "text/plain"})
    result = testing.run(RequireTenant(), req, response=testing.response(200))
    assert not result.short_circuited
    assert result.request.ctx["tenant"] == "acme"
    assert result.request.headers.items() == [("x-tenant", "acme"), ("accept", "text/plain")]
    assert result.response is not None and result.response.headers.items() == []


def test_tenant_custom_header() -> None:
    f = RequireTenant(header="x-org")
    assert testing.run(f, testing.request("GET", "/", {"x-tenant": "acme"})).short_circuited
    result = testing.run(f, testing.request("GET", "/", {"X-Org": "acme"}))
    assert not result.short_circuited
    assert result.request.ctx["tenant"] == "acme"


def test_tenant_allowed_list() -> None:
    f = RequireTenant(allowed=["acme", "globex"])
    allowed = testing.run(f, testing.request("GET", "/", {"x-tenant": "globex"}))
    assert not allowed.short_circuited
    refused = testing.run(f, testing.request("GET", "/", {"x-tenant": "initech"}))
    assert refused.response is not None
    assert refused.response.status == 403
    assert refused.response.body == b"tenant not allowed\n"


def test_tenant_given_twice_is_a_bad_request() -> None:
    req = testing.request("GET", "/", [("x-tenant", "acme"), ("x-tenant", "globex")])
    result = testing.run(RequireTenant(allowed=["acme"]), req)
    assert result.short_circuited
    assert result.response is not None and result.response.status == 400


def test_tenant_echo_on_the_response_only_when_asked() -> None:
    req = testing.request("GET", "/", {"x-tenant": "acme"})
    echoed = testing.run(RequireTenant(response_header="x-tenant"), req, testing.response(200))
    assert echoed.response is not None and echoed.response.headers["x-tenant"] == "acme"

    silent = RequireTenant()
    assert silent.on_response is None  # the route has no response phase to pay for
    req = testing.request("GET", "/", {"x-tenant": "acme"})
    result = testing.run(silent, req, testing.response(200))
    assert result.response is not None and "x-tenant" not in result.response.headers


def test_tenant_empty_allowed_list_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="allowed is empty"):
        RequireTenant(allowed=[])


# --- jwt_auth ------------------------------------------------------------------------------

SECRET = "s3cret-s3cret-s3cret-s3cret-0123"  # 32 bytes, the minimum for HS256


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


def bearer(token: str, **headers: str) -> Any:
    return testing.request("GET", "/api", {"authorization": f"Bearer {token}", **headers})


def refusal(result: testing.Result) -> tuple[int, str]:
    """The status and WWW-Authenticate header of a refused request."""
    assert result.short_circuited
    assert result.response is not None
    return result.response.status, result.response.headers["www-authenticate"]


def invalid_token(description: str) -> tuple[int, str]:
    return 401, f'Bearer error="invalid_token", error_description="{description}"'


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: Any) -> str:
    """A token signed as `header` says, with a header PyJWT itself would refuse to write."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    algorithm = jwt.get_algorithm_by_name(header["alg"])
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), key))}"


def test_jwt_valid_hs256_passes_claims_and_subject_upstream() -> None:
    token = jwt.encode(claims(role="admin"), SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(token))
    assert not result.short_circuited
    assert result.request.ctx["jwt"]["sub"] == "alice"
    assert result.request.ctx["jwt"]["role"] == "admin"
    assert result.request.headers.get_all("x-jwt-sub") == ["alice"]
    assert result.request.headers["authorization"] == f"Bearer {token}"


def test_jwt_client_cannot_forge_the_subject_header() -> None:
    forged = {"x-jwt-sub": "root"}
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(token, **forged))
    assert result.request.headers.get_all("x-jwt-sub") == ["alice"]

    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(no_sub, **forged))
    assert not result.short_circuited
    assert "x-jwt-sub" not in result.request.headers

    f = JwtBearer(secret=SECRET, forward_subject_header="x-user")
    result = testing.run(f, bearer(token, **forged))
    assert result.request.headers["x-user"] == "alice"
    assert result.request.headers["x-jwt-sub"] == "root"  # not this filter's header any more


def test_jwt_missing_token_gets_a_bare_bearer_challenge() -> None:
    f = JwtBearer(secret=SECRET)
    for headers in ({}, {"authorization": "Basic YWxpY2U6cHc="}, {"authorization": "Bearer "}):
        result = testing.run(f, testing.request("GET", "/api", headers))
        assert refusal(result) == (401, "Bearer")
        assert result.response is not None
        assert result.response.body == b"a bearer token is required\n"


def test_jwt_several_authorization_headers_are_an_invalid_request() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    req = testing.request(
        "GET", "/", [("authorization", f"Bearer {token}"), ("authorization", "Bearer x")]
    )
    status, challenge = refusal(testing.run(JwtBearer(secret=SECRET), req))
    assert status == 400
    assert challenge.startswith('Bearer error="invalid_request"')


def test_jwt_expired_token_is_refused_and_leeway_allows_skew() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(token))
    assert refusal(result) == invalid_token("the token has expired")
    assert result.response is not None
    assert result.response.body == b"the token has expired\n"
    assert not testing.run(JwtBearer(secret=SECRET, leeway=60), bearer(token)).short_circuited


def test_jwt_wrong_secret_is_refused() -> None:
    token = jwt.encode(claims(), "another-secret-another-secret-00", algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(token))
    assert refusal(result) == invalid_token("the token's signature does not verify")
    assert "jwt" not in result.request.ctx


def test_jwt_tampered_payload_is_refused() -> None:
    header, _, signature = jwt.encode(claims(), SECRET, algorithm="HS256").split(".")
    tampered = f"{header}.{b64(claims(sub='root'))}.{signature}"
    result = testing.run(JwtBearer(secret=SECRET), bearer(tampered))
    assert refusal(result) == invalid_token("the token's signature does not verify")
    assert "x-jwt-sub" not in result.request.headers


def test_jwt_alg_none_is_refused() -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none")
    by_hand = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    for token in (unsigned, by_hand):
        result = testing.run(JwtBearer(secret=SECRET), bearer(token))
        assert refusal(result) == invalid_token("the token's algorithm is not accepted")


def test_jwt_token_cannot_pick_another_algorithm() -> None:
    token = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    result = testing.run(JwtBearer(secret=SECRET * 2, algorithms=["HS256"]), bearer(token))
    assert refusal(result) == invalid_token("the token's algorithm is not accepted")
    both = JwtBearer(secret=SECRET * 2, algorithms=["HS256", "HS512"])
    assert not testing.run(both, bearer(token)).short_circuited


def test_jwt_audience() -> None:
    f = JwtBearer(secret=SECRET, audience="api")
    ok = jwt.encode(claims(aud="api"), SECRET, algorithm="HS256")
    assert not testing.run(f, bearer(ok)).short_circuited
    wrong = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
    expected = invalid_token("the token is meant for another audience")
    assert refusal(testing.run(f, bearer(wrong))) == expected
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert refusal(testing.run(f, bearer(missing))) == invalid_token(
        "the token lacks the aud claim"
    )
    # A token for some audience is not accepted by a filter that expects none.
    assert refusal(testing.run(JwtBearer(secret=SECRET), bearer(ok))) == expected
    several = JwtBearer(secret=SECRET, audience=["web", "api"])
    assert not testing.run(several, bearer(ok)).short_circuited


def test_jwt_issuer() -> None:
    f = JwtBearer(secret=SECRET, issuer="https://auth.example.com/")
    ok = jwt.encode(claims(iss="https://auth.example.com/"), SECRET, algorithm="HS256")
    assert not testing.run(f, bearer(ok)).short_circuited
    wrong = jwt.encode(claims(iss="https://evil.example.com/"), SECRET, algorithm="HS256")
    expected = invalid_token("the token comes from an unexpected issuer")
    assert refusal(testing.run(f, bearer(wrong))) == expected
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert refusal(testing.run(f, bearer(missing))) == invalid_token(
        "the token lacks the iss claim"
    )


def test_jwt_required_claims() -> None:
    no_exp = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(no_exp))
    assert refusal(result) == invalid_token("the token lacks the exp claim")
    assert not testing.run(JwtBearer(secret=SECRET, required_claims=[]), bearer(no_exp)).response
    f = JwtBearer(secret=SECRET, required_claims=["exp", "scope"])
    result = testing.run(f, bearer(jwt.encode(claims(), SECRET, algorithm="HS256")))
    assert refusal(result) == invalid_token("the token lacks the scope claim")


@pytest.mark.parametrize(
    "token", ["abc", "a.b.c", "..", "a.b", b64({"alg": "HS256"}) + ".bm90IGpzb24.c2ln", "é.é.é"]
)
def test_jwt_garbage_is_malformed_not_a_crash(token: str) -> None:
    result = testing.run(JwtBearer(secret=SECRET), bearer(token))
    status, challenge = refusal(result)
    assert status == 401
    assert challenge.startswith('Bearer error="invalid_token"')


def test_jwt_subject_that_cannot_be_a_header_value_is_refused() -> None:
    token = jwt.encode(claims(sub="alice\r\nx-admin: 1"), SECRET, algorithm="HS256")
    result = testing.run(JwtBearer(secret=SECRET), bearer(token))
    assert refusal(result) == invalid_token("the token's subject cannot go in a header")


def test_jwt_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)
    f = JwtBearer(secret_env="TEST_JWT_SECRET")
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert not testing.run(f, bearer(token)).short_circuited
    monkeypatch.delenv("TEST_JWT_SECRET")
    with pytest.raises(ValueError, match="TEST_JWT_SECRET is not set"):
        JwtBearer(secret_env="TEST_JWT_SECRET")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"secret": SECRET, "jwks_file": "jwks.json"}, "exactly one of"),
        ({"secret": SECRET, "algorithms": ["none"]}, "never accepted"),
        ({"secret": SECRET, "algorithms": []}, "algorithms is empty"),
        ({"secret": SECRET, "algorithms": ["XS256"]}, "unknown algorithm"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "RS256 needs a jwks_file"),
        ({"secret": "short"}, "the secret is too short"),
        ({"secret": SECRET, "algorithms": ["HS512"]}, "the secret is too short"),
        ({"secret": SECRET, "leeway": -1}, "leeway"),
        ({"jwks_file": "does-not-exist.json"}, "cannot read jwks_file"),
    ],
)
def test_jwt_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JwtBearer(**kwargs)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_jwks(path: Path, *keys: dict[str, Any]) -> str:
    path.write_text(json.dumps({"keys": list(keys)}))
    return str(path)


def jwk(key: Any, kid: str) -> dict[str, Any]:
    """The public JWK of a private key, with a kid."""
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    data = algorithm.to_jwk(key.public_key(), as_dict=True)
    assert isinstance(data, dict)
    return {**data, "kid": kid, "use": "sig"}


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: Any) -> str:
    return write_jwks(tmp_path / "jwks.json", jwk(rsa_key, "rsa-1"), jwk(ec_key, "ec-1"))


def test_jwt_rs256_with_a_jwks_file(jwks_file: str, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    result = testing.run(JwtBearer(jwks_file=jwks_file), bearer(token))
    assert not result.short_circuited
    assert result.request.headers["x-jwt-sub"] == "alice"


def test_jwt_es256_with_a_jwks_file(jwks_file: str, ec_key: Any) -> None:
    f = JwtBearer(jwks_file=jwks_file, algorithms=["RS256", "ES256"])
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert not testing.run(f, bearer(token)).short_circuited
    only_rsa = JwtBearer(jwks_file=jwks_file)
    result = testing.run(only_rsa, bearer(token))
    assert refusal(result) == invalid_token("the token's algorithm is not accepted")


def test_jwt_unknown_or_missing_kid_is_refused(jwks_file: str, rsa_key: rsa.RSAPrivateKey) -> None:
    f = JwtBearer(jwks_file=jwks_file)
    for headers in ({"kid": "rsa-2"}, {}):
        token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers=headers)
        assert refusal(testing.run(f, bearer(token))) == invalid_token("the token's key is unknown")
    not_a_kid = forge({"alg": "RS256", "kid": ["rsa-1"]}, claims(), rsa_key)
    status, challenge = refusal(testing.run(f, bearer(not_a_kid)))
    assert status == 401
    assert challenge.startswith('Bearer error="invalid_token"')


def test_jwt_token_signed_by_another_key_is_refused(jwks_file: str) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa-1"})
    result = testing.run(JwtBearer(jwks_file=jwks_file), bearer(token))
    assert refusal(result) == invalid_token("the token's signature does not verify")


def test_jwt_token_cannot_use_a_key_with_another_algorithm(
    jwks_file: str, rsa_key: rsa.RSAPrivateKey
) -> None:
    # An RSA-signed token naming the EC key, and the classic confusion: HMAC keyed with the
    # RSA public key, which anyone can fetch.
    f = JwtBearer(jwks_file=jwks_file, algorithms=["RS256", "ES256"])
    rsa_for_ec = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert refusal(testing.run(f, bearer(rsa_for_ec))) == invalid_token(
        "the token's algorithm is not accepted"
    )
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = forge({"alg": "HS256", "kid": "rsa-1"}, claims(), public_pem)
    assert refusal(testing.run(f, bearer(forged))) == invalid_token(
        "the token's algorithm is not accepted"
    )


def test_jwt_relative_jwks_path_resolves_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    write_jwks(tmp_path / "jwks.json", jwk(rsa_key, "rsa-1"))
    monkeypatch.chdir(tmp_path)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert not testing.run(JwtBearer(jwks_file="jwks.json"), bearer(token)).short_circuited


def test_jwt_bad_jwks_files_are_config_errors(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: Any
) -> None:
    path = tmp_path / "jwks.json"
    public = jwk(rsa_key, "rsa-1")
    private = {**public, **RSAAlgorithm.to_jwk(rsa_key, as_dict=True)}
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases: list[tuple[str, str]] = [
        ("not json", "is not JSON"),
        ("[]", "is not a JWK Set"),
        (json.dumps({"keys": [{k: v for k, v in public.items() if k != "kid"}]}), "needs a kid"),
        (json.dumps({"keys": [public, public]}), "used twice"),
        (json.dumps({"keys": [private]}), "is private"),
        (json.dumps({"keys": [jwk(weak, "weak")]}), "has 1024 bits"),
        (json.dumps({"keys": [{"kty": "RSA", "kid": "broken", "n": "AQAB"}]}), "'broken'"),
        (json.dumps({"keys": [{**public, "use": "enc"}]}), "no signing keys"),
        (json.dumps({"keys": [jwk(ec_key, "ec-1")]}), "no key of jwks_file .* is for RS256"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            JwtBearer(jwks_file=str(path))
    with pytest.raises(ValueError, match="HS256 needs a secret"):
        JwtBearer(jwks_file=write_jwks(path, public), algorithms=["HS256"])


# --- ratelimit -----------------------------------------------------------------------------


class Clock:
    """A clock for `TokenBucket.clock` that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(**kwargs: Any) -> tuple[TokenBucket, Clock]:
    f = TokenBucket(**kwargs)
    clock = f.clock = Clock()
    return f, clock


def from_client(address: str, **headers: str) -> Any:
    return testing.request("GET", "/", {"x-forwarded-for": address, **headers})


def allowed(f: TokenBucket, req: Any) -> bool:
    result = testing.run(f, req)
    if result.short_circuited:
        assert result.response is not None and result.response.status == 429
    return not result.short_circuited


def test_ratelimit_burst_then_429_with_headers() -> None:
    f, _ = limiter(rate=1, burst=3)
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(3)] == [True, True, True]
    result = testing.run(f, from_client("10.0.0.1"))
    assert result.short_circuited
    assert result.response is not None
    assert result.response.status == 429
    assert result.response.body == b"rate limit exceeded\n"
    assert result.response.headers["retry-after"] == "1"
    assert result.response.headers["x-ratelimit-limit"] == "3"
    assert result.response.headers["x-ratelimit-remaining"] == "0"


def test_ratelimit_refills_with_time() -> None:
    f, clock = limiter(rate=2, burst=2)
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(3)] == [True, True, False]
    clock.advance(0.5)  # one token back
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(2)] == [True, False]
    clock.advance(60)  # never more than the burst
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(3)] == [True, True, False]


def test_ratelimit_retry_after_is_whole_seconds_rounded_up() -> None:
    f, clock = limiter(rate=0.25, burst=1)  # a token every 4 s
    assert allowed(f, from_client("10.0.0.1"))

    def retry_after() -> str:
        response = testing.run(f, from_client("10.0.0.1")).response
        assert response is not None
        return response.headers["retry-after"]

    assert retry_after() == "4"
    clock.advance(1.5)  # 2.5 s to go
    assert retry_after() == "3"
    clock.advance(2.4)  # 0.1 s to go
    assert retry_after() == "1"
    clock.advance(0.1)
    assert allowed(f, from_client("10.0.0.1"))


def test_ratelimit_clients_are_independent() -> None:
    f, _ = limiter(rate=1, burst=1)
    assert allowed(f, from_client("10.0.0.1"))
    assert not allowed(f, from_client("10.0.0.1"))
    assert allowed(f, from_client("10.0.0.2"))
    assert not allowed(f, from_client("10.0.0.2"))


def test_ratelimit_client_is_the_address_the_proxy_appended() -> None:
    # The proxy appends the peer's address to whatever x-forwarded-for the client sent.
    f, _ = limiter(rate=1, burst=1)
    assert allowed(f, from_client("1.1.1.1, 10.0.0.1"))
    assert not allowed(f, from_client("2.2.2.2, 10.0.0.1"))
    # Behind a trusted load balancer, the address it appended identifies the client.
    f, _ = limiter(rate=1, burst=1, trusted_hops=1)
    assert allowed(f, from_client("6.6.6.6, 1.1.1.1, 10.0.0.1"))
    assert allowed(f, from_client("6.6.6.6, 2.2.2.2, 10.0.0.1"))
    assert not allowed(f, from_client("7.7.7.7, 2.2.2.2, 10.0.0.1"))
    assert allowed(f, from_client("10.0.0.9"))  # fewer hops than trusted: the first


def test_ratelimit_by_identity_and_by_header() -> None:
    f, _ = limiter(rate=1, burst=1, key="identity")
    alice = "spiffe://mesh/ns/a/sa/alice"
    assert allowed(f, testing.request("GET", "/", identity=alice))
    assert not allowed(f, testing.request("GET", "/", identity=alice))
    assert allowed(f, testing.request("GET", "/", identity="spiffe://mesh/ns/a/sa/bob"))

    f, _ = limiter(rate=1, burst=1, key="header:x-api-key")
    assert allowed(f, from_client("10.0.0.1", **{"x-api-key": "k1"}))
    assert not allowed(f, from_client("10.0.0.2", **{"x-api-key": "k1"}))
    assert allowed(f, from_client("10.0.0.1", **{"x-api-key": "k2"}))


def test_ratelimit_requests_without_a_key_share_one_bucket() -> None:
    f, _ = limiter(rate=1, burst=2, key="header:x-api-key")
    assert allowed(f, from_client("10.0.0.1"))
    assert allowed(f, from_client("10.0.0.2"))
    assert not allowed(f, from_client("10.0.0.3"))
    assert allowed(f, from_client("10.0.0.3", **{"x-api-key": "k1"}))


def test_ratelimit_memory_is_bounded() -> None:
    f, clock = limiter(rate=10, burst=5, max_clients=100)
    for i in range(1000):
        assert allowed(f, from_client(f"10.0.{i // 256}.{i % 256}"))
    assert len(f.buckets) == 100
    clock.advance(0.5)  # full again after burst / rate seconds
    assert allowed(f, from_client("10.9.9.9"))
    assert list(f.buckets) == ["10.9.9.9"]


def test_ratelimit_an_evicted_idle_client_comes_back_with_a_full_bucket() -> None:
    f, clock = limiter(rate=1, burst=2)
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(3)] == [True, True, False]
    clock.advance(2)
    assert [allowed(f, from_client("10.0.0.1")) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0, "burst": 1}, "rate"),
        ({"rate": float("nan"), "burst": 1}, "rate"),
        ({"rate": 1, "burst": 0}, "burst"),
        ({"rate": 1, "burst": 1, "key": "cookie:id"}, "key"),
        ({"rate": 1, "burst": 1, "key": "header:"}, "key"),
        ({"rate": 1, "burst": 1, "trusted_hops": -1}, "trusted_hops"),
        ({"rate": 1, "burst": 1, "max_clients": 0}, "max_clients"),
    ],
)
def test_ratelimit_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(**kwargs)


# --- request_id ----------------------------------------------------------------------------


def test_correlation_id_is_created_when_absent_and_echoed() -> None:
    result = testing.run(CorrelationId(), testing.request("GET", "/"), testing.response(200))
    assert not result.short_circuited
    value = result.request.headers["x-correlation-id"]
    assert uuid.UUID(value).version == 4
    assert result.request.ctx["correlation_id"] == value
    assert result.response is not None and result.response.headers["x-request-id"] == value
    other = testing.run(CorrelationId(), testing.request("GET", "/"))
    assert other.request.headers["x-correlation-id"] != value


def test_correlation_id_copies_the_request_id() -> None:
    req = testing.request("GET", "/", {"x-request-id": "rid-1"})
    result = testing.run(CorrelationId(), req, testing.response(200, {"x-request-id": "up"}))
    assert result.request.headers.get_all("x-correlation-id") == ["rid-1"]
    assert result.request.headers["x-request-id"] == "rid-1"
    assert result.response is not None
    assert result.response.headers.get_all("x-request-id") == ["rid-1"]


def test_correlation_id_keeps_the_clients_value() -> None:
    req = testing.request("GET", "/", {"x-correlation-id": "client-7", "x-request-id": "rid-1"})
    result = testing.run(CorrelationId(), req, testing.response(200))
    assert result.request.headers.get_all("x-correlation-id") == ["client-7"]
    assert result.response is not None and result.response.headers["x-request-id"] == "client-7"


def test_correlation_id_custom_headers_and_no_echo() -> None:
    f = CorrelationId(header="x-trace", response_header="x-trace")
    result = testing.run(f, testing.request("GET", "/", {"x-request-id": "r"}), testing.response())
    assert result.request.headers["x-trace"] == "r"
    assert result.response is not None and result.response.headers["x-trace"] == "r"

    quiet = CorrelationId(response_header=None)
    assert quiet.on_response is None  # the route has no response phase to pay for
    result = testing.run(quiet, testing.request("GET", "/"), testing.response())
    assert "x-correlation-id" in result.request.headers
    assert result.response is not None and result.response.headers.items() == []


# --- canary --------------------------------------------------------------------------------


def cluster_for(f: CanaryRouter, headers: Any = None) -> str:
    result = testing.run(f, testing.request("GET", "/", headers, cluster="web"))
    assert not result.short_circuited
    return result.cluster


def test_canary_by_header() -> None:
    f = CanaryRouter(cluster="web-canary")
    assert cluster_for(f, {"x-canary": "1"}) == "web-canary"
    assert cluster_for(f, {"x-canary": "0"}) == "web"
    assert cluster_for(f) == "web"
    f = CanaryRouter(cluster="web-canary", header="x-beta", value="yes")
    assert cluster_for(f, {"x-beta": "yes"}) == "web-canary"
    assert cluster_for(f, {"x-beta": "1"}) == "web"


@pytest.mark.parametrize(
    ("cookies", "expected"),
    [
        (["session=abc; canary=1; theme=dark"], "web-canary"),
        (["session=abc;canary=1"], "web-canary"),
        (["canary=1"], "web-canary"),
        (['theme=dark; canary="1"'], "web-canary"),
        (["session=abc", "theme=dark; canary=1"], "web-canary"),  # HTTP/2 splits cookies
        (["session=abc; canary=0; theme=dark"], "web"),
        (["notcanary=1; canary_x=1; session=canary=1"], "web"),
        (["session=abc; canary"], "web"),
        ([], "web"),
    ],
)
def test_canary_by_cookie(cookies: list[str], expected: str) -> None:
    f = CanaryRouter(cluster="web-canary", header=None)
    assert cluster_for(f, [("cookie", c) for c in cookies]) == expected


def test_canary_header_or_cookie_can_be_turned_off() -> None:
    cookie_only = CanaryRouter(cluster="web-canary", header=None)
    assert cluster_for(cookie_only, {"x-canary": "1"}) == "web"
    header_only = CanaryRouter(cluster="web-canary", cookie=None)
    assert cluster_for(header_only, {"cookie": "canary=1"}) == "web"
    assert cluster_for(header_only, {"x-canary": "1"}) == "web-canary"


def test_canary_percent_is_deterministic_by_request_id() -> None:
    f = CanaryRouter(cluster="web-canary", header=None, cookie=None, percent=10)
    ids = [f"request-{i}" for i in range(4000)]
    first = [cluster_for(f, {"x-request-id": rid}) for rid in ids]
    share = first.count("web-canary") / len(ids)
    assert 0.08 < share < 0.12
    # The same id lands on the same side, on another instance too (another proxy, a reload).
    again = CanaryRouter(cluster="web-canary", header=None, cookie=None, percent=10)
    assert [cluster_for(again, {"x-request-id": rid}) for rid in ids] == first
    # A larger share keeps everyone the smaller one picked.
    wider = CanaryRouter(cluster="web-canary", header=None, cookie=None, percent=50)
    picked = [rid for rid, c in zip(ids, first, strict=True) if c == "web-canary"]
    assert all(cluster_for(wider, {"x-request-id": rid}) == "web-canary" for rid in picked)


def test_canary_percent_edges_and_opt_in_together() -> None:
    everyone = CanaryRouter(cluster="web-canary", percent=100)
    assert cluster_for(everyone, {"x-request-id": "a"}) == "web-canary"
    assert cluster_for(everyone) == "web"  # no request id: never sampled
    f = CanaryRouter(cluster="web-canary", percent=0.001)
    assert cluster_for(f, {"x-request-id": "a"}) == "web"
    assert cluster_for(f, {"x-request-id": "a", "x-canary": "1"}) == "web-canary"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster": "c", "header": None, "cookie": None}, "header, a cookie or a percent"),
        ({"cluster": "c", "percent": 101}, "between 0 and 100"),
        ({"cluster": "c", "percent": -1}, "between 0 and 100"),
        ({"cluster": ""}, "cluster"),
    ],
)
def test_canary_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CanaryRouter(**kwargs)


# --- the documented examples ---------------------------------------------------------------

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def documented_filters() -> list[tuple[str, str, dict[str, Any]]]:
    """(where, import path, arguments) of every filter in the YAML of the docs."""
    blocks = [
        (path.name, doc.split(".. code-block:: yaml", 1)[1])
        for path in sorted(PLUGINS.glob("*.py"))
        if ".. code-block:: yaml" in (doc := ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    readme = (PLUGINS / "README.md").read_text()
    blocks += [("README.md", block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    found = []
    for where, block in blocks:
        for route in yaml.safe_load(block)["routes"]:
            for entry in route["filters"]:
                ((path, args),) = entry.items()
                found.append((where, path, args or {}))
    return found


def test_every_plugin_documents_its_yaml() -> None:
    documented = {path for _, path, _ in documented_filters()}
    assert documented == {
        "plugins.tenant:RequireTenant",
        "plugins.jwt_auth:JwtBearer",
        "plugins.ratelimit:TokenBucket",
        "plugins.request_id:CorrelationId",
        "plugins.canary:CanaryRouter",
    }


@pytest.mark.parametrize(("where", "path", "args"), documented_filters())
def test_documented_yaml_is_valid_filter_config(
    where: str, path: str, args: dict[str, Any]
) -> None:
    check_filter(path, args)  # what loading a config does: import, names and types of arguments
