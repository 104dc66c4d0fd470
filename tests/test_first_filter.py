"""The README's "write your first filter" walkthrough, run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Proxy
from servers import wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "first_filter"
README = (ROOT / "README.md").read_text()


def walkthrough() -> str:
    start = README.index("### Write your first filter")
    return README[start : README.index("### The API", start)]


@pytest.mark.parametrize("name", ["tenant.py", "test_tenant.py", "sidecar.yaml"])
def test_the_readme_shows_the_example_files_verbatim(name):
    assert (EXAMPLE / name).read_text() in walkthrough()


def test_the_example_unit_tests_pass(tmp_path):
    for name in ("tenant.py", "test_tenant.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tenant.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_walkthrough_commands_behave_as_described(tmp_path, free_port):
    assert shutil.which("curl"), "the walkthrough uses curl"
    shutil.copy(EXAMPLE / "tenant.py", tmp_path / "tenant.py")
    app_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    config = (EXAMPLE / "sidecar.yaml").read_text()
    config = config.replace("9901", str(admin_port)).replace("15001", str(proxy_port))
    config = config.replace("8000", str(app_port))
    app = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = None
    try:
        proxy = Proxy(__import__("yaml").safe_load(config), tmp_path, [])

        def curl(*args: str) -> str:
            done = subprocess.run(
                ["curl", "-si", *args, f"localhost:{proxy_port}/"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return done.stdout

        wait_for(lambda: " 200 " in curl("-H", "x-tenant: ACME"), 10, "the app to answer")
        refused = curl()
        assert refused.startswith("HTTP/1.1 403")
        assert refused.endswith("missing x-tenant header\n")
        allowed = curl("-H", "x-tenant: ACME")
        assert allowed.startswith("HTTP/1.1 200")
        assert re.search(r"^x-checked-by: meshpy$", allowed, re.MULTILINE)

        # Step 5: edit the file while the proxy runs.
        source = (tmp_path / "tenant.py").read_text()
        (tmp_path / "tenant.py").write_text(source.replace("Response(403", "Response(401"))
        wait_for(lambda: curl().startswith("HTTP/1.1 401"), 10, "the edited filter")
    finally:
        if proxy is not None:
            proxy.stop(10)
        app.terminate()
        app.wait(10)
