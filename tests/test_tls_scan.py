"""sslscan (a real scanner, from Debian) against mTLS inbound listeners: which protocols and
ciphers a client can get. The README's security section records its report."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from helpers import cluster, config, http_listener

from meshpy.ca import CertificateAuthority, write_pem_files

AEAD = re.compile(r"GCM|CHACHA20[-_]POLY1305")


def scan(address: tuple[str, int], cert: str, key: str) -> str:
    assert shutil.which("sslscan"), "sslscan is installed by scripts/test"
    done = subprocess.run(
        ["sslscan", "--no-colour", f"--certs={cert}", f"--pk={key}", f"{address[0]}:{address[1]}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def protocols(report: str) -> dict[str, bool]:
    found = re.findall(r"^(SSLv[23]|TLSv1\.[0-3])\s+(enabled|disabled)", report, re.MULTILINE)
    return {name: state == "enabled" for name, state in found}


def accepted_ciphers(report: str) -> list[tuple[str, str]]:
    rows = re.findall(r"^(?:Preferred|Accepted)\s+(TLSv1\.[0-3])\s+\d+ bits\s+(\S+)", report, re.M)
    return rows


@pytest.mark.parametrize("min_tls", [None, "1.2"])
def test_only_modern_protocols_and_aead_ciphers_are_offered(run_proxy, upstream, tmp_path, min_tls):
    ca = CertificateAuthority.create_root("example.org")
    server = write_pem_files(tmp_path / "server", ca.issue("b", "shop", "1h"))
    caller = write_pem_files(tmp_path / "caller", ca.issue("a", "shop", "1h"))
    route = {"name": "app", "match": {"path_prefix": "/"}, "cluster": "app"}
    cfg = config(
        [http_listener([route], name="inbound", mtls="strict")], [cluster("app", [upstream.addr])]
    )
    identity = {k: str(server[f"{k}.pem"]) for k in ("cert", "key", "bundle")}
    cfg["identity"] = identity if min_tls is None else {**identity, "min_tls": min_tls}
    proxy = run_proxy(cfg)
    report = scan(proxy.addr("inbound"), str(caller["cert.pem"]), str(caller["key.pem"]))
    offered = protocols(report)
    assert offered == {
        "SSLv2": False,
        "SSLv3": False,
        "TLSv1.0": False,
        "TLSv1.1": False,
        "TLSv1.2": min_tls == "1.2",
        "TLSv1.3": True,
    }, report
    ciphers = accepted_ciphers(report)
    assert ciphers, report
    assert {version for version, _ in ciphers} == {p for p, on in offered.items() if on}
    weak = [name for _, name in ciphers if not AEAD.search(name)]
    assert weak == [], report
    assert "Heartbleed" not in report or "not vulnerable to heartbleed" in report
