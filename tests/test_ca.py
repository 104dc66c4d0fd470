"""The mesh CA (`meshpy ca` and `meshpy.ca`), checked with the real OpenSSL command line."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import meshpy_cmd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshpy import ca, cli

TD = "example.org"
PAYMENTS = f"spiffe://{TD}/ns/shop/sa/payments"


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(meshpy_cmd(*args), capture_output=True, text=True, timeout=30, **kwargs)


def openssl(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def verify(
    bundle: Path, cert: Path, *, untrusted: Path | None = None, purpose: str = ""
) -> subprocess.CompletedProcess:
    args: list[str | Path] = ["verify", "-x509_strict", "-CAfile", bundle]
    if untrusted is not None:
        args += ["-untrusted", untrusted]
    if purpose:
        args += ["-purpose", purpose]
    return openssl(*args, cert)


def text(cert: Path) -> str:
    done = openssl("x509", "-in", cert, "-noout", "-text")
    assert done.returncode == 0, done.stderr
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def public_key_of_cert(cert: Path) -> str:
    done = openssl("x509", "-in", cert, "-noout", "-pubkey")
    assert done.returncode == 0, done.stderr
    return done.stdout


def public_key_of_key(key: Path) -> str:
    done = openssl("pkey", "-in", key, "-pubout")
    assert done.returncode == 0, done.stderr
    return done.stdout


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


# --- one PKI made through the CLI, shared by the tests below ----------------------------------


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        meshpy_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    """A root, an intermediate and three workload certificates, made with `meshpy ca`."""
    base = tmp_path_factory.mktemp("pki")
    paths: dict[str, Any] = {
        "root": base / "root",
        "inter": base / "cluster1",
        "web": base / "web",
        "payments": base / "payments",
        "short": base / "short",
        "other": base / "other-root",
    }
    root, inter = str(paths["root"]), str(paths["inter"])
    # With umask 0 a careless writer would leave the keys world-readable.
    init = run("ca", "init", "--trust-domain", TD, root, preexec_fn=lambda: os.umask(0))
    assert init.returncode == 0, init.stderr
    paths["init_stdout"] = init.stdout
    # Independent commands run side by side to keep the file fast. The 1s certificate is
    # checked by the last test: by then it has expired.
    short = start(
        "ca", "issue", "--ca", root, "--service", "payments", "--namespace", "shop",
        "--ttl", "1s", str(paths["short"]),
    )  # fmt: skip
    web = start(
        "ca", "issue", "--ca", root, "--service", "web", "--namespace", "shop",
        "--ttl", "24h", str(paths["web"]),
    )  # fmt: skip
    done = run("ca", "intermediate", "--ca", root, "--ttl", "720h", inter)
    assert done.returncode == 0, done.stderr
    done = run(
        "ca", "issue", "--ca", inter, "--service", "payments", "--namespace", "shop",
        "--ttl", "24h", "--dns", "payments.shop.svc", "--dns", "payments.example.com",
        str(paths["payments"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths["issue_stdout"] = done.stdout
    ca.CertificateAuthority.create_root(TD).save(paths["other"])
    for proc in (short, web):
        done = finish(proc)
        assert done.returncode == 0, done.stderr
    return paths


def test_init_prints_what_it_made(pki):
    out = pki["init_stdout"]
    assert f"root CA for spiffe://{TD} created in {pki['root']}" in out
    for name in ("ca.pem", "ca.key", "bundle.pem"):
        assert name in out
    assert f"{PAYMENTS} issued in {pki['payments']}" in pki["issue_stdout"]


def test_ca_directory_layout_and_modes(pki):
    root, inter = pki["root"], pki["inter"]
    assert sorted(p.name for p in root.iterdir()) == ["bundle.pem", "ca.json", "ca.key", "ca.pem"]
    assert sorted(p.name for p in inter.iterdir()) == [
        "bundle.pem",
        "ca.json",
        "ca.key",
        "ca.pem",
        "chain.pem",
    ]
    for directory in (root, inter):
        assert mode(directory / "ca.key") == 0o600
        assert mode(directory / "ca.pem") == 0o644
    for directory in (pki["web"], pki["payments"]):
        assert sorted(p.name for p in directory.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
        assert mode(directory / "key.pem") == 0o600
    # The root is the one trust anchor everywhere; the chain holds the intermediate only.
    root_pem = (root / "ca.pem").read_bytes()
    for bundle in (root, inter, pki["web"], pki["payments"]):
        assert (bundle / "bundle.pem").read_bytes() == root_pem
    assert (inter / "chain.pem").read_bytes() == (inter / "ca.pem").read_bytes()
    assert '"kind": "intermediate"' in (inter / "ca.json").read_text()
    assert f'"trust_domain": "{TD}"' in (root / "ca.json").read_text()


def test_keys_match_their_certificates(pki):
    for cert, key in [
        (pki["root"] / "ca.pem", pki["root"] / "ca.key"),
        (pki["inter"] / "ca.pem", pki["inter"] / "ca.key"),
        (pki["web"] / "cert.pem", pki["web"] / "key.pem"),
        (pki["payments"] / "cert.pem", pki["payments"] / "key.pem"),
    ]:
        assert public_key_of_cert(cert) == public_key_of_key(key), cert


def test_root_certificate(pki):
    out = text(pki["root"] / "ca.pem")
    assert "Subject: O = example.org, CN = meshpy root CA" in out
    assert "Issuer: O = example.org, CN = meshpy root CA" in out
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:1", out)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign\n", out)
    assert "Subject Key Identifier" in out
    assert "URI:spiffe://example.org\n" in out
    assert "ecdsa-with-SHA256" in out and "prime256v1" in out
    cert = pem_certs(pki["root"] / "ca.pem")[0]
    assert cert.serial_number.bit_length() > 64
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1


def test_intermediate_certificate(pki):
    out = text(pki["inter"] / "ca.pem")
    assert "Subject: O = example.org, CN = meshpy intermediate CA" in out
    assert "Issuer: O = example.org, CN = meshpy root CA" in out
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:0", out)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign\n", out)
    root_ski = re.search(r"Subject Key Identifier:\s+(\S+)", text(pki["root"] / "ca.pem"))
    assert root_ski
    assert re.search(r"Authority Key Identifier:\s+" + re.escape(root_ski.group(1)), out)
    cert = pem_certs(pki["inter"] / "ca.pem")[0]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    # 720h from now, rounded up to a whole second, plus the minute of backdating.
    assert dt.timedelta(hours=720, minutes=1) <= lifetime <= dt.timedelta(hours=720, seconds=61)


def test_workload_certificate_is_an_x509_svid(pki):
    out = text(pki["payments"] / "cert.pem")
    assert "Subject: O = example.org\n" in out
    assert "Issuer: O = example.org, CN = meshpy intermediate CA" in out
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", out)
    assert re.search(r"Key Usage: critical\s+Digital Signature\n", out)
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in out
    assert "Subject Key Identifier" in out and "Authority Key Identifier" in out
    sans = re.search(r"Subject Alternative Name:\s*\n\s*(.*)\n", out)
    assert sans and sans.group(1) == (
        f"URI:{PAYMENTS}, DNS:payments.shop.svc, DNS:payments.example.com"
    )
    # No DNS SAN unless asked for.
    web = text(pki["web"] / "cert.pem")
    sans = re.search(r"Subject Alternative Name:\s*\n\s*(.*)\n", web)
    assert sans and sans.group(1) == f"URI:spiffe://{TD}/ns/shop/sa/web"
    leaf = pem_certs(pki["payments"] / "cert.pem")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc >= dt.timedelta(hours=24)
    # Backdated a minute for clock skew, never before the issuer.
    issuer = pem_certs(pki["inter"] / "ca.pem")[0]
    assert leaf.not_valid_before_utc >= issuer.not_valid_before_utc
    assert dt.datetime.now(dt.UTC) - leaf.not_valid_before_utc >= dt.timedelta(seconds=55)


def test_openssl_verifies_a_leaf_of_the_root(pki):
    web = pki["web"]
    for purpose in ("", "sslserver", "sslclient"):
        done = verify(web / "bundle.pem", web / "cert.pem", purpose=purpose)
        assert done.returncode == 0, done.stdout + done.stderr


def test_openssl_verifies_a_leaf_of_the_intermediate(pki):
    payments = pki["payments"]
    certs = pem_certs(payments / "cert.pem")
    assert len(certs) == 2  # the leaf, then the intermediate
    assert certs[1] == pem_certs(pki["inter"] / "ca.pem")[0]
    for purpose in ("", "sslserver", "sslclient"):
        done = verify(
            payments / "bundle.pem",
            payments / "cert.pem",
            untrusted=payments / "cert.pem",
            purpose=purpose,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    done = verify(
        pki["inter"] / "bundle.pem", payments / "cert.pem", untrusted=pki["inter"] / "chain.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The root alone does not vouch for the leaf: the intermediate must be sent along.
    done = verify(payments / "bundle.pem", payments / "cert.pem")
    assert done.returncode != 0
    assert "unable to get local issuer certificate" in done.stdout + done.stderr


def test_another_cas_bundle_does_not_verify(pki):
    other = pki["other"] / "bundle.pem"
    done = verify(other, pki["web"] / "cert.pem")
    assert done.returncode != 0, done.stdout
    done = verify(other, pki["payments"] / "cert.pem", untrusted=pki["payments"] / "cert.pem")
    assert done.returncode != 0, done.stdout


def test_init_refuses_an_existing_ca(pki, capsys):
    before = digest(pki["root"])
    assert cli.main(["ca", "init", "--trust-domain", "other.org", str(pki["root"])]) == 1
    assert f"{pki['root']} already holds a CA" in capsys.readouterr().err
    assert digest(pki["root"]) == before


def test_show(pki):
    done = run("ca", "show", str(pki["payments"]))
    assert done.returncode == 0, done.stderr
    assert f"spiffe id:  {PAYMENTS}" in done.stdout
    assert "subject:    O=example.org" in done.stdout
    assert "issuer:     CN=meshpy intermediate CA,O=example.org" in done.stdout
    assert "kind:       workload certificate" in done.stdout
    assert "dns names:  payments.shop.svc, payments.example.com" in done.stdout
    # 24h from issue, shown as 23h59m.. or as 1d when shown within the second of issue.
    assert re.search(r"expires in (23h|1d\b)", done.stdout), done.stdout
    assert "chains to:  yes:" in done.stdout and "through 1 intermediate" in done.stdout


def test_show_in_process(pki, capsys):
    other = str(pki["other"] / "bundle.pem")
    assert cli.main(["ca", "show", "--bundle", other, str(pki["payments"])]) == 1
    out = capsys.readouterr().out
    assert "chains to:  NO:" in out and "not signed by any certificate" in out

    assert cli.main(["ca", "show", str(pki["inter"])]) == 0
    out = capsys.readouterr().out
    assert "kind:       intermediate CA (path length 0)" in out
    assert "spiffe id:  spiffe://example.org\n" in out
    assert "chains to:  yes:" in out


# --- argument errors and failures -------------------------------------------------------------

BAD_INVOCATIONS = {
    # name: (arguments, with {root}/{inter}/{web}/{tmp} filled in; exit code; message)
    "trust-domain-upper-case": (
        "ca init --trust-domain Example.org {tmp}/x",
        2,
        "invalid trust domain 'Example.org': it must be lower case",
    ),
    "trust-domain-with-scheme": (
        "ca init --trust-domain spiffe://example.org {tmp}/x",
        2,
        "may hold only lower-case letters",
    ),
    "unknown-key-type": ("ca init --trust-domain a.b --key-type rsa {tmp}/x", 2, "invalid choice"),
    "bad-ttl": ("ca issue --ca {root} --service a --namespace b --ttl soon {tmp}/x", 2, "'soon'"),
    "ttl-over-a-year-in-hours": (
        "ca init --trust-domain a.b --ttl 87600h {tmp}/x",
        2,
        "write ttls over a year in days",
    ),
    "zero-ttl": ("ca issue --ca {root} --service a --namespace b --ttl 0s {tmp}/x", 2, "1s"),
    "bad-service": (
        "ca issue --ca {root} --service pay/ments --namespace shop {tmp}/x",
        2,
        "invalid service name 'pay/ments'",
    ),
    "dot-dot-namespace": (
        "ca issue --ca {root} --service payments --namespace .. {tmp}/x",
        2,
        "invalid namespace '..'",
    ),
    "bad-dns": (
        "ca issue --ca {root} --service a --namespace b --dns a_b {tmp}/x",
        2,
        "invalid DNS name 'a_b'",
    ),
    "unknown-ca-dir": (
        "ca issue --ca {tmp}/nowhere --service a --namespace b {tmp}/x",
        2,
        "nowhere: no such CA directory",
    ),
    "not-a-ca-dir": (
        "ca issue --ca {web} --service a --namespace b {tmp}/x",
        2,
        "is not a meshpy CA directory (it has no ca.json)",
    ),
    "intermediate-of-intermediate": (
        "ca intermediate --ca {inter} {tmp}/x",
        1,
        "holds an intermediate CA, which cannot sign other CAs",
    ),
    "issue-into-a-ca-dir": (
        "ca issue --ca {root} --service a --namespace b {inter}",
        1,
        "is a CA directory",
    ),
    "show-nothing": ("ca show {tmp}/nowhere", 2, "no such file or directory"),
}


def fill(pki, tmp: Path, args: str) -> list[str]:
    return args.format(root=pki["root"], inter=pki["inter"], web=pki["web"], tmp=tmp).split()


@pytest.mark.parametrize("name", list(BAD_INVOCATIONS))
def test_bad_invocations_name_the_problem(pki, tmp_path, capsys, name):
    # In-process through cli.main, which is what `meshpy` runs: a process each would be slow.
    args, code, message = BAD_INVOCATIONS[name]
    try:
        status = cli.main(fill(pki, tmp_path, args))
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == code, err
    assert message in err, err
    assert not (tmp_path / "x").exists()


def test_bad_invocations_exit_codes_from_a_real_process(pki, tmp_path):
    names = ["bad-service", "unknown-ca-dir", "intermediate-of-intermediate"]
    procs = {name: start(*fill(pki, tmp_path, BAD_INVOCATIONS[name][0])) for name in names}
    for name, proc in procs.items():
        done = finish(proc)
        _, code, message = BAD_INVOCATIONS[name]
        assert done.returncode == code, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr


def test_cli_key_types_match_the_module():
    assert cli._CA_KEY_TYPES == ca.KEY_TYPES


# --- the Python API ---------------------------------------------------------------------------

GOOD_IDS = [
    "spiffe://example.org",
    "spiffe://example.org/ns/shop/sa/payments",
    "spiffe://a-b_c.9/x",
    "spiffe://example.org/Path.With-Some_chars/..x/.y",
]
BAD_IDS = {
    "": "must start with 'spiffe://'",
    "https://example.org/a": "must start with 'spiffe://'",
    "SPIFFE://example.org/a": "scheme must be 'spiffe' in lower case",
    "spiffe://": "is empty",
    "spiffe:///a": "is empty",
    "spiffe://Example.org/a": "must be lower case",
    "spiffe://example.org:8443/a": "may hold only lower-case letters",
    "spiffe://user@example.org/a": "may hold only lower-case letters",
    "spiffe://example.org/": "must not be empty",
    "spiffe://example.org//a": "must not be empty",
    "spiffe://example.org/a/": "must not be empty",
    "spiffe://example.org/a/./b": "must not be '.'",
    "spiffe://example.org/a/..": "must not be '..'",
    "spiffe://example.org/a%20b": "may hold only letters",
    "spiffe://example.org/a?x=1": "may hold only letters",
    "spiffe://example.org/a#f": "may hold only letters",
    "spiffe://example.org/" + "a" * 2040: "longer than 2048 bytes",
}


@pytest.mark.parametrize("uri", GOOD_IDS)
def test_parse_spiffe_id_accepts(uri):
    parsed = ca.parse_spiffe_id(uri)
    assert str(parsed) == uri


@pytest.mark.parametrize("uri", list(BAD_IDS))
def test_parse_spiffe_id_rejects(uri):
    with pytest.raises(ca.InvalidNameError, match=re.escape(BAD_IDS[uri])) as caught:
        ca.parse_spiffe_id(uri)
    assert isinstance(caught.value, ValueError)


def test_spiffe_id_builds_and_parses_back():
    uri = ca.spiffe_id(TD, "shop", "payments")
    assert uri == PAYMENTS
    parsed = ca.parse_spiffe_id(uri)
    assert (parsed.trust_domain, parsed.namespace, parsed.service) == (TD, "shop", "payments")
    assert parsed.is_workload and not ca.parse_spiffe_id("spiffe://example.org").is_workload
    assert ca.parse_spiffe_id("spiffe://example.org/x/y").service is None
    with pytest.raises(ca.InvalidNameError, match="invalid service name 'a b'"):
        ca.spiffe_id(TD, "shop", "a b")
    with pytest.raises(ca.InvalidNameError, match="invalid namespace ''"):
        ca.spiffe_id(TD, "", "payments")
    with pytest.raises(ca.InvalidNameError, match=re.escape("invalid trust domain 'EXAMPLE.org'")):
        ca.spiffe_id("EXAMPLE.org", "shop", "payments")


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("30s", 30), ("90m", 5400), ("24h", 86400), ("1h30m", 5400), ("3650d", 3650 * 86400),
     ("1d12h", 129600), (2.5, 2.5), (dt.timedelta(minutes=2), 120)],
)  # fmt: skip
def test_parse_ttl(ttl, seconds):
    assert ca.parse_ttl(ttl) == seconds


@pytest.mark.parametrize("ttl", ["", "soon", "-5s", "0s", "500ms", "1.5d", "12h1d", "36501d"])
def test_parse_ttl_rejects(ttl):
    with pytest.raises(ValueError, match="ttl"):
        ca.parse_ttl(ttl)


@pytest.fixture(scope="module")
def root() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.create_root(TD)


def test_load_round_trip(pki):
    loaded = ca.CertificateAuthority.load(pki["inter"])
    assert (loaded.kind, loaded.trust_domain) == ("intermediate", TD)
    assert loaded.bundle == pem_certs(pki["root"] / "ca.pem")
    issued = loaded.issue("payments", "shop", "1h")
    assert issued.chain_pem == issued.cert_pem + (pki["inter"] / "ca.pem").read_text()


def test_load_refuses_a_key_of_another_ca(pki, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ca.pem", "bundle.pem", "ca.json"):
        (broken / name).write_bytes((pki["root"] / name).read_bytes())
    (broken / "ca.key").write_bytes((pki["other"] / "ca.key").read_bytes())
    with pytest.raises(ca.CAError, match=r"ca.key is not the key of .*ca.pem"):
        ca.CertificateAuthority.load(broken)


def test_sign_csr_ignores_what_the_csr_asks_for(root, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://example.org/ns/kube-system/sa/admin"),
                    x509.DNSName("evil.example.com"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    issued = root.sign_csr(csr.public_bytes(serialization.Encoding.PEM), PAYMENTS, "1h")
    assert issued.key_pem is None and issued.spiffe_id == PAYMENTS
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    paths = ca.write_pem_files(tmp_path / "w", issued, key_pem=key_pem)
    out = text(paths["cert.pem"])
    sans = re.search(r"Subject Alternative Name:\s*\n\s*(.*)\n", out)
    assert sans and sans.group(1) == f"URI:{PAYMENTS}"
    assert "admin" not in out and "evil" not in out
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", out)
    assert public_key_of_cert(paths["cert.pem"]) == public_key_of_key(paths["key.pem"])
    done = verify(paths["bundle.pem"], paths["cert.pem"], purpose="sslclient")
    assert done.returncode == 0, done.stdout + done.stderr


def test_sign_csr_rejects_a_bad_signature(root):
    csr_pem, _ = ca.generate_csr()
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.InvalidCSRError, match="signature does not verify"):
        root.sign_csr(tampered, PAYMENTS, "1h")
    with pytest.raises(ca.InvalidCSRError, match="not a PEM certificate signing request"):
        root.sign_csr("hello", PAYMENTS, "1h")


def test_sign_csr_checks_the_identity_and_the_key(root):
    csr_pem, _ = ca.generate_csr()
    with pytest.raises(
        ca.InvalidNameError, match=re.escape("not in this CA's trust domain example.org")
    ):
        root.sign_csr(csr_pem, "spiffe://other.org/ns/shop/sa/payments", "1h")
    with pytest.raises(ca.InvalidNameError, match="names a trust domain, not a workload"):
        root.sign_csr(csr_pem, "spiffe://example.org", "1h")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    weak_pem = weak.sign(small, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.InvalidCSRError, match="unsupported key RSA 1024"):
        root.sign_csr(weak_pem, PAYMENTS, "1h")


def test_rsa_workload_keys_get_key_encipherment(root, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    issued = root.sign_csr(csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
                           PAYMENTS, "1h")  # fmt: skip
    usage = issued.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign


def test_ed25519_root(tmp_path, capsys):
    directory = tmp_path / "ed"
    assert (
        cli.main(["ca", "init", "--trust-domain", TD, "--key-type", "ed25519", str(directory)]) == 0
    )
    assert "(Ed25519, valid until" in capsys.readouterr().out
    assert "ED25519" in text(directory / "ca.pem")
    authority = ca.CertificateAuthority.load(directory)
    for make_ca in (lambda: authority, lambda: authority.create_intermediate(ttl="1h")):
        issuer = make_ca()
        paths = ca.write_pem_files(tmp_path / issuer.kind, issuer.issue("payments", "shop", "1h"))
        done = verify(paths["bundle.pem"], paths["cert.pem"], untrusted=paths["cert.pem"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert mode(paths["key.pem"]) == 0o600


def test_leaf_validity_is_capped_at_the_issuer(tmp_path):
    short_root = ca.CertificateAuthority.create_root(TD, ttl="1h")
    inter = short_root.create_intermediate(ttl="720h")
    assert inter.not_after == short_root.not_after
    issued = inter.issue("payments", "shop", "24h")
    assert issued.not_after == short_root.not_after
    assert issued.not_before >= inter.certificate.not_valid_before_utc
    paths = ca.write_pem_files(tmp_path, issued)
    done = verify(paths["bundle.pem"], paths["cert.pem"], untrusted=paths["cert.pem"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_issued_certificate_times(root):
    issued = root.issue("payments", "shop", "30s")
    assert issued.not_before == (issued.issued_at - ca.CLOCK_SKEW).replace(microsecond=0)
    assert dt.timedelta(seconds=30) <= issued.lifetime < dt.timedelta(seconds=31)
    assert issued.renew_at() == issued.issued_at + issued.lifetime * 2 / 3
    assert issued.certificate.not_valid_after_utc == issued.not_after


def test_write_pem_files_replaces_and_refuses_ca_dirs(root, pki, tmp_path):
    first = ca.write_pem_files(tmp_path, root.issue("payments", "shop", "1h"))
    old = first["cert.pem"].read_bytes()
    second = ca.write_pem_files(tmp_path, root.issue("payments", "shop", "1h"))
    assert second["cert.pem"].read_bytes() != old
    assert mode(second["key.pem"]) == 0o600
    assert public_key_of_cert(second["cert.pem"]) == public_key_of_key(second["key.pem"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
    with pytest.raises(ca.CAError, match="is a CA directory"):
        ca.write_pem_files(pki["root"], root.issue("payments", "shop", "1h"))


def test_check_chain(pki):
    leaf, *chain = pem_certs(pki["payments"] / "cert.pem")
    anchors = pem_certs(pki["root"] / "bundle.pem")
    assert ca.check_chain(leaf, chain, anchors) == [leaf, *chain, *anchors]
    with pytest.raises(ca.CAError, match="not signed by any certificate"):
        ca.check_chain(leaf, [], anchors)
    with pytest.raises(ca.CAError, match="expired"):
        ca.check_chain(leaf, chain, anchors, at=leaf.not_valid_after_utc + dt.timedelta(seconds=1))


# Last, so the 1s certificate the fixture issued at the start has expired with no wait.
def test_expired_certificate_fails_openssl_verify(pki):
    short = pki["short"]
    leaf = pem_certs(short / "cert.pem")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(seconds=62)
    # Valid while it lasted...
    moment = int(leaf.not_valid_before_utc.timestamp()) + 30
    done = openssl(
        "verify", "-attime", str(moment), "-CAfile", short / "bundle.pem", short / "cert.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # ...and refused once it is over (2s after its end at most, on the real clock).
    wait = leaf.not_valid_after_utc + dt.timedelta(seconds=1) - dt.datetime.now(dt.UTC)
    time.sleep(max(0.0, wait.total_seconds()))
    done = verify(short / "bundle.pem", short / "cert.pem")
    assert done.returncode != 0
    assert "certificate has expired" in done.stdout + done.stderr
    shown = run("ca", "show", str(short))
    assert shown.returncode == 1 and "expired" in shown.stdout
