"""`pip install 'meshpy[bench]'` brings every module the bench imports, and
`pip install 'meshpy[load]'` every module its locustfile imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"bench", "meshpy"}


def imported_distributions(source: Path) -> set[str]:
    """The installed distributions providing the third-party modules `source` imports."""
    modules = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    third_party = modules - OURS - set(sys.stdlib_module_names)
    missing = [m for m in third_party if m not in owners]
    assert not missing, f"{source.name} imports modules not installed here: {missing}"
    return {normalized(d) for m in third_party for d in owners[m]}


def normalized(name: str) -> str:
    return re.split(r"[\s<>=!~;\[]", name, maxsplit=1)[0].lower().replace("_", "-")


def declared(extra: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"][extra]
    return {normalized(r) for r in requirements}


@pytest.mark.parametrize(
    ("extra", "sources"),
    [
        ("bench", [p for p in (ROOT / "bench").glob("*.py") if p.name != "locustfile.py"]),
        ("load", [ROOT / "bench" / "locustfile.py"]),
    ],
)
def test_an_extra_installs_what_its_files_import(extra: str, sources: list[Path]) -> None:
    needed = set().union(*(imported_distributions(source) for source in sources))
    assert needed, "no third-party import found: the check would pass on anything"
    undeclared = needed - declared(extra)
    assert not undeclared, f"imported but not in meshpy[{extra}]: {sorted(undeclared)}"
