"""The ``meshpy`` command line: validate, schema, proxy start-up failures and imports."""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import meshpy_cmd
from helpers import simple_config


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(meshpy_cmd(*args), capture_output=True, text=True, timeout=timeout)


def normalize_paths(text: str) -> str:
    """``listeners[0].routes[1]`` and ``listeners.0.routes.1`` both become the dotted form."""
    return re.sub(r"\[(\d+)\]", r".\1", text)


def write(tmp_path, cfg) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def good_config() -> dict:
    return simple_config(["127.0.0.1:8081", "127.0.0.1:8082"], timeout="2s")


def bad_lb(cfg):
    cfg["clusters"][0]["lb"] = "fastest"
    return "clusters.0.lb"


def bad_listen(cfg):
    cfg["listeners"][0]["listen"] = "not-an-address"
    return "listeners.0.listen"


def bad_timeout(cfg):
    cfg["listeners"][0]["routes"][0]["timeout"] = "soon"
    return "listeners.0.routes.0.timeout"


def bad_endpoint(cfg):
    cfg["clusters"][0]["endpoints"][1] = "127.0.0.1:99999"
    return "clusters.0.endpoints.1"


def unknown_cluster(cfg):
    cfg["listeners"][0]["routes"][0]["cluster"] = "nowhere"
    return "listeners.0.routes.0.cluster"


BAD = [bad_lb, bad_listen, bad_timeout, bad_endpoint, unknown_cluster]


def test_validate_ok(tmp_path):
    out = run("validate", write(tmp_path, good_config()))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("mutate", BAD, ids=[f.__name__ for f in BAD])
def test_validate_reports_field_path(tmp_path, mutate):
    cfg = good_config()
    path = mutate(cfg)
    out = run("validate", write(tmp_path, cfg))
    assert out.returncode == 1
    assert path in normalize_paths(out.stdout + out.stderr), out.stdout + out.stderr


def test_validate_yaml_syntax_error(tmp_path):
    out = run("validate", write(tmp_path, "listeners: [ {name: edge\n  oops: [\n"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr


def test_schema_is_json_schema(tmp_path):
    out = run("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert "properties" in schema
    assert {"admin", "listeners", "clusters"} <= set(schema["properties"])


@pytest.mark.parametrize("mutate", [bad_lb, bad_timeout], ids=["lb", "timeout"])
def test_proxy_refuses_bad_config_with_exit_2(tmp_path, mutate):
    cfg = good_config()
    cfg["admin"]["listen"] = "127.0.0.1:0"
    path = mutate(cfg)
    out = run("proxy", "-c", write(tmp_path, cfg), timeout=20)
    assert out.returncode == 2
    assert path in normalize_paths(out.stderr), out.stderr
    assert "meshpy proxy ready" not in out.stdout


def test_proxy_port_in_use_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = good_config()
        cfg["listeners"][0]["listen"] = f"127.0.0.1:{port}"
        out = run("proxy", "-c", write(tmp_path, cfg), timeout=20)
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr
    assert "in use" in out.stderr.lower()
    assert "Traceback" not in out.stderr


def test_the_shipped_examples_validate_from_the_repository_root():
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    files = sorted(str(p) for p in (root / "examples").rglob("*.yaml"))
    assert len(files) >= 4
    done = subprocess.run(
        meshpy_cmd("validate", *files), capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": ok (") == len(files)


def imported_modules(importtime_stderr: str) -> set[str]:
    return {
        line.rpartition("|")[2].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import")
    }


def test_version_is_the_installed_distributions():
    done = run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"meshpy {importlib.metadata.version('meshpy')}\n"


def test_commands_do_not_look_up_the_version_unless_asked():
    """Finding the version imports importlib.metadata (about 4 MB of RSS): `meshpy ca` does not."""

    def imports(*argv: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return imported_modules(done.stderr)

    if "importlib.metadata" in imports("-c", "pass"):
        pytest.skip("this interpreter's startup (a .pth file) already imports importlib.metadata")
    imported = imports("-m", "meshpy", "ca", "--help")
    assert "meshpy.cli" in imported
    assert "importlib.metadata" not in imported


def test_a_plain_sidecar_imports_neither_cryptography_nor_the_agent(tmp_path):
    """Without identity or control plane, a sidecar does not carry their modules' RSS."""
    path = write(tmp_path, good_config())
    argv = [sys.executable, "-X", "importtime", "-m", "meshpy", "proxy", "-c", path]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        time.sleep(1)  # a poll or two of the config file, which must not import them either
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert ready.startswith("meshpy proxy ready:"), stderr
    imported = imported_modules(stderr)
    assert "meshpy.proxy" in imported
    unneeded = {"cryptography", "httpx", "meshpy.agent", "meshpy.ca", "meshpy.testing"}
    assert not unneeded & imported
